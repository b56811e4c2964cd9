// 0007: holders of job items (atlas.store.jobs). A worker's heartbeat finds the items it holds by
// JobItem.worker; a reaper finds the items whose holder stopped beating by (state, heartbeat_at).
CREATE INDEX job_item_worker IF NOT EXISTS FOR (i:JobItem) ON (i.worker);
CREATE INDEX job_item_heartbeat IF NOT EXISTS FOR (i:JobItem) ON (i.state, i.heartbeat_at);
