"""All Cypher of Circuit Atlas, in one module, parameterised (never formatted with values).

Each query is a module-level constant; the functions that run them live next to their use in
``atlas.store``. Names are UPPER_SNAKE and say what the query does.
"""

from __future__ import annotations

# --------------------------------------------------------------------------- service / schema
AWAIT_INDEXES = "CALL db.awaitIndexes($timeout_s)"

SHOW_INDEXES = "SHOW INDEXES YIELD name, state, type, labelsOrTypes, properties"

# The schema ledger: one node per schema file that ran to the end, with the hash of its text.
SCHEMA_APPLIED = "MATCH (m:SchemaMigration) RETURN m.name AS name, m.sha256 AS sha256"
SCHEMA_RECORD = """
MERGE (m:SchemaMigration {name: $name})
SET m.sha256 = $sha256, m.applied_at = datetime()
"""

# Used by the tests' fixture and ``atlas db wipe``: batched so large atlases do not blow memory.
# small batches: a prompt node may carry thousands of edges, and the transaction memory is bounded
WIPE_DATABASE = "MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 500 ROWS"

# =========================================================================== jobs
# Job records live in Neo4j next to the atlas, so job state survives a Redis restart (or loss) and
# every worker, wherever it runs, reports to the same place. One (:Job) per batch and one
# (:JobItem) per prompt spec, keyed "{job id}/{item index}"; their constraints and indexes are
# schema/0006_jobs.cypher. Used by atlas.store.jobs only.
JOB_CREATE = """
MERGE (j:Job {id: $job_id})
  ON CREATE SET j.created_at = $now, j.source = $source, j.n_items = $n_items, j.mode = $mode
"""

# $rows: [{idx, spec, spec_id, state, prompt_id, outcome, reason}]
JOB_ADD_ITEMS = """
UNWIND $rows AS row
MERGE (i:JobItem {key: $job_id + '/' + toString(row.idx)})
  ON CREATE SET i.job_id = $job_id, i.idx = row.idx, i.spec = row.spec, i.spec_id = row.spec_id,
                i.state = row.state, i.prompt_id = row.prompt_id, i.outcome = row.outcome,
                i.reason = row.reason, i.attempts = 0, i.created_at = $now, i.updated_at = $now
"""

# A finished item ('done') never goes back to a running state when a redelivered message runs
# again, and a second 'done' (a redelivered ingest) keeps the first one's outcome and timings;
# 'failed' can be overwritten by a later success (retry). ``$attempt`` counts an attempt
# unless the item's start already counted it (a failure before the start, e.g. an unknown model).
JOB_MARK_ITEM = """
MATCH (i:JobItem {key: $key})
WITH i, i.state = 'done' AS was_done
WITH i, was_done, (was_done AND $state <> 'done') AS stale
SET i.attempts = coalesce(i.attempts, 0)
                 + CASE WHEN $attempt AND i.state <> 'attributing' THEN 1 ELSE 0 END,
    i.updated_at = $now
WITH i, was_done, stale WHERE NOT stale
SET i.state = $state,
    i.prompt_id = coalesce($prompt_id, i.prompt_id),
    i.outcome = CASE WHEN was_done THEN i.outcome ELSE coalesce($outcome, i.outcome) END,
    i.reason = CASE WHEN $state = 'failed' THEN $reason ELSE NULL END,
    i.timings = CASE WHEN was_done THEN i.timings ELSE coalesce($timings, i.timings) END
"""

JOB_GET = """
MATCH (j:Job {id: $job_id})
RETURN j.id AS id, j.created_at AS created_at, j.source AS source, j.n_items AS n_items,
       j.mode AS mode
"""

JOB_STATE_COUNTS = """
MATCH (i:JobItem {job_id: $job_id})
RETURN i.state AS state, count(*) AS n
"""

JOB_ITEMS = """
MATCH (i:JobItem {job_id: $job_id})
WHERE $states IS NULL OR i.state IN $states
RETURN i.idx AS idx, i.spec AS spec, i.spec_id AS spec_id, i.state AS state,
       i.prompt_id AS prompt_id, i.outcome AS outcome, i.reason AS reason,
       i.attempts AS attempts, i.timings AS timings, i.updated_at AS updated_at
ORDER BY i.idx
"""

JOB_LIST = """
MATCH (j:Job)
WITH j ORDER BY j.created_at DESC LIMIT $limit
OPTIONAL MATCH (i:JobItem {job_id: j.id})
RETURN j.id AS id, j.created_at AS created_at, j.source AS source, j.n_items AS n_items,
       j.mode AS mode,
       count(CASE WHEN i.state = 'done' THEN 1 END) AS done,
       count(CASE WHEN i.state = 'failed' THEN 1 END) AS failed
ORDER BY created_at DESC
"""

# spec ids already finished by some earlier job, with the prompt each produced
JOB_DONE_SPECS = """
UNWIND $spec_ids AS sid
MATCH (i:JobItem {spec_id: sid})
WHERE i.state = 'done' AND i.prompt_id IS NOT NULL
RETURN sid AS spec_id, collect(DISTINCT i.prompt_id) AS prompt_ids
"""

# which of these prompt ids are complete in the atlas
PROMPTS_PRESENT = """
UNWIND $prompt_ids AS pid
MATCH (p:Prompt {id: pid})
WHERE p.complete
RETURN p.id AS prompt_id
"""

# items still counted as running when nothing has touched them for $stale_s seconds
JOB_STALE_ITEMS = """
MATCH (i:JobItem {job_id: $job_id})
WHERE i.state IN ['queued', 'attributing'] AND i.updated_at < $before
RETURN i.idx AS idx, i.spec AS spec, i.state AS state
ORDER BY i.idx
"""
# =========================================================================== end of jobs section

# =========================================================================== graph model
# (:Model {name})  (:TranscoderSet {hash})-[:FOR_MODEL]->(:Model)
# (:Feature {fid = "<tset>/<layer>/<index>"})   (:Token {tid = "<model>/<vocab id>", text_norm})
# (:Prompt {id, complete})-[:USES_MODEL]->(:Model), -[:USES_TRANSCODERS]->(:TranscoderSet)
# (:Node:FeatureNode|ErrorNode|TokenNode|LogitNode {prompt, id, kind, ref})
#     -[:EDGE {w}]->(:Node)          source -> target, w = A[target, source]; one prompt only
#     -[:OF]->(:Feature | :Token)    instance of a global entity
# (:Feature)-[:AGG {n_prompts, sum_w, max_w, min_w}]->(:Feature)     (mean = sum_w / n_prompts)
# (:Supernode {name})-[:HAS]->(:Feature);  (:Supernode)-[:SAGG {...}]->(:Supernode)
# See schema/README.md for the drawing.

# --------------------------------------------------------------------------- ingestion
# Claims the prompt and (unless it is already complete) writes its provenance, in one statement.
# MERGE on the unique id, then a SET that takes the node's write lock, so a second ingester of the
# same prompt waits here and then sees ``complete = true`` (and writes nothing).
CLAIM_PROMPT = """
OPTIONAL MATCH (old:Prompt {id: $id})
WITH old IS NOT NULL AS existed
MERGE (p:Prompt {id: $id})
ON CREATE SET p.complete = false
SET p.complete = coalesce(p.complete, false)
WITH p, existed, p.complete AS complete
CALL (p, complete) {
  WITH p WHERE NOT complete
  MERGE (m:Model {name: $model.name})
  ON CREATE SET m.family = $model.family, m.n_layers = $model.n_layers,
                m.d_model = $model.d_model, m.vocab_size = $model.vocab_size
  MERGE (t:TranscoderSet {hash: $tset.hash})
  ON CREATE SET t.name = $tset.name, t.kind = $tset.kind, t.d_transcoder = $tset.d_transcoder
  MERGE (t)-[:FOR_MODEL]->(m)
  MERGE (p)-[:USES_MODEL]->(m)
  MERGE (p)-[:USES_TRANSCODERS]->(t)
  SET p += $props
}
CALL (complete) {
  WITH complete WHERE NOT complete
  UNWIND $features AS r
  MERGE (f:Feature {fid: r.fid})
  ON CREATE SET f.tset = r.tset, f.layer = r.layer, f.index = r.index,
                f.n_prompts = 0, f.max_act = r.act, f.sum_act = 0.0
  SET f.label = coalesce(f.label, r.label),
      f.n_prompts = f.n_prompts + 1,
      f.sum_act = f.sum_act + r.act,
      f.max_act = CASE WHEN r.act > f.max_act THEN r.act ELSE f.max_act END
  RETURN collect([r.fid, elementId(f)]) AS features
}
CALL (complete) {
  WITH complete WHERE NOT complete
  UNWIND $tokens AS r
  MERGE (t:Token {tid: r.tid})
  ON CREATE SET t.model = r.model, t.token_id = r.token_id
  SET t.text = coalesce(t.text, r.text),
      t.text_norm = coalesce(t.text_norm, r.text_norm)
  RETURN collect([r.tid, elementId(t)]) AS tokens
}
RETURN complete, existed, features, tokens
"""

# Leftovers of an incomplete prompt (defensive: a prompt is written in one transaction).
DELETE_PROMPT_NODES = """
MATCH (n:Node {prompt: $id})
WITH n LIMIT $batch
DETACH DELETE n
RETURN count(*) AS deleted
"""

# Every node of the prompt and the first chunk of its edges, in one statement. ``$rows`` are the
# node rows in ``idx`` order: ``r.label`` is FeatureNode / ErrorNode / TokenNode / LogitNode (from
# a fixed map in atlas.store.ingest, never user text); ``r.ent`` the element id of its global
# Feature or Token (returned by CLAIM_PROMPT), null for errors. Edges come as three parallel lists
# (source idx, target idx, weight) and find their endpoints by position in the collected node list:
# no lookup per edge, and an edge can only join two nodes created here, i.e. of one prompt.
CREATE_NODES_AND_EDGES = """
UNWIND $rows AS r
CREATE (n:Node:$(r.label) {prompt: $prompt, id: r.id, idx: r.idx, kind: r.kind, ref: r.ref,
                            layer: r.layer, pos: r.pos, feature: r.feature,
                            token_id: r.token_id, activation: r.activation,
                            influence: r.influence, logit_prob: r.logit_prob})
WITH r, n
CALL (r, n) {
  WITH * WHERE r.ent IS NOT NULL
  MATCH (e) WHERE elementId(e) = r.ent
  CREATE (n)-[:OF]->(e)
}
WITH collect(n) AS ns
CALL (ns) {
  UNWIND range(0, size($src) - 1) AS i
  WITH ns[$src[i]] AS s, ns[$tgt[i]] AS t, $w[i] AS w
  CREATE (s)-[:EDGE {w: w}]->(t)
}
RETURN size(ns) AS n_nodes
"""

# Further edge chunks of a large graph: the prompt's nodes again (one index seek), in idx order.
CREATE_MORE_EDGES = """
MATCH (n:Node {prompt: $prompt})
WITH n ORDER BY n.idx
WITH collect(n) AS ns
UNWIND range(0, size($src) - 1) AS i
WITH ns[$src[i]] AS s, ns[$tgt[i]] AS t, $w[i] AS w
CREATE (s)-[:EDGE {w: w}]->(t)
"""


# The prompt's contribution to the feature aggregate. Rows ``{k, a, b, w}``: one per (source,
# target) feature pair of ONE prompt, ``w`` summed over positions, ``k`` the pair key (see
# schema/0005 and ingest.agg_pair_key), ``a``/``b`` the features' element ids from CLAIM_PROMPT.
# An aggregate is found by a seek on the ``AGG.pair_key`` index plus a check of its endpoints (the
# key is not unique), never by expanding two high-degree features (a relationship MERGE between
# them scans their AGG relationships, and popular features gather thousands); a missing one is
# created. No other transaction can create or delete the same pair meanwhile: CLAIM_PROMPT holds
# the write locks of both features until commit. The prompt's claim also guarantees this runs
# once per prompt. The hint pins the seek: on a small atlas the planner may otherwise pick a scan
# of the whole index, which is ruinous once the atlas has millions of aggregates.
UPDATE_FEATURE_AGG = """
  UNWIND $rows AS r
  OPTIONAL MATCH (s)-[x:AGG {pair_key: r.k}]->(t) USING INDEX SEEK x:AGG(pair_key)
  WHERE elementId(s) = r.a AND elementId(t) = r.b
  CALL (r, x) {
    WITH * WHERE x IS NULL
    MATCH (a:Feature) WHERE elementId(a) = r.a
    MATCH (b:Feature) WHERE elementId(b) = r.b
    CREATE (a)-[:AGG {pair_key: r.k, n_prompts: 1, sum_w: r.w, max_w: r.w, min_w: r.w}]->(b)
  }
  CALL (r, x) {
    WITH * WHERE x IS NOT NULL
    SET x.n_prompts = x.n_prompts + 1,
        x.sum_w = x.sum_w + r.w,
        x.max_w = CASE WHEN r.w > x.max_w THEN r.w ELSE x.max_w END,
        x.min_w = CASE WHEN r.w < x.min_w THEN r.w ELSE x.min_w END
  }
"""


def _fold(rel: str, w: str) -> str:
    """``ON CREATE`` / ``ON MATCH`` of an aggregate relationship ``rel`` folding in one prompt's
    weight ``w`` (fixed identifiers, never values)."""
    return f"""ON CREATE SET {rel}.n_prompts = 1, {rel}.sum_w = {w}, {rel}.max_w = {w}, {rel}.min_w = {w}
  ON MATCH SET {rel}.n_prompts = {rel}.n_prompts + 1,
      {rel}.sum_w = {rel}.sum_w + {w},
      {rel}.max_w = CASE WHEN {w} > {rel}.max_w THEN {w} ELSE {rel}.max_w END,
      {rel}.min_w = CASE WHEN {w} < {rel}.min_w THEN {w} ELSE {rel}.min_w END
"""


# Last statement of a prompt: the last batch of AGG rows, the prompt's contribution to the
# supernode aggregate (SAGG), then the ``complete`` flag.
FINISH_PROMPT = (
    """
CALL () {"""
    + UPDATE_FEATURE_AGG
    + """}
CALL () {
  MATCH (a:Node:FeatureNode {prompt: $id})-[:OF]->(:Feature)<-[:HAS]-(s:Supernode)
  USING INDEX a:Node(prompt)
  MATCH (a)-[e:EDGE]->(b:FeatureNode)-[:OF]->(:Feature)<-[:HAS]-(t:Supernode)
  WHERE s <> t
  WITH s, t, sum(e.w) AS w
  MERGE (s)-[g:SAGG]->(t)
  """
    + _fold("g", "w")
    + """}
MATCH (p:Prompt {id: $id})
SET p.complete = true, p.ingested_at = datetime()
"""
)

# ---- the aggregate pair key
#: bits of a feature's layer and index in an ``AGG.pair_key`` (larger values wrap)
PAIR_KEY_LAYER_BITS = 7
PAIR_KEY_INDEX_BITS = 20


def pair_key_expr(src: str, dst: str) -> str:
    """The Cypher expression of the ``AGG.pair_key`` between the features bound to ``src`` and
    ``dst`` (fixed identifiers, never values): ``ingest.agg_pair_key`` in Cypher. schema/0005
    keeps its own frozen copy."""
    layers = 1 << PAIR_KEY_LAYER_BITS
    indices = 1 << PAIR_KEY_INDEX_BITS
    feature = PAIR_KEY_LAYER_BITS + PAIR_KEY_INDEX_BITS
    return (
        f"({src}.layer % {layers}) * {1 << (feature + PAIR_KEY_INDEX_BITS)}"
        f" + ({src}.index % {indices}) * {1 << feature}"
        f" + ({dst}.layer % {layers}) * {indices} + ({dst}.index % {indices})"
    )


# ---- deleting a prompt (one transaction: aggregates first, then the nodes, then the prompt)
# The prompt's contribution to AGG is subtracted; max/min are recomputed from the other prompts'
# instance edges of the same feature pair; pairs left with no prompt are deleted.
DELETE_PROMPT_AGG = (
    """
MATCH (a:Node:FeatureNode {prompt: $id})-[e:EDGE]->(b:FeatureNode)
MATCH (a)-[:OF]->(fa:Feature)
MATCH (b)-[:OF]->(fb:Feature)
WITH fa, fb, sum(e.w) AS w
MATCH (ga)-[g:AGG {pair_key: """
    + pair_key_expr("fa", "fb")
    + """}]->(gb)
USING INDEX SEEK g:AGG(pair_key)
WHERE ga = fa AND gb = fb
SET g.n_prompts = g.n_prompts - 1, g.sum_w = g.sum_w - w
WITH fa, fb, g
CALL (fa, fb, g) {
  WITH * WHERE g.n_prompts > 0
  MATCH (fa)<-[:OF]-(x:FeatureNode)-[e2:EDGE]->(:FeatureNode)-[:OF]->(fb)
  WHERE x.prompt <> $id
  WITH g, x.prompt AS prompt, sum(e2.w) AS pw
  WITH g, max(pw) AS mx, min(pw) AS mn
  SET g.max_w = mx, g.min_w = mn
}
CALL (g) {
  WITH * WHERE g.n_prompts <= 0
  DELETE g
}
"""
)

DELETE_PROMPT_FEATURE_STATS = """
MATCH (n:Node:FeatureNode {prompt: $id})-[:OF]->(f:Feature)
WITH f, max(coalesce(n.activation, 0.0)) AS act
SET f.n_prompts = f.n_prompts - 1, f.sum_act = f.sum_act - act
WITH f
CALL (f) {
  OPTIONAL MATCH (f)<-[:OF]-(m:FeatureNode) WHERE m.prompt <> $id
  WITH max(m.activation) AS mx
  SET f.max_act = coalesce(mx, 0.0)
}
"""

PROMPT_ANY_STATE = "MATCH (p:Prompt {id: $id}) RETURN p.id AS id"

DELETE_PROMPT_NODE = "MATCH (p:Prompt {id: $id}) DETACH DELETE p RETURN count(*) AS deleted"

# --------------------------------------------------------------------------- prompts, export
PROMPT_EXISTS = "MATCH (p:Prompt {id: $id}) WHERE p.complete RETURN p.id AS id"

COUNT_PROMPTS = "MATCH (p:Prompt) WHERE p.complete RETURN count(p) AS n"

# text of prompts by id (tables show prompts, not hashes)
PROMPT_TEXTS = """
UNWIND $prompt_ids AS pid
MATCH (p:Prompt {id: pid})
RETURN p.id AS prompt_id, p.text AS text
"""

LIST_PROMPTS = """
MATCH (p:Prompt) WHERE p.complete
RETURN p.id AS id, p.text AS text, p.n_nodes AS n_nodes, p.n_edges AS n_edges,
       p.replacement_score AS replacement_score, p.completeness_score AS completeness_score
ORDER BY p.ingested_at DESC LIMIT $limit
"""

# Prompts whose id starts with the given prefix (users type short ids).
FIND_PROMPT_BY_PREFIX = """
MATCH (p:Prompt) WHERE p.complete AND p.id STARTS WITH $prefix
RETURN p.id AS id LIMIT 2
"""

EXPORT_PROMPT = """
MATCH (p:Prompt {id: $id}) WHERE p.complete
RETURN p.meta_json AS meta_json, p.input_ids AS input_ids
"""

PROMPT_SUPERNODES = """
MATCH (s:Supernode)-[:HAS]->(:Feature)<-[:OF]-(n:Node:FeatureNode {prompt: $id})
RETURN s.name AS name, collect(n.id) AS ids ORDER BY name
"""

EXPORT_NODES = """
MATCH (n:Node {prompt: $id})
OPTIONAL MATCH (n)-[:OF]->(f:Feature)
OPTIONAL MATCH (n)-[:OF]->(t:Token)
RETURN t.text AS token_text, n.idx AS idx, n.id AS id, n.kind AS kind, n.layer AS layer, n.pos AS pos,
       n.feature AS feature, n.token_id AS token_id, n.activation AS activation,
       n.influence AS influence, n.logit_prob AS logit_prob, f.label AS label
ORDER BY idx
"""

EXPORT_EDGES = """
MATCH (s:Node {prompt: $id})-[e:EDGE]->(t:Node)
RETURN s.idx AS source, t.idx AS target, e.w AS weight
"""

# --------------------------------------------------------------------------- endpoints
FEATURES_BY_LAYER_INDEX = """
MATCH (f:Feature) WHERE f.layer = $layer AND f.index = $index
RETURN f.fid AS ref
"""

TOKENS_BY_TEXT = "MATCH (t:Token {text_norm: $text}) RETURN t.tid AS ref"

REF_TEXTS = """
UNWIND $refs AS ref
OPTIONAL MATCH (t:Token {tid: ref})
OPTIONAL MATCH (f:Feature {fid: ref})
RETURN ref, t IS NOT NULL AS is_token, coalesce(t.text, f.label) AS text,
       f.layer AS layer, f.index AS index
"""

# --------------------------------------------------------------------------- named queries
# Paths of 1..H edges inside one prompt (ingestion only joins nodes of one prompt with EDGE, so
# no path crosses prompts). Cypher needs a literal upper bound on the quantifier: one text per H,
# built below from a fixed template with an integer from a closed range (never from user text).
# Plan (schema/0004): the prompts that contain the target are read from the (ref, kind, prompt)
# index alone; the start nodes are sought in that index restricted to those prompts (the hint
# keeps the planner from expanding backwards from every target instance); the expansion runs
# from each start node (CALL), with the weight filter inside the quantified pattern.
_PATHS_TEMPLATE = """
MATCH (b0:Node) WHERE b0.ref IN $to_refs AND b0.kind = $to_kind AND b0.prompt IS NOT NULL
  AND ($prompt_ids IS NULL OR b0.prompt IN $prompt_ids)
WITH collect(DISTINCT b0.prompt) AS prompts
MATCH (a:Node) USING INDEX a:Node(ref, kind, prompt)
WHERE a.ref IN $from_refs AND a.kind = $from_kind AND a.prompt IN prompts
CALL (a) {
  MATCH p = (a) ((u:Node)-[e:EDGE WHERE abs(e.w) >= $min_weight]->(v:Node)){1,__H__} (b:Node)
  WHERE b.ref IN $to_refs AND b.kind = $to_kind
  RETURN p
}
RETURN a.prompt AS prompt,
       [n IN nodes(p) | n.id] AS nodes,
       [n IN nodes(p) | coalesce(n.ref, n.kind + ':' + toString(n.layer))] AS refs,
       [r IN relationships(p) | r.w] AS weights
LIMIT $cap
"""

PATHS_MAX_HOPS = 6
PATHS: dict[int, str] = {
    h: _PATHS_TEMPLATE.replace("__H__", str(h)) for h in range(1, PATHS_MAX_HOPS + 1)
}

ACTIVE_PROMPTS = """
MATCH (n:Node:FeatureNode) WHERE n.ref IN $refs AND n.kind = 'feature' AND n.prompt IS NOT NULL
  AND ($prompt_ids IS NULL OR n.prompt IN $prompt_ids)
WITH n.prompt AS prompt, max(n.activation) AS max_activation,
     min(n.influence) AS best_influence, count(n) AS n_instances,
     collect(DISTINCT n.pos) AS positions
MATCH (p:Prompt {id: prompt}) WHERE p.complete
RETURN prompt, p.text AS text, max_activation, best_influence, n_instances, positions
ORDER BY max_activation DESC LIMIT $limit
"""

TOP_CONTRIBUTORS = """
MATCH (l:Node:LogitNode) WHERE l.ref IN $refs AND l.kind = 'logit' AND l.prompt IS NOT NULL
  AND ($prompt_ids IS NULL OR l.prompt IN $prompt_ids)
MATCH (s:Node)-[e:EDGE]->(l)
WITH coalesce(s.ref, s.kind + ':' + toString(s.layer)) AS source, s.kind AS kind,
     s.layer AS layer, e.w AS w, l.prompt AS prompt
RETURN source, kind, layer, count(DISTINCT prompt) AS n_prompts, sum(w) AS sum_w,
       sum(abs(w)) AS sum_abs, max(w) AS max_w
ORDER BY sum_abs DESC LIMIT $limit
"""

FEATURE_NEIGHBOURS = """
MATCH (f:Feature {fid: $fid})
CALL (f) {
  MATCH (f)-[g:AGG]->(h:Feature)
  RETURN 'out' AS direction, h, g
  UNION ALL
  MATCH (f)<-[g:AGG]-(h:Feature)
  RETURN 'in' AS direction, h, g
}
RETURN direction, h.fid AS neighbour, h.label AS label, g.n_prompts AS n_prompts,
       g.sum_w AS sum_w, g.sum_w / g.n_prompts AS mean_w, g.max_w AS max_w, g.min_w AS min_w
ORDER BY g.n_prompts DESC, abs(g.sum_w) DESC LIMIT $limit
"""

SUPERNODE_NEIGHBOURS = """
MATCH (s:Supernode {name: $name})
CALL (s) {
  MATCH (s)-[g:SAGG]->(t:Supernode)
  RETURN 'out' AS direction, t, g
  UNION ALL
  MATCH (s)<-[g:SAGG]-(t:Supernode)
  RETURN 'in' AS direction, t, g
}
RETURN direction, t.name AS neighbour, g.n_prompts AS n_prompts, g.sum_w AS sum_w,
       g.sum_w / g.n_prompts AS mean_w, g.max_w AS max_w, g.min_w AS min_w
ORDER BY g.n_prompts DESC, abs(g.sum_w) DESC LIMIT $limit
"""

# One prompt collapsed to supernodes: member feature nodes become their supernode; token and
# logit nodes stay; everything else is dropped. Edge weights are summed per group pair.
PROMPT_SUPERNODE_GRAPH = """
MATCH (p:Prompt {id: $id}) WHERE p.complete
MATCH (a:Node {prompt: $id})-[e:EDGE]->(b:Node)
OPTIONAL MATCH (a)-[:OF]->(:Feature)<-[:HAS]-(sa:Supernode)
OPTIONAL MATCH (b)-[:OF]->(:Feature)<-[:HAS]-(sb:Supernode)
WITH a, b, e, sa, sb
WHERE (sa IS NOT NULL OR a.kind = 'token') AND (sb IS NOT NULL OR b.kind = 'logit')
WITH CASE WHEN sa IS NULL THEN a.id ELSE 'supernode:' + sa.name END AS source,
     CASE WHEN sb IS NULL THEN b.id ELSE 'supernode:' + sb.name END AS target, e.w AS w
WHERE source <> target
RETURN source, target, sum(w) AS weight, count(*) AS n_edges
ORDER BY abs(weight) DESC
"""

# Two prompts side by side: active features (by global feature) and feature-feature edges.
COMPARE_FEATURES = """
MATCH (n:Node:FeatureNode) WHERE n.prompt IN [$a, $b]
WITH n.ref AS ref, n.prompt AS prompt, max(n.activation) AS act
WITH ref, collect([prompt, act]) AS acts
OPTIONAL MATCH (f:Feature {fid: ref})
RETURN ref, f.label AS label,
       [x IN acts WHERE x[0] = $a | x[1]][0] AS act_a,
       [x IN acts WHERE x[0] = $b | x[1]][0] AS act_b
"""

COMPARE_EDGES = """
MATCH (s:Node:FeatureNode)-[e:EDGE]->(t:FeatureNode) WHERE s.prompt IN [$a, $b]
WITH s.ref AS source, t.ref AS target, s.prompt AS prompt, sum(e.w) AS w
WITH source, target, collect([prompt, w]) AS ws
WHERE size(ws) = 2
RETURN source, target,
       [x IN ws WHERE x[0] = $a | x[1]][0] AS w_a,
       [x IN ws WHERE x[0] = $b | x[1]][0] AS w_b
ORDER BY abs(w_a) + abs(w_b) DESC LIMIT $limit
"""

# --------------------------------------------------------------------------- supernodes
UPSERT_SUPERNODE = """
MERGE (s:Supernode {name: $name})
SET s.kind = $kind, s.pattern = $pattern, s.updated_at = datetime()
WITH s
OPTIONAL MATCH (s)-[h:HAS]->()
DELETE h
WITH DISTINCT s
UNWIND $fids AS fid
MATCH (f:Feature {fid: fid})
MERGE (s)-[:HAS]->(f)
RETURN count(f) AS n_members
"""

SUPERNODE_EXISTS = "MATCH (s:Supernode {name: $name}) RETURN s.name AS name"

# Candidates of a pattern supernode: the pattern runs in Python over these strings, so the regex
# dialect that is checked is the one that runs, under a time budget (see supernodes.py).
FEATURE_LABELS = """
MATCH (f:Feature) WHERE f.label IS NOT NULL
RETURN f.fid AS fid, [f.label] AS texts
"""

FEATURE_TOP_TOKENS = """
MATCH (f:Feature) WHERE f.top_tokens IS NOT NULL
RETURN f.fid AS fid, f.top_tokens AS texts
"""

# Features of prompts' graphs matched by (layer, index) pairs (for qParams imports).
FEATURES_BY_PAIRS = """
UNWIND $pairs AS pair
MATCH (f:Feature) WHERE f.layer = pair[0] AND f.index = pair[1]
  AND ($tset IS NULL OR f.tset = $tset)
RETURN f.fid AS fid
"""

LIST_SUPERNODES = """
MATCH (s:Supernode)
OPTIONAL MATCH (s)-[:HAS]->(f:Feature)
RETURN s.name AS name, s.kind AS kind, s.pattern AS pattern, count(f) AS n_members
ORDER BY name
"""

SHOW_SUPERNODE = """
MATCH (s:Supernode {name: $name})
OPTIONAL MATCH (s)-[:HAS]->(f:Feature)
RETURN s.name AS name, s.kind AS kind, s.pattern AS pattern,
       [x IN collect(f) | {fid: x.fid, label: x.label, n_prompts: x.n_prompts}] AS members
"""

SUPERNODE_MEMBERS = "MATCH (:Supernode {name: $name})-[:HAS]->(f:Feature) RETURN f.fid AS ref"

DELETE_SUPERNODE = """
MATCH (s:Supernode {name: $name})
DETACH DELETE s
RETURN count(*) AS deleted
"""

CLEAR_SUPERNODE_AGG = "MATCH (:Supernode {name: $name})-[g:SAGG]-() DELETE g"

# Full recomputation of one supernode's aggregate edges over every ingested prompt.
REBUILD_SUPERNODE_AGG_OUT = """
MATCH (s:Supernode {name: $name})-[:HAS]->(:Feature)<-[:OF]-(a:FeatureNode)
MATCH (a)-[e:EDGE]->(b:FeatureNode)-[:OF]->(:Feature)<-[:HAS]-(t:Supernode)
WHERE s <> t
WITH s, t, a.prompt AS prompt, sum(e.w) AS w
WITH s, t, count(prompt) AS n_prompts, sum(w) AS sum_w, max(w) AS max_w, min(w) AS min_w
MERGE (s)-[g:SAGG]->(t)
SET g.n_prompts = n_prompts, g.sum_w = sum_w, g.max_w = max_w, g.min_w = min_w
"""

REBUILD_SUPERNODE_AGG_IN = """
MATCH (s:Supernode {name: $name})-[:HAS]->(:Feature)<-[:OF]-(b:FeatureNode)
MATCH (t:Supernode)-[:HAS]->(:Feature)<-[:OF]-(a:FeatureNode)-[e:EDGE]->(b)
WHERE s <> t
WITH s, t, b.prompt AS prompt, sum(e.w) AS w
WITH s, t, count(prompt) AS n_prompts, sum(w) AS sum_w, max(w) AS max_w, min(w) AS min_w
MERGE (t)-[g:SAGG]->(s)
SET g.n_prompts = n_prompts, g.sum_w = sum_w, g.max_w = max_w, g.min_w = min_w
"""

# --------------------------------------------------------------------------- annotation
SET_FEATURE_LENS = """
UNWIND $rows AS r
MATCH (f:Feature {fid: r.fid})
SET f.top_tokens = r.top_tokens, f.top_values = r.top_values,
    f.bottom_tokens = r.bottom_tokens, f.bottom_values = r.bottom_values
"""

FEATURES_OF_TSET = """
MATCH (f:Feature) WHERE f.tset = $tset
RETURN f.fid AS fid, f.layer AS layer, f.index AS index
"""

ALL_FEATURE_IDS = "MATCH (f:Feature) RETURN f.fid AS fid ORDER BY fid"

# Top activating (prompt, position, token text, the tags of the prompt's image) of each feature,
# from what is ingested.
TOP_ACTIVATIONS = """
UNWIND $fids AS fid
MATCH (f:Feature {fid: fid})
CALL (f) {
  MATCH (f)<-[:OF]-(n:FeatureNode)
  WITH n ORDER BY n.activation DESC LIMIT $limit
  MATCH (p:Prompt {id: n.prompt}) WHERE p.complete
  RETURN collect({prompt: n.prompt, pos: n.pos, activation: n.activation,
                  token: p.tokens[n.pos],
                  image_tags: reduce(acc = [], ts IN [(p)-[:HAS_IMAGE]->(i:Image) | i.tags] |
                                     acc + coalesce(ts, []))}) AS top
}
RETURN f.fid AS fid, f.top_tokens AS top_tokens, top
"""

# A feature's stored properties (pictures: the feature card).
FEATURE_CARD = """
MATCH (f:Feature {fid: $fid})
RETURN f.fid AS fid, f.layer AS layer, f.index AS index, f.label AS label,
       f.top_tokens AS top_tokens, f.top_values AS top_values
"""

IMAGE_GRID_SIZES = """
MATCH (a:ImageTokenNode) WHERE a.prompt IN $ids
RETURN a.prompt AS prompt, max(a.row) + 1 AS rows, max(a.col) + 1 AS cols
"""

PROMPT_TOKENS = """
MATCH (p:Prompt) WHERE p.id IN $ids AND p.complete
RETURN p.id AS id, p.tokens AS tokens
"""

SET_FEATURE_LABELS = """
UNWIND $rows AS r
MATCH (f:Feature {fid: r.fid})
SET f.label = r.label, f.top_act_tokens = r.tokens, f.top_act_values = r.values,
    f.top_act_prompts = r.prompts
"""


# =========================================================================== jobs: holders
# Job items held by a live process (atlas.store.jobs, atlas.pipeline.liveness). A worker or an
# inline batch that takes an item writes its id to ``i.worker`` and refreshes ``i.heartbeat_at``
# every HEARTBEAT_INTERVAL_S while it works; an active item whose holder's heartbeat is older than
# STALE_AFTER_S was lost with its holder (a SIGKILLed worker, a killed inline batch) and is sent
# again. An item handed to the ingest queue has no holder until an ingest worker takes it, so a
# backlog on that queue is never taken for a loss. Indexes: schema/0007_job_holders.cypher.

# First statement of an attribute chunk (one round trip for all its specs): for each row
# {key, prompt_id, force}, is the prompt already in the atlas, and the item's state: 'done' with
# outcome 'present' when it is (unless forced), else 'attributing', held by ``$holder``. A
# finished item is never moved back. ``row.key`` may be null (no job). Rows come back in input
# order (``row.n``).
JOB_CLAIM_ITEMS = """
UNWIND $rows AS row
OPTIONAL MATCH (p:Prompt {id: row.prompt_id})
WITH row, coalesce(p.complete, false) AS present
CALL (row, present) {
  OPTIONAL MATCH (i:JobItem {key: row.key})
  WITH i WHERE i IS NOT NULL AND i.state <> 'done'
  WITH i, present AND NOT row.force AS skip
  SET i.attempts = coalesce(i.attempts, 0) + 1,
      i.updated_at = $now,
      i.state = CASE WHEN skip THEN 'done' ELSE 'attributing' END,
      i.prompt_id = row.prompt_id,
      i.outcome = CASE WHEN skip THEN 'present' ELSE i.outcome END,
      i.reason = NULL,
      i.worker = $holder,
      i.heartbeat_at = $now
}
RETURN row.n AS n, present
ORDER BY n
"""

# $keys: items a process takes (an ingest worker, an inline batch): held by $holder from now.
JOB_HOLD_ITEMS = """
UNWIND $keys AS key
MATCH (i:JobItem {key: key})
WHERE i.state IN ['queued', 'attributing']
SET i.worker = $holder, i.heartbeat_at = $now
"""

# $keys: items a process hands on (to the ingest queue): no longer held by $holder.
JOB_RELEASE_ITEMS = """
UNWIND $keys AS key
MATCH (i:JobItem {key: key})
WHERE i.worker = $holder
SET i.worker = NULL
"""

# The heartbeat: every active item $holder holds is alive now.
JOB_HEARTBEAT = """
MATCH (i:JobItem {worker: $holder})
WHERE i.state IN ['queued', 'attributing']
SET i.heartbeat_at = $now
RETURN count(i) AS n
"""

# Active items of one job whose holder's heartbeat stopped before $before.
JOB_STALE_HELD = """
MATCH (i:JobItem {job_id: $job_id})
WHERE i.state IN ['queued', 'attributing'] AND i.worker IS NOT NULL AND i.heartbeat_at < $before
RETURN i.idx AS idx, i.worker AS worker, i.heartbeat_at AS heartbeat_at
ORDER BY i.idx
"""

# Takes over lost items of Celery jobs (all jobs, or $job_id's) for $holder, who re-sends them:
# 'queued', held by $holder with a fresh heartbeat, so that a re-send that fails is found again
# later. The first SET takes each item's write lock and the condition is read again under it,
# so two reapers never both take the same item.
JOB_REAP_STALE = """
MATCH (i:JobItem)
WHERE i.state IN ['queued', 'attributing'] AND i.heartbeat_at < $before
  AND i.worker IS NOT NULL AND ($job_id IS NULL OR i.job_id = $job_id)
MATCH (j:Job {id: i.job_id})
WHERE j.mode = 'celery'
WITH i LIMIT $limit
SET i.reaping = $holder
WITH i
WHERE i.state IN ['queued', 'attributing'] AND i.heartbeat_at < $before AND i.worker IS NOT NULL
SET i.state = 'queued', i.worker = $holder, i.heartbeat_at = $now, i.updated_at = $now
REMOVE i.reaping
RETURN i.job_id AS job_id, i.idx AS idx, i.spec AS spec
ORDER BY job_id, idx
"""

# Items about to be sent again (``atlas jobs retry``, a reaper): queued, held by nobody.
JOB_REQUEUE_ITEMS = """
UNWIND $keys AS key
MATCH (i:JobItem {key: key})
WHERE i.state <> 'done'
SET i.state = 'queued', i.worker = NULL, i.reason = NULL, i.updated_at = $now
"""

# Items of a job that failed for good together ($keys), with one reason (a send that failed).
JOB_FAIL_ITEMS = """
UNWIND $keys AS key
MATCH (i:JobItem {key: key})
WHERE i.state <> 'done'
SET i.state = 'failed', i.reason = $reason, i.worker = NULL, i.updated_at = $now
"""

# The holder and heartbeat of a job's items (``atlas jobs status --items``).
JOB_HOLDERS = """
MATCH (i:JobItem {job_id: $job_id})
WHERE i.worker IS NOT NULL
RETURN i.idx AS idx, i.worker AS worker, i.heartbeat_at AS heartbeat_at
"""
# =========================================================================== end of jobs: holders
# =========================================================================== images
# (:Image {sha256, width, height, format, tags})<-[:HAS_IMAGE]-(:Prompt)
# (:Node:ImageTokenNode {prompt, pos, row, col, k, image, top_patches, top_weights, patch_cols})
#     an image soft token's embedding node (kind 'image'; an instance of the image token's :Token)
# Constraints and indexes: schema/0008_images.cypher. Used by atlas.store.{ingest,read,labels}.

# In the prompt's ingestion transaction, after its nodes: the Image (tags merged, each once), the
# prompt's link to it, and the image fields of its soft tokens' nodes (found by prompt, position).
WRITE_PROMPT_IMAGE = """
MATCH (p:Prompt {id: $prompt})
CALL (p) {
  WITH p WHERE $image.sha256 IS NOT NULL
  MERGE (i:Image {sha256: $image.sha256})
  ON CREATE SET i.width = $image.width, i.height = $image.height, i.format = $image.format,
                i.tags = []
  SET i.tags = coalesce(i.tags, []) + [t IN $tags WHERE NOT t IN coalesce(i.tags, [])]
  MERGE (p)-[:HAS_IMAGE]->(i)
}
WITH DISTINCT p
UNWIND $tokens AS r
MATCH (n:ImageTokenNode {prompt: $prompt, pos: r.pos})
SET n.row = r.row, n.col = r.col, n.k = r.k, n.image = $image.sha256,
    n.top_patches = r.top_patches, n.top_weights = r.top_weights, n.patch_cols = r.patch_cols
"""

EXPORT_IMAGE_TOKENS = """
MATCH (n:ImageTokenNode {prompt: $id})
RETURN n.pos AS pos, n.row AS row, n.col AS col, n.k AS k
ORDER BY k
"""

# Prompts whose image carries the tag (the tag filter of the named queries).
PROMPTS_WITH_IMAGE_TAG = """
MATCH (p:Prompt)-[:HAS_IMAGE]->(i:Image) WHERE p.complete AND $tag IN i.tags
RETURN p.id AS prompt
"""

# Paths from image soft tokens (any, or those in a box of grid cells) to a target: the text
# paths' plan, starting from the image-token nodes of the prompts that contain the target.
_IMAGE_PATHS_TEMPLATE = """
MATCH (b0:Node) WHERE b0.ref IN $to_refs AND b0.kind = $to_kind AND b0.prompt IS NOT NULL
  AND ($prompt_ids IS NULL OR b0.prompt IN $prompt_ids)
WITH collect(DISTINCT b0.prompt) AS prompts
MATCH (a:ImageTokenNode)
WHERE a.prompt IN prompts
  AND a.row >= $row0 AND a.row <= $row1 AND a.col >= $col0 AND a.col <= $col1
  AND ($tag IS NULL OR EXISTS {
        MATCH (:Prompt {id: a.prompt})-[:HAS_IMAGE]->(i:Image) WHERE $tag IN i.tags })
CALL (a) {
  MATCH p = (a) ((u:Node)-[e:EDGE WHERE abs(e.w) >= $min_weight]->(v:Node)){1,__H__} (b:Node)
  WHERE b.ref IN $to_refs AND b.kind = $to_kind
  RETURN p
}
RETURN a.prompt AS prompt,
       [n IN nodes(p) | n.id] AS nodes,
       [n IN nodes(p) | CASE WHEN n.kind = 'image'
                             THEN 'image:' + toString(n.row) + ',' + toString(n.col)
                             ELSE coalesce(n.ref, n.kind + ':' + toString(n.layer)) END] AS refs,
       [r IN relationships(p) | r.w] AS weights
LIMIT $cap
"""

IMAGE_PATHS: dict[int, str] = {
    h: _IMAGE_PATHS_TEMPLATE.replace("__H__", str(h)) for h in range(1, PATHS_MAX_HOPS + 1)
}

# Which image regions feed a feature, over every prompt: the direct edges from image soft tokens
# into the feature's instances, grouped by image and grid cell, with the cell's rollout summary.
IMAGE_REGIONS = """
MATCH (f:Feature) WHERE f.fid IN $refs
MATCH (f)<-[:OF]-(n:FeatureNode)
MATCH (a:ImageTokenNode)-[e:EDGE]->(n)
WHERE $tag IS NULL OR EXISTS {
        MATCH (:Prompt {id: a.prompt})-[:HAS_IMAGE]->(i:Image) WHERE $tag IN i.tags }
WITH a.image AS image, a.row AS row, a.col AS col, e.w AS w, a.prompt AS prompt,
     a.top_patches AS top_patches, a.top_weights AS top_weights, a.patch_cols AS patch_cols
RETURN image, row, col, count(DISTINCT prompt) AS n_prompts, count(*) AS n_edges,
       sum(w) AS sum_w, max(w) AS max_w, head(collect(top_patches)) AS top_patches,
       head(collect(top_weights)) AS top_weights, head(collect(patch_cols)) AS patch_cols
ORDER BY abs(sum_w) DESC, image, row, col LIMIT $limit
"""

# Top activations of each feature at image soft tokens (annotation): image, cell and prompt.
TOP_IMAGE_ACTIVATIONS = """
UNWIND $fids AS fid
MATCH (f:Feature {fid: fid})
CALL (f) {
  MATCH (f)<-[:OF]-(n:FeatureNode)
  MATCH (a:ImageTokenNode {prompt: n.prompt, pos: n.pos})
  WITH n, a ORDER BY n.activation DESC LIMIT $limit
  RETURN collect({prompt: n.prompt, pos: n.pos, activation: n.activation, image: a.image,
                  row: a.row, col: a.col, k: a.k}) AS top
}
RETURN f.fid AS fid, top
"""

SET_FEATURE_IMAGE_LABELS = """
UNWIND $rows AS r
MATCH (f:Feature {fid: r.fid})
SET f.top_image_regions = r.regions, f.top_image_values = r.values,
    f.top_image_prompts = r.prompts
"""
# =========================================================================== end of images section

# =========================================================================== interventions
# (:Intervention {id, spec (JSON), created_at, kl, top (JSON), predicted (JSON), n_edits, ...})
#     -[:ON]->(:Prompt)  -[:DONOR]->(:Prompt)  -[:TOUCHES]->(:Feature)  -[:TOUCHES]->(:Supernode)
# (:SteeringVector {name, layer, token_rule, vector, positive, negative, ...})
#     -[:CLOSE_TO {cosine, rank}]->(:Feature)   -[:PROJECTS {projection}]->(:Prompt)

# One intervention run: MERGE on the spec's content hash (a re-run updates the same node), its
# links to the prompts (when stored) and to what it touched (features only when they exist).
STORE_INTERVENTION = """
MERGE (i:Intervention {id: $id})
ON CREATE SET i.created_at = $now
SET i.spec = $spec, i.kl = $kl, i.top = $top, i.watch = $watch, i.predicted = $predicted,
    i.measured = $measured, i.prompt_id = $prompt_id, i.prompt = $prompt,
    i.supernode = $supernode, i.multiplier = $multiplier, i.n_edits = $n_edits,
    i.updated_at = $now
WITH i
OPTIONAL MATCH (p:Prompt {id: $prompt_id})
FOREACH (_ IN CASE WHEN p IS NULL THEN [] ELSE [1] END | MERGE (i)-[:ON]->(p))
WITH i
OPTIONAL MATCH (d:Prompt {id: $donor_id})
FOREACH (_ IN CASE WHEN d IS NULL THEN [] ELSE [1] END | MERGE (i)-[:DONOR]->(d))
WITH i
OPTIONAL MATCH (s:Supernode {name: $supernode})
FOREACH (_ IN CASE WHEN s IS NULL THEN [] ELSE [1] END | MERGE (i)-[:TOUCHES]->(s))
WITH i
UNWIND (CASE WHEN size($fids) = 0 THEN [null] ELSE $fids END) AS fid
OPTIONAL MATCH (f:Feature {fid: fid})
FOREACH (_ IN CASE WHEN f IS NULL THEN [] ELSE [1] END | MERGE (i)-[:TOUCHES]->(f))
RETURN count(DISTINCT i) AS stored
"""

# interventions on one supernode across prompts, with their effect sizes
INTERVENTIONS_ON_SUPERNODE = """
MATCH (i:Intervention)-[:TOUCHES]->(:Supernode {name: $name})
RETURN i.id AS id, i.prompt_id AS prompt_id, i.prompt AS prompt, i.supernode AS supernode,
       i.multiplier AS multiplier,
       i.kl AS kl, i.top AS top, i.watch AS watch, i.predicted AS predicted,
       i.created_at AS created_at
ORDER BY i.kl DESC, i.id
"""

# every stored intervention (newest first), for `atlas query interventions` without a supernode
LIST_INTERVENTIONS = """
MATCH (i:Intervention)
RETURN i.id AS id, i.prompt_id AS prompt_id, i.prompt AS prompt, i.supernode AS supernode,
       i.multiplier AS multiplier, i.kl AS kl, i.n_edits AS n_edits, i.created_at AS created_at
ORDER BY i.created_at DESC, i.id
LIMIT $limit
"""

# stored interventions by their ids (what a job of interventions produced)
INTERVENTIONS_BY_ID = """
UNWIND $ids AS id
MATCH (i:Intervention {id: id})
RETURN i.id AS id, i.prompt_id AS prompt_id, i.prompt AS prompt, i.supernode AS supernode,
       i.multiplier AS multiplier, i.kl AS kl, i.top AS top, i.watch AS watch,
       i.predicted AS predicted, i.created_at AS created_at
"""

COUNT_INTERVENTIONS = "MATCH (i:Intervention {id: $id}) RETURN count(i) AS n"
# =========================================================================== end of interventions section

# =========================================================================== faithfulness
# (:FaithfulnessReport {prompt_id, spearman, log_log_pearson, n_sources, n_pairs, sources (JSON),
#     logit_influence, kl, created_at})-[:OF]->(:Prompt)      one per prompt (MERGE on prompt_id)
STORE_FAITHFULNESS = """
MERGE (r:FaithfulnessReport {prompt_id: $prompt_id})
SET r.prompt = $prompt, r.spearman = $spearman, r.log_log_pearson = $log_log_pearson,
    r.n_sources = $n_sources, r.n_pairs = $n_pairs, r.sources = $sources,
    r.logit_influence = $logit_influence, r.kl = $kl, r.created_at = $now
WITH r
OPTIONAL MATCH (p:Prompt {id: $prompt_id})
FOREACH (_ IN CASE WHEN p IS NULL THEN [] ELSE [1] END | MERGE (r)-[:OF]->(p))
RETURN r.prompt_id AS prompt_id
"""

# the faithfulness table of a prompt set (every report when $prompt_ids is null)
FAITHFULNESS_TABLE = """
MATCH (r:FaithfulnessReport)
WHERE $prompt_ids IS NULL OR r.prompt_id IN $prompt_ids
RETURN r.prompt_id AS prompt_id, r.prompt AS prompt, r.spearman AS spearman,
       r.log_log_pearson AS log_log_pearson, r.n_sources AS n_sources, r.n_pairs AS n_pairs,
       r.created_at AS created_at
ORDER BY r.prompt_id
"""
# =========================================================================== end of faithfulness section

# =========================================================================== steering vectors
# (:SteeringVector {name, model, transcoders, tset, layer, token_rule, vector, norm, positive,
#     negative, close (JSON), projections (JSON: prompt text -> projection), created_at})
#     -[:CLOSE_TO {cosine, rank}]->(:Feature)     its closest decoder directions, when stored
STORE_VECTOR = """
MERGE (v:SteeringVector {name: $name})
SET v.model = $model, v.transcoders = $transcoders, v.tset = $tset, v.layer = $layer,
    v.token_rule = $token_rule, v.vector = $vector, v.norm = $norm, v.positive = $positive,
    v.negative = $negative, v.close = $close, v.projections = $projections, v.created_at = $now
WITH v
OPTIONAL MATCH (v)-[old:CLOSE_TO]->()
DELETE old
WITH DISTINCT v
UNWIND (CASE WHEN size($fids) = 0 THEN [null] ELSE $fids END) AS c
OPTIONAL MATCH (f:Feature {fid: c.fid})
FOREACH (_ IN CASE WHEN f IS NULL THEN [] ELSE [1] END |
  MERGE (v)-[r:CLOSE_TO]->(f) SET r.cosine = c.cosine, r.rank = c.rank)
RETURN count(DISTINCT v) AS stored
"""

GET_VECTOR = "MATCH (v:SteeringVector {name: $name}) RETURN properties(v) AS v"

SET_VECTOR_PROJECTIONS = """
MATCH (v:SteeringVector {name: $name}) SET v.projections = $projections RETURN v.name AS name
"""

LIST_VECTORS = """
MATCH (v:SteeringVector)
RETURN v.name AS name, v.layer AS layer, v.token_rule AS token_rule, v.norm AS norm,
       size(v.positive) AS n_positive, size(v.negative) AS n_negative, v.model AS model
ORDER BY v.name
"""

# the atlas features closest to a vector (by decoder cosine)
VECTOR_CLOSE_FEATURES = """
MATCH (:SteeringVector {name: $name})-[r:CLOSE_TO]->(f:Feature)
RETURN f.fid AS fid, f.label AS label, r.cosine AS cosine, r.rank AS rank
ORDER BY r.rank
"""
# =========================================================================== end of steering vectors section

# =========================================================================== web page (atlas serve)
# Reads behind the page's lists and panels (atlas.web). Every list takes $offset and $limit
# (bounded by the caller); filters are parameters, null meaning "any".

# Prompts, newest first: text search (case-insensitive substring), model, job, answer (the text
# of the prompt's most probable logit, whitespace-stripped).
WEB_PROMPTS = """
MATCH (p:Prompt) WHERE p.complete
  AND ($q IS NULL OR toLower(p.text) CONTAINS toLower($q))
  AND ($model IS NULL OR p.model = $model)
  AND ($job IS NULL OR EXISTS { MATCH (i:JobItem {job_id: $job}) WHERE i.prompt_id = p.id })
CALL (p) {
  OPTIONAL MATCH (l:Node:LogitNode {prompt: p.id})
  WITH l ORDER BY l.logit_prob DESC LIMIT 1
  OPTIONAL MATCH (l)-[:OF]->(t:Token)
  RETURN t.text AS answer, l.logit_prob AS answer_prob
}
WITH p, answer, answer_prob
WHERE $answer IS NULL OR trim(answer) = $answer
RETURN p.id AS id, left(p.text, $text_chars) AS text, p.model AS model, p.n_nodes AS n_nodes,
       p.n_edges AS n_edges, p.replacement_score AS replacement_score,
       p.completeness_score AS completeness_score, answer, answer_prob,
       p.image_sha256 IS NOT NULL AS has_image
ORDER BY p.ingested_at DESC, p.id
SKIP $offset LIMIT $limit
"""

# The models of the stored prompts (the page's model filter).
WEB_MODELS = """
MATCH (p:Prompt) WHERE p.complete
RETURN p.model AS model, count(*) AS n_prompts ORDER BY model
"""

# One prompt's head: text, tokens, sizes, scores, image.
WEB_PROMPT = """
MATCH (p:Prompt {id: $id}) WHERE p.complete
OPTIONAL MATCH (p)-[:HAS_IMAGE]->(i:Image)
RETURN p.id AS id, left(p.text, $text_chars) AS text, p.tokens[..$max_tokens] AS tokens,
       size(p.tokens) AS n_tokens, p.model AS model, p.tset AS tset, p.n_nodes AS n_nodes,
       p.n_edges AS n_edges, p.n_edges_total AS n_edges_total,
       p.replacement_score AS replacement_score, p.completeness_score AS completeness_score,
       p.created_at AS created_at, i.sha256 AS image, i.tags AS image_tags, i.width AS width,
       i.height AS height
"""

# A prompt's logits, most probable first.
WEB_PROMPT_LOGITS = """
MATCH (l:Node:LogitNode {prompt: $id})
OPTIONAL MATCH (l)-[:OF]->(t:Token)
RETURN l.id AS id, l.token_id AS token_id, t.text AS text, l.logit_prob AS prob
ORDER BY prob DESC, id LIMIT $limit
"""

# One node of a prompt, its global feature or token, and its strongest inputs and outputs.
WEB_NODE = """
MATCH (n:Node {prompt: $prompt, id: $node})
OPTIONAL MATCH (n)-[:OF]->(f:Feature)
OPTIONAL MATCH (n)-[:OF]->(t:Token)
CALL (n) {
  MATCH (s:Node)-[e:EDGE]->(n)
  WITH s, e ORDER BY abs(e.w) DESC, s.id LIMIT $limit
  OPTIONAL MATCH (s)-[:OF]->(x)
  RETURN collect({id: s.id, kind: s.kind, w: e.w, label: coalesce(x.label, x.text)}) AS inputs
}
CALL (n) {
  MATCH (n)-[e:EDGE]->(d:Node)
  WITH d, e ORDER BY abs(e.w) DESC, d.id LIMIT $limit
  OPTIONAL MATCH (d)-[:OF]->(x)
  RETURN collect({id: d.id, kind: d.kind, w: e.w, label: coalesce(x.label, x.text)}) AS outputs
}
RETURN n.id AS id, n.kind AS kind, n.layer AS layer, n.pos AS pos, n.feature AS feature,
       n.token_id AS token_id, n.activation AS activation, n.influence AS influence,
       n.logit_prob AS logit_prob, f.fid AS fid, f.label AS label, t.text AS token_text,
       n.row AS image_row, n.col AS image_col, n.k AS image_k, inputs, outputs
"""

# Features by label (case-insensitive substring) and layer, most widespread first.
WEB_FEATURES = """
MATCH (f:Feature)
WHERE ($q IS NULL OR toLower(coalesce(f.label, '')) CONTAINS toLower($q))
  AND ($layer IS NULL OR f.layer = $layer)
RETURN f.fid AS fid, f.layer AS layer, f.index AS index, f.label AS label,
       f.n_prompts AS n_prompts, f.max_act AS max_act
ORDER BY f.n_prompts DESC, f.fid SKIP $offset LIMIT $limit
"""

# One stored intervention, every property (JSON ones decoded by the caller).
WEB_INTERVENTION = "MATCH (i:Intervention {id: $id}) RETURN properties(i) AS props"

# Stored properties of features by id (``atlas export viewer``'s feature files).
WEB_EXPORT_FEATURES = """
UNWIND $fids AS fid
MATCH (f:Feature {fid: fid})
RETURN f.fid AS fid, f.layer AS layer, f.index AS index, f.label AS label,
       f.top_tokens AS top_tokens, f.bottom_tokens AS bottom_tokens, f.max_act AS max_act,
       f.n_prompts AS n_prompts
"""
# =========================================================================== end of web page section

# =========================================================================== atlas questions
# Prompt filters (atlas.store.prompt_filter), supernode proposals (atlas.store.proposals), global
# circuits (atlas.store.global_circuit) and contrasts (atlas.store.contrast). Node keys used by
# the global and contrastive questions: ``kind|ref`` (``feature|<fid>``, ``token|<tid>``,
# ``logit|<tid>``), ``image:ROW,COL`` for an image soft token, ``@from`` / ``@to`` for the ends.

PF_ALL_PROMPTS = "MATCH (p:Prompt) WHERE p.complete RETURN p.id AS id"

PF_PROMPT_TEXTS = "MATCH (p:Prompt) WHERE p.complete RETURN p.id AS id, p.text AS text"

# The model's answer of each prompt: the token of its logit node of highest probability.
PF_ANSWERS = """
UNWIND $ids AS pid
CALL (pid) {
  MATCH (l:Node {prompt: pid}) WHERE l.kind = 'logit'
  RETURN l ORDER BY l.logit_prob DESC LIMIT 1
}
OPTIONAL MATCH (l)-[:OF]->(t:Token)
RETURN pid AS id, t.text_norm AS answer, l.logit_prob AS prob
"""

PF_TAGGED = """
MATCH (p:Prompt)-[:HAS_IMAGE]->(i:Image) WHERE p.complete AND $tag IN i.tags
RETURN DISTINCT p.id AS id
"""

PF_JOB_EXISTS = "MATCH (j:Job {id: $job_id}) RETURN j.id AS id"

PF_JOB_PROMPTS = """
MATCH (i:JobItem {job_id: $job_id}) WHERE i.state = 'done' AND i.prompt_id IS NOT NULL
MATCH (p:Prompt {id: i.prompt_id}) WHERE p.complete
RETURN DISTINCT p.id AS id
"""

PF_SUPERNODE_PROMPTS = """
MATCH (:Supernode {name: $name})-[:HAS]->(f:Feature)
WITH collect(f.fid) AS refs
MATCH (n:Node) WHERE n.ref IN refs AND n.kind = 'feature' AND n.prompt IS NOT NULL
RETURN DISTINCT n.prompt AS id
"""

# ---- proposals
# one record per prompt (lists, not a record per instance: the driver's cost is per record)
PROP_FEATURE_INSTANCES = """
UNWIND $ids AS pid
MATCH (n:Node {prompt: pid}) WHERE n.kind = 'feature'
RETURN pid AS prompt, collect(n.ref) AS refs, collect(n.pos) AS pos
"""

PROP_AGG_OUT = """
UNWIND $fids AS fid
MATCH (a:Feature {fid: fid})-[g:AGG]->(b:Feature)
WHERE g.n_prompts >= $min_pair
RETURN a.fid AS s, b.fid AS t, g.n_prompts AS n, g.sum_w AS sum_w
"""

PROP_AGG_IN = """
UNWIND $fids AS fid
MATCH (b:Feature {fid: fid})<-[g:AGG]-(a:Feature)
WHERE g.n_prompts >= $min_pair
RETURN a.fid AS s, b.fid AS t, g.n_prompts AS n, g.sum_w AS sum_w
"""

PROP_FEATURE_META = """
UNWIND $fids AS fid
MATCH (f:Feature {fid: fid})
RETURN f.fid AS fid, f.label AS label, f.layer AS layer, f.index AS index, f.tset AS tset
"""

PROP_DELETE_PROPOSED = """
MATCH (s:Supernode {kind: 'proposed'})
DETACH DELETE s
RETURN count(*) AS deleted
"""

PROP_SET_SCORES = """
MATCH (s:Supernode {name: $name})
SET s.coactivation = $coactivation, s.coherence = $coherence,
    s.internal_positive = $internal_positive, s.downstream_agreement = $downstream_agreement,
    s.score = $score, s.n_prompts = $n_prompts, s.n_selected = $n_selected,
    s.level = $level, s.parts = $parts, s.proposed_at = datetime()
"""

PROP_SET_VALIDATION = """
MATCH (s:Supernode {name: $name})
SET s.validation_kl = $validation_kl, s.validation_drop = $validation_drop,
    s.validation_prompts = $validation_prompts, s.validation_multiplier = $validation_multiplier
"""

PROP_LIST = """
MATCH (s:Supernode) WHERE $kind IS NULL OR s.kind = $kind
OPTIONAL MATCH (s)-[:HAS]->(f:Feature)
RETURN s.name AS name, s.kind AS kind, count(f) AS n_members, s.score AS score,
       s.coactivation AS coactivation, s.coherence AS coherence, s.n_prompts AS n_prompts,
       s.validation_kl AS validation_kl, s.validation_drop AS validation_drop,
       s.pattern AS pattern, s.level AS level, s.parts AS parts
ORDER BY coalesce(s.level, 1), coalesce(s.score, -1.0) DESC, name
"""

PROP_KIND = "MATCH (s:Supernode {name: $name}) RETURN s.kind AS kind"

# names a new run of proposals must not take: every supernode that is not a proposal
PROP_TAKEN_NAMES = """
MATCH (s:Supernode) WHERE coalesce(s.kind, '') <> 'proposed'
RETURN collect(s.name) AS names
"""

PROP_ACCEPT = """
MATCH (s:Supernode {name: $name}) WHERE s.kind = 'proposed'
SET s.name = $new_name, s.kind = 'accepted', s.accepted_at = datetime()
"""

PROP_REJECT = """
MATCH (s:Supernode {name: $name}) WHERE s.kind = 'proposed'
DETACH DELETE s
"""

# The prompts where a supernode's members are most active (validation runs there), with the
# prompt's image (sha256, or null) and model depth (the constrained range covers every layer).
PROP_TOP_PROMPTS = """
MATCH (:Supernode {name: $name})-[:HAS]->(f:Feature)
WITH collect(f.fid) AS refs
MATCH (n:Node) WHERE n.ref IN refs AND n.kind = 'feature' AND n.prompt IS NOT NULL
WITH n.prompt AS prompt, sum(n.activation) AS total
MATCH (p:Prompt {id: prompt}) WHERE p.complete
OPTIONAL MATCH (p)-[:USES_MODEL]->(m:Model)
RETURN prompt, p.text AS text, p.image_sha256 AS image, m.n_layers AS n_layers, total
ORDER BY total DESC, prompt LIMIT $limit
"""

# ---- global circuits
# A node's key with the ends collapsed: ``$from_keys`` / ``$to_keys`` are ``kind|ref`` keys, and
# ``$from_box`` a ``[row0, row1, col0, col1]`` box of image cells (or null).
_GC_KEY = """CASE
  WHEN __N__.kind = 'image' AND $from_box IS NOT NULL
       AND __N__.row >= $from_box[0] AND __N__.row <= $from_box[1]
       AND __N__.col >= $from_box[2] AND __N__.col <= $from_box[3] THEN '@from'
  WHEN __N__.kind + '|' + coalesce(__N__.ref, '') IN $from_keys THEN '@from'
  WHEN __N__.kind + '|' + coalesce(__N__.ref, '') IN $to_keys THEN '@to'
  WHEN __N__.kind = 'image' THEN 'image:' + toString(__N__.row) + ',' + toString(__N__.col)
  ELSE __N__.kind + '|' + coalesce(__N__.ref, '') END"""

# Per (source key, target key): prompts with an edge, summed weight (each prompt's edges between
# the two summed first), target-activation-weighted sum (TWERA's numerator) and summed |w|. One
# record of parallel lists per chunk of prompts (the driver's cost is per record).
GC_PAIR_STATS = (
    """
UNWIND $ids AS pid
MATCH (a:Node {prompt: pid})-[e:EDGE]->(b:Node)
WHERE a.kind <> 'error'
WITH pid, e.w AS w, b.activation AS act, """
    + _GC_KEY.replace("__N__", "a")
    + """ AS s, """
    + _GC_KEY.replace("__N__", "b")
    + """ AS t
WHERE s <> t
WITH pid, s, t, sum(w) AS w, max(coalesce(act, 1.0)) AS act
WITH s, t, count(*) AS n, sum(w) AS sum_w, sum(w * act) AS sum_tw, sum(abs(w)) AS sum_abs
RETURN collect(s) AS s, collect(t) AS t, collect(n) AS n, collect(sum_w) AS sum_w,
       collect(sum_tw) AS sum_tw, collect(sum_abs) AS sum_abs
"""
)

# Per node key: prompts where it is present and the sum of its per-prompt largest activation
# (TWERA's denominator; 1.0 for nodes without an activation); parallel lists, as above.
GC_NODE_STATS = (
    """
UNWIND $ids AS pid
MATCH (n:Node {prompt: pid}) WHERE n.kind <> 'error'
WITH pid, n.activation AS act, """
    + _GC_KEY.replace("__N__", "n")
    + """ AS key
WITH pid, key, max(coalesce(act, 1.0)) AS act
WITH key, count(*) AS n, sum(act) AS sum_act
RETURN collect(key) AS key, collect(n) AS n, collect(sum_act) AS sum_act
"""
)

# Prompts with an instance of an end (refs of one kind), or with image tokens in a box.
GC_END_PROMPTS = """
MATCH (n:Node) WHERE n.ref IN $refs AND n.kind = $kind AND n.prompt IS NOT NULL
RETURN DISTINCT n.prompt AS id
"""

GC_IMAGE_PROMPTS = """
MATCH (a:ImageTokenNode)
WHERE a.row >= $box[0] AND a.row <= $box[1] AND a.col >= $box[2] AND a.col <= $box[3]
RETURN DISTINCT a.prompt AS id
"""

# Display names of node keys' global entities (features and tokens by ref).
GC_REF_NAMES = """
UNWIND $refs AS ref
OPTIONAL MATCH (t:Token {tid: ref})
OPTIONAL MATCH (f:Feature {fid: ref})
RETURN ref, t.text AS token, f.layer AS layer, f.index AS index, f.label AS label
"""

# ---- contrasts
# Each prompt's features (largest activation over positions).
CT_FEATURES = """
UNWIND $ids AS pid
MATCH (n:Node {prompt: pid}) WHERE n.kind = 'feature'
RETURN n.ref AS ref, pid AS prompt, max(n.activation) AS act
"""

# Each prompt's edges between features and from features to logits (summed over positions).
CT_EDGES = """
UNWIND $ids AS pid
MATCH (a:Node {prompt: pid})-[e:EDGE]->(b:Node)
WHERE a.kind = 'feature' AND b.kind IN ['feature', 'logit'] AND abs(e.w) >= $min_weight
RETURN a.kind + '|' + a.ref AS s, b.kind + '|' + b.ref AS t, pid AS prompt, sum(e.w) AS w
"""
# =========================================================================== end of atlas questions
