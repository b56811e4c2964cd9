// 0006: job records (atlas.store.jobs). One (:Job) per batch and one (:JobItem) per prompt spec,
// keyed "{job id}/{item index}"; items are listed by job and looked up by spec id when a batch
// file is run again.
CREATE CONSTRAINT job_id IF NOT EXISTS FOR (j:Job) REQUIRE j.id IS UNIQUE;
CREATE CONSTRAINT job_item_key IF NOT EXISTS FOR (i:JobItem) REQUIRE i.key IS UNIQUE;
CREATE INDEX job_item_job IF NOT EXISTS FOR (i:JobItem) ON (i.job_id);
CREATE INDEX job_item_spec IF NOT EXISTS FOR (i:JobItem) ON (i.spec_id);
