// 0005: AGG is found by an integer pair key instead of the 0003 string. pair_key packs
// (source layer, source index, target layer, target index), 7 + 20 bits per feature:
//   (a.layer % 128) * 2^47 + (a.index % 2^20) * 2^27 + (b.layer % 128) * 2^20 + (b.index % 2^20)
// (atlas.store.ingest.agg_pair_key computes the same in Python). It is NOT unique (transcoder sets
// of the same shape share keys, and larger layers or indices wrap): a lookup seeks the key and
// checks both endpoints. Keys sort by source feature and ingestion writes a prompt's pairs in key
// order, so they land in few index pages; there is no uniqueness check per insert; and the index
// is smaller (2.0 GB against 3.5 GB for the string key at 10,000 synthetic prompts).
DROP CONSTRAINT agg_pair IF EXISTS;
// older atlases: key every aggregate and drop the string. The filter sits inside the subquery:
// on the outer MATCH it would conflict with the SET, and the planner would then buffer every
// aggregate in one transaction (out of memory at 38 M aggregates).
MATCH (a)-[g:AGG]->(b)
CALL (a, g, b) {
  WITH * WHERE g.pair_key IS NULL OR g.pair IS NOT NULL
  SET g.pair_key = (a.layer % 128) * 140737488355328 + (a.index % 1048576) * 134217728
                 + (b.layer % 128) * 1048576 + (b.index % 1048576)
  REMOVE g.pair
} IN TRANSACTIONS OF 10000 ROWS;
CREATE INDEX agg_pair_key IF NOT EXISTS FOR ()-[g:AGG]-() ON (g.pair_key);
