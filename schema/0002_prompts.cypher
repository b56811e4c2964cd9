// 0002: per-prompt graphs. Node keys embed the prompt id, so an EDGE can only join nodes of one prompt.
CREATE CONSTRAINT prompt_id IF NOT EXISTS FOR (p:Prompt) REQUIRE p.id IS UNIQUE;
CREATE INDEX prompt_complete IF NOT EXISTS FOR (p:Prompt) ON (p.complete);
// key = "<prompt id>/<interchange node id>"
CREATE CONSTRAINT node_key IF NOT EXISTS FOR (n:Node) REQUIRE n.key IS UNIQUE;
CREATE INDEX node_prompt IF NOT EXISTS FOR (n:Node) ON (n.prompt);
// ref = the global entity of a node instance (Feature.fid or Token.tid; null for error nodes)
CREATE INDEX node_ref IF NOT EXISTS FOR (n:Node) ON (n.ref);
