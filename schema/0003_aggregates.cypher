// 0003: the aggregated feature layer. AGG.pair = "<source fid>|<target layer>/<target index>"
// (both features belong to one transcoder set) is unique and indexed, so ingestion finds an
// aggregate by one index seek instead of expanding two high-degree Feature nodes.
// Backfill for atlases written before 0003 (idempotent: only relationships without a pair).
MATCH (a:Feature)-[g:AGG]->(b:Feature) WHERE g.pair IS NULL
CALL (a, g, b) { SET g.pair = a.fid + '|' + toString(b.layer) + '/' + toString(b.index) } IN TRANSACTIONS OF 10000 ROWS;
CREATE CONSTRAINT agg_pair IF NOT EXISTS FOR ()-[g:AGG]-() REQUIRE g.pair IS UNIQUE;
