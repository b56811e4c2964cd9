// 0004: where queries start. ref = the global entity of a node instance (Feature.fid or
// Token.tid; null for error nodes). One composite index answers "which prompts have an instance
// of X of this kind" from the index alone (no node record read), and seeks the instances of X in
// a given list of prompts; a lookup by ref alone uses its first property.
CREATE INDEX node_ref_kind_prompt IF NOT EXISTS FOR (n:Node) ON (n.ref, n.kind, n.prompt);
// Superseded: the ref-only index (the composite one covers it) and the per-node key constraint
// (a node is (prompt, id); the prompt's claim already makes ingestion write a prompt once).
DROP INDEX node_ref IF EXISTS;
DROP CONSTRAINT node_key IF EXISTS;
