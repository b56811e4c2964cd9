// 0003: the aggregated feature layer. AGG.pair = "<source fid>|<target fid>" is unique and indexed,
// so ingestion finds an aggregate by one index seek instead of expanding a high-degree Feature.
// Backfill for atlases written before 0003 (idempotent: only relationships without a pair).
MATCH (a:Feature)-[g:AGG]->(b:Feature) WHERE g.pair IS NULL
CALL (a, g, b) { SET g.pair = a.fid + '|' + b.fid } IN TRANSACTIONS OF 10000 ROWS;
CREATE CONSTRAINT agg_pair IF NOT EXISTS FOR ()-[g:AGG]-() REQUIRE g.pair IS UNIQUE;
