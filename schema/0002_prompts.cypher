// 0002: per-prompt graphs. Ingestion only joins nodes of one prompt with EDGE (see README.md).
CREATE CONSTRAINT prompt_id IF NOT EXISTS FOR (p:Prompt) REQUIRE p.id IS UNIQUE;
CREATE INDEX prompt_complete IF NOT EXISTS FOR (p:Prompt) ON (p.complete);
CREATE INDEX node_prompt IF NOT EXISTS FOR (n:Node) ON (n.prompt);
// (Node.key unique and a Node.ref index were here before 0004, which drops them.)
