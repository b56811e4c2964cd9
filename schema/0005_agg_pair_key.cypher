// 0005: AGG is found by an integer pair key instead of the 0003 string. pair_key packs
// (source layer, source index, target layer, target index), 7 + 20 bits per feature:
//   (a.layer % 128) * 2^47 + (a.index % 2^20) * 2^27 + (b.layer % 128) * 2^20 + (b.index % 2^20)
// (atlas.store.ingest.agg_pair_key computes the same in Python). It is NOT unique (transcoder sets
// of the same shape share keys, and larger layers or indices wrap): a lookup seeks the key and
// checks both endpoints. Keys sort by source feature, so one prompt's pairs land in few index
// pages; an 8-byte key makes the index ~4x smaller than the string one, which at 35 M aggregates
// (10,000 synthetic prompts) no longer fit the page cache.
DROP CONSTRAINT agg_pair IF EXISTS;
// older atlases: key every aggregate, drop the string (0003 re-adds it under --force; this undoes it)
MATCH (a:Feature)-[g:AGG]->(b:Feature) WHERE g.pair_key IS NULL OR g.pair IS NOT NULL
CALL (a, g, b) {
  SET g.pair_key = (a.layer % 128) * 140737488355328 + (a.index % 1048576) * 134217728
                 + (b.layer % 128) * 1048576 + (b.index % 1048576)
  REMOVE g.pair
} IN TRANSACTIONS OF 10000 ROWS;
CREATE INDEX agg_pair_key IF NOT EXISTS FOR ()-[g:AGG]-() ON (g.pair_key);
