// 0001: global entities shared by every prompt.
// Community Edition: single- and multi-property uniqueness constraints, range indexes; no node keys.
CREATE CONSTRAINT model_name IF NOT EXISTS FOR (m:Model) REQUIRE m.name IS UNIQUE;
CREATE CONSTRAINT tset_hash IF NOT EXISTS FOR (t:TranscoderSet) REQUIRE t.hash IS UNIQUE;
// fid = "<transcoder set hash>/<layer>/<feature index>"
CREATE CONSTRAINT feature_fid IF NOT EXISTS FOR (f:Feature) REQUIRE f.fid IS UNIQUE;
// tid = "<model name>/<vocabulary id>"
CREATE CONSTRAINT token_tid IF NOT EXISTS FOR (t:Token) REQUIRE t.tid IS UNIQUE;
CREATE INDEX token_text_norm IF NOT EXISTS FOR (t:Token) ON (t.text_norm);
CREATE INDEX feature_label IF NOT EXISTS FOR (f:Feature) ON (f.label);
CREATE CONSTRAINT supernode_name IF NOT EXISTS FOR (s:Supernode) REQUIRE s.name IS UNIQUE;
CREATE INDEX feature_layer_index IF NOT EXISTS FOR (f:Feature) ON (f.layer, f.index);
