// 0003 (superseded by 0005, now empty): gave each AGG a unique string key
// "<source fid>|<target layer>/<target index>" with a uniqueness constraint, and backfilled it on
// older atlases. 0005 replaced it with an integer pair_key, converts any atlas that still has the
// string, and drops the constraint. Kept so that every atlas's schema ledger stays in file order.
