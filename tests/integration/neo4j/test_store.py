"""The atlas in a real Neo4j: round trip, idempotence, aggregates, paths oracle, faults."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import neo4j
import pytest
import torch

from atlas.errors import CypherRefused, InputError
from atlas.graph import Graph, NodeKind
from atlas.store import queries as Q
from atlas.store import read, supernodes
from atlas.store.cypher import run_cypher
from atlas.store.ingest import feature_ref, graph_rows, ingest_graph, ingest_path, ingest_rows
from atlas.store.schema import apply_schema
from atlas.store.synthetic import synthetic_graph, word
from tests import REPO_ROOT

pytestmark = pytest.mark.timeout(600)

REPO = REPO_ROOT


def small(seed: int, **kw: Any) -> Graph:
    """A small synthetic graph with features that recur across prompts."""
    args: dict[str, Any] = {
        "n_layers": 4,
        "n_pos": 6,
        "n_features": 40,
        "n_logits": 3,
        "n_edges": 300,
        "feature_pool": 30,
        "vocab_size": 12,
    }
    args.update(kw)
    return synthetic_graph(seed, **args)


def counts(driver: neo4j.Driver) -> dict[str, Any]:
    """A fingerprint of the whole database (labels, relationship types, aggregate sums)."""
    rec = driver.execute_query(
        "CALL () { MATCH (n) RETURN count(n) AS nodes } "
        "CALL () { MATCH ()-[r]->() RETURN count(r) AS rels } "
        "CALL () { MATCH ()-[g:AGG]->() RETURN sum(g.n_prompts) AS agg_n, sum(g.sum_w) AS agg_w } "
        "CALL () { MATCH (f:Feature) RETURN sum(f.n_prompts) AS feat_n } "
        "RETURN nodes, rels, agg_n, agg_w, feat_n"
    ).records[0]
    return rec.data()


# --------------------------------------------------------------------------- oracles
def oracle_agg(graphs: list[Graph]) -> dict[tuple[str, str], tuple[int, float, float, float]]:
    """(n_prompts, sum, max, min) of the per-prompt summed weight of every feature pair."""
    per: dict[tuple[str, str], list[float]] = defaultdict(list)
    for g in graphs:
        tset = g.metadata.transcoders.content_hash
        pair_w: dict[tuple[str, str], float] = defaultdict(float)
        for t, s, w in zip(
            g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True
        ):
            if g.kind[s] == NodeKind.FEATURE and g.kind[t] == NodeKind.FEATURE:
                key = (
                    feature_ref(tset, int(g.layer[s]), int(g.feature[s])),
                    feature_ref(tset, int(g.layer[t]), int(g.feature[t])),
                )
                pair_w[key] += w
        for key, w in pair_w.items():
            per[key].append(w)
    return {k: (len(v), sum(v), max(v), min(v)) for k, v in per.items()}


def stored_agg(driver: neo4j.Driver) -> dict[tuple[str, str], tuple[int, float, float, float]]:
    recs = driver.execute_query(
        "MATCH (a:Feature)-[g:AGG]->(b:Feature) "
        "RETURN a.fid AS s, b.fid AS t, g.n_prompts AS n, g.sum_w AS sw, g.max_w AS mx, g.min_w AS mn"
    ).records
    return {(r["s"], r["t"]): (r["n"], r["sw"], r["mx"], r["mn"]) for r in recs}


def assert_agg_equal(driver: neo4j.Driver, graphs: list[Graph]) -> None:
    want = oracle_agg(graphs)
    got = stored_agg(driver)
    assert set(got) == set(want)
    for key, (n, sw, mx, mn) in want.items():
        gn, gsw, gmx, gmn = got[key]
        assert gn == n
        assert gsw == pytest.approx(sw, abs=1e-5)
        assert gmx == pytest.approx(mx, abs=1e-6)
        assert gmn == pytest.approx(mn, abs=1e-6)


def _matches(g: Graph, i: int, spec: str, members: set[tuple[int, int]] | None = None) -> bool:
    kind, _, arg = spec.partition(":")
    k = int(g.kind[i])
    if kind == "feature":
        layer, index = (int(x) for x in arg.split("/"))
        return k == NodeKind.FEATURE and int(g.layer[i]) == layer and int(g.feature[i]) == index
    if kind == "supernode":
        return k == NodeKind.FEATURE and (int(g.layer[i]), int(g.feature[i])) in (members or set())
    want = NodeKind.TOKEN if kind == "token" else NodeKind.LOGIT
    return k == want and word(int(g.token_id[i])).strip() == arg.strip()


def oracle_paths(
    graphs: list[Graph],
    src: str,
    dst: str,
    max_hops: int,
    min_weight: float,
    members: set[tuple[int, int]] | None = None,
) -> set[tuple[str, tuple[str, ...], tuple[float, ...]]]:
    """Independent path enumeration: DFS over each graph's edges (source -> target)."""
    out = set()
    for g in graphs:
        ids = g.node_ids()
        adj: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for t, s, w in zip(
            g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True
        ):
            if abs(w) >= min_weight:
                adj[s].append((t, w))
        starts = [i for i in range(g.n_nodes) if _matches(g, i, src, members)]

        def dfs(
            node: int,
            path: list[int],
            weights: list[float],
            g: Graph = g,
            ids: list[str] = ids,
            adj: Any = adj,
        ) -> None:
            if len(weights) >= max_hops:
                return
            for nxt, w in adj.get(node, []):
                p2, w2 = [*path, nxt], [*weights, w]
                if _matches(g, nxt, dst, members):
                    out.add(
                        (g.prompt_id, tuple(ids[j] for j in p2), tuple(round(x, 5) for x in w2))
                    )
                dfs(nxt, p2, w2)

        for s0 in starts:
            dfs(s0, [s0], [])
    return out


def got_paths(result: dict[str, Any]) -> set[tuple[str, tuple[str, ...], tuple[float, ...]]]:
    return {
        (p["prompt"], tuple(p["nodes"]), tuple(round(x, 5) for x in p["weights"]))
        for p in result["paths"]
    }


# --------------------------------------------------------------------------- tests
def test_round_trip_artifact_and_json(db: neo4j.Driver, tmp_path: Path) -> None:
    from atlas.interchange import graph_from_json

    g = synthetic_graph(7, n_features=120, n_edges=1500)
    g.influence[3] = float("nan")  # NaN influence survives as NaN
    path = g.save(tmp_path / "g.safetensors")
    res = ingest_path(db, path, batch_size=500)
    assert res.created and res.n_edges == g.n_edges
    back, _ = read.export_graph(db, g.prompt_id)
    assert back.metadata == g.metadata
    assert back.node_ids() == g.node_ids()
    for col in ("kind", "layer", "pos", "feature", "token_id", "input_ids"):
        assert torch.equal(getattr(back, col), getattr(g, col)), col
    for col in ("activation", "influence", "logit_prob"):
        assert torch.allclose(getattr(back, col), getattr(g, col), atol=1e-6, equal_nan=True), col
    assert torch.allclose(back.dense_adjacency(), g.dense_adjacency(), atol=1e-6)
    assert back.n_edges == g.n_edges

    doc = read.export_json(db, g.prompt_id[:8])
    again = graph_from_json(json.loads(json.dumps(doc)))
    assert again.prompt_id == g.prompt_id
    assert torch.allclose(again.dense_adjacency(), g.dense_adjacency(), atol=1e-6)


def test_json_import_is_the_same_prompt(db: neo4j.Driver, tmp_path: Path) -> None:
    from atlas.interchange import write_json

    g = small(3)
    p = write_json(g, tmp_path / "g.json")
    assert ingest_path(db, p).created
    assert not ingest_graph(db, g).created  # same content hash: nothing new
    assert counts(db)["nodes"] > 0


def test_ingest_twice_changes_nothing(db: neo4j.Driver) -> None:
    graphs = [small(s) for s in range(4)]
    for g in graphs:
        assert ingest_graph(db, g, batch_size=64).created
    before = counts(db)
    for g in graphs:
        assert not ingest_graph(db, g, batch_size=64).created
    assert counts(db) == before
    assert_agg_equal(db, graphs)
    n = db.execute_query("MATCH (p:Prompt) WHERE p.complete RETURN count(p) AS n").records[0]["n"]
    assert n == 4


def test_concurrent_ingesters(db: neo4j.Driver) -> None:
    # a small feature space: the prompts share feature pairs, so ingesters race on aggregates
    graphs = [small(s, d_transcoder=8, feature_pool=8) for s in range(10, 18)]
    errors: list[BaseException] = []

    def worker(order: list[Graph]) -> None:
        try:
            for g in order:
                ingest_graph(db, g, batch_size=50)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [
        threading.Thread(target=worker, args=(graphs,)),
        threading.Thread(target=worker, args=(graphs[::-1],)),
        threading.Thread(target=worker, args=(graphs[2:] + graphs[:2],)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    n_nodes = db.execute_query("MATCH (n:Node) RETURN count(n) AS n").records[0]["n"]
    assert n_nodes == sum(g.n_nodes for g in graphs)
    n_edges = db.execute_query("MATCH ()-[e:EDGE]->() RETURN count(e) AS n").records[0]["n"]
    assert n_edges == sum(g.n_edges for g in graphs)
    assert_agg_equal(db, graphs)
    dup = db.execute_query(
        "MATCH (a)-[g:AGG]->(b) WITH a, b, count(g) AS n WHERE n > 1 RETURN count(*) AS n"
    ).records[0]["n"]
    assert dup == 0
    shared = db.execute_query("MATCH ()-[g:AGG]->() WHERE g.n_prompts > 1 RETURN count(g) AS n")
    assert shared.records[0]["n"] > 0


_KILL_SCRIPT = r"""
import sys, time
import neo4j
from atlas.store import ingest
from atlas.store.synthetic import synthetic_graph

class SlowTx:
    # Announces each statement as it starts: when statement k starts, the caller has consumed
    # statement k - 1, so the server has executed it inside the still-open transaction.
    def __init__(self, tx):
        self.tx, self.n = tx, 0
    def run(self, *args, **kwargs):
        self.n += 1
        print("RUN", self.n, flush=True)
        time.sleep(0.05)
        return self.tx.run(*args, **kwargs)

orig = ingest.write_prompt
ingest.write_prompt = lambda tx, rows, batch: orig(SlowTx(tx), rows, batch)
drv = neo4j.GraphDatabase.driver(sys.argv[1])
ingest.ingest_graph(drv, synthetic_graph(int(sys.argv[2]), n_features=200, n_edges=3000), batch_size=100)
print("DONE", flush=True)
"""

#: Statements run before the kill: the claim, the nodes with the first edge chunk, then edge
#: chunks; killed while the 6th starts, the transaction holds nodes and edges but is not done.
_KILL_AFTER_RUNS = 6


def test_killed_ingester_leaves_nothing_and_retry_completes(
    db: neo4j.Driver, neo4j_uri: str
) -> None:
    g0 = small(1)
    ingest_graph(db, g0)
    before = counts(db)
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILL_SCRIPT, neo4j_uri, "99"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout is not None
    seen = 0
    for line in proc.stdout:
        seen += line.startswith("RUN")
        if seen >= _KILL_AFTER_RUNS:  # nodes and some edges written, transaction still open
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert seen >= _KILL_AFTER_RUNS
    g = synthetic_graph(99, n_features=200, n_edges=3000)
    # the server rolls the dead client's transaction back: nothing of the prompt is visible
    for _ in range(50):
        if counts(db) == before:
            break
        time.sleep(0.2)
    assert counts(db) == before
    assert not db.execute_query(Q.PROMPT_EXISTS, id=g.prompt_id).records
    assert ingest_graph(db, g).created
    assert not ingest_graph(db, g).created
    n = db.execute_query(
        "MATCH (n:Node {prompt: $id}) RETURN count(n) AS n", id=g.prompt_id
    ).records
    assert n[0]["n"] == g.n_nodes
    assert_agg_equal(db, [g0, g])


def test_paths_agree_with_python_enumeration(db: neo4j.Driver) -> None:
    graphs = [small(s, n_edges=150) for s in range(20, 26)]
    for g in graphs:
        ingest_graph(db, g)
    g = graphs[0]
    feats = [
        (int(g.layer[i]), int(g.feature[i]))
        for i in range(g.n_nodes)
        if g.kind[i] == NodeKind.FEATURE
    ]
    low = min(feats)
    high = max(feats)
    token_text = word(int(g.input_ids[1])).strip()
    logit_text = word(int(g.token_id[g.n_nodes - 1])).strip()
    cases = [
        (f"token:{token_text}", f"logit:{logit_text}", 3, 0.0),
        (f"token:{token_text}", f"logit:{logit_text}", 4, 0.4),
        (f"feature:{low[0]}/{low[1]}", f"logit:{logit_text}", 3, 0.0),
        (f"feature:{low[0]}/{low[1]}", f"feature:{high[0]}/{high[1]}", 4, 0.1),
        (f"token:{token_text}", f"feature:{high[0]}/{high[1]}", 2, 0.0),
    ]
    total = 0
    for src, dst, hops, w in cases:
        result = read.paths(db, src, dst, max_hops=hops, min_weight=w, limit=100_000)
        want = oracle_paths(graphs, src, dst, hops, w)
        assert got_paths(result) == want, (src, dst, hops, w)
        assert not result["truncated"]
        total += len(want)
        for p in result["paths"]:
            assert len(p["weights"]) == len(p["nodes"]) - 1 <= hops
            assert all(abs(x) >= w for x in p["weights"])
            assert p["score"] == pytest.approx(math.prod(p["weights"]))
        assert sum(a["n_paths"] for a in result["aggregate"]) == len(want)
    assert total > 0  # the cases are not all empty

    # a supernode endpoint: any of its member features
    members = set(feats[:5])
    supernodes.define_from_features(db, "early", [f"{a}/{b}" for a, b in members])
    result = read.paths(db, "supernode:early", f"logit:{logit_text}", max_hops=3, limit=100_000)
    assert got_paths(result) == oracle_paths(
        graphs, "supernode:x", f"logit:{logit_text}", 3, 0.0, members
    )


def test_named_queries(db: neo4j.Driver) -> None:
    graphs = [small(s) for s in range(30, 34)]
    for g in graphs:
        ingest_graph(db, g)
    g = graphs[0]
    i = next(i for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE)
    spec = f"feature:{int(g.layer[i])}/{int(g.feature[i])}"
    active = read.active_prompts(db, spec)
    want = {
        h.prompt_id
        for h in graphs
        for j in range(h.n_nodes)
        if h.kind[j] == NodeKind.FEATURE
        and (h.layer[j], h.feature[j]) == (g.layer[i], g.feature[i])
    }
    assert {r["prompt"] for r in active} == want

    logit_text = word(int(g.token_id[g.n_nodes - 1])).strip()
    top = read.top_contributors(db, f"logit:{logit_text}", limit=1000)
    want_sum: dict[str, float] = defaultdict(float)
    for h in graphs:
        logits = {
            j
            for j in range(h.n_nodes)
            if h.kind[j] == NodeKind.LOGIT and word(int(h.token_id[j])).strip() == logit_text
        }
        for t, s, w in zip(
            h.edge_target.tolist(), h.edge_source.tolist(), h.edge_weight.tolist(), strict=True
        ):
            if t in logits:
                want_sum[h.node_ids()[s].split("_")[0] + str(int(h.kind[s]))] += abs(w)
    assert sum(r["sum_abs"] for r in top) == pytest.approx(sum(want_sum.values()), rel=1e-5)

    nb = read.neighbours(db, spec, limit=1000)
    agg = oracle_agg(graphs)
    fid = feature_ref("tset0", int(g.layer[i]), int(g.feature[i]))
    assert len(nb) == sum(1 for (s, t) in agg if fid in (s, t)) + sum(
        1 for (s, t) in agg if s == t == fid
    )

    cmp = read.compare_prompts(db, graphs[0].prompt_id, graphs[1].prompt_id)
    fa = {
        (int(h.layer[j]), int(h.feature[j]))
        for h in graphs[:1]
        for j in range(h.n_nodes)
        if h.kind[j] == NodeKind.FEATURE
    }
    fb = {
        (int(h.layer[j]), int(h.feature[j]))
        for h in graphs[1:2]
        for j in range(h.n_nodes)
        if h.kind[j] == NodeKind.FEATURE
    }
    assert len(cmp["shared_features"]) == len(fa & fb)
    assert len(cmp["only_a"]) == min(len(fa - fb), 50)

    supernodes.define_from_features(db, "A", [f"{a}/{b}" for a, b in sorted(fa)[:10]])
    supernodes.define_from_features(db, "B", [f"{a}/{b}" for a, b in sorted(fa)[10:]])
    sg = read.prompt_supernode_graph(db, graphs[0].prompt_id)
    assert sg and all(r["source"] != r["target"] for r in sg)
    assert any(r["source"] == "supernode:A" for r in sg)


def test_supernode_aggregate_is_exact_and_incremental(db: neo4j.Driver) -> None:
    graphs = [small(s) for s in range(40, 46)]
    for g in graphs[:3]:
        ingest_graph(db, g)
    # members must exist when a supernode is defined: take them from the stored prompts
    pool = sorted(
        {
            (int(g.layer[i]), int(g.feature[i]))
            for g in graphs[:3]
            for i in range(g.n_nodes)
            if g.kind[i] == NodeKind.FEATURE
        }
    )
    a_members, b_members = pool[: len(pool) // 2], pool[len(pool) // 2 :]
    supernodes.define_from_features(db, "low", [f"{x}/{y}" for x, y in a_members])
    supernodes.define_from_features(db, "high", [f"{x}/{y}" for x, y in b_members])
    for g in graphs[3:]:
        ingest_graph(db, g)  # incremental update of SAGG

    def oracle(src: set[tuple[int, int]], dst: set[tuple[int, int]]) -> tuple[int, float]:
        n, total = 0, 0.0
        for g in graphs:
            w_sum, hit = 0.0, False
            for t, s, w in zip(
                g.edge_target.tolist(), g.edge_source.tolist(), g.edge_weight.tolist(), strict=True
            ):
                src_f = (int(g.layer[s]), int(g.feature[s]))
                dst_f = (int(g.layer[t]), int(g.feature[t]))
                is_ff = g.kind[s] == NodeKind.FEATURE and g.kind[t] == NodeKind.FEATURE
                if is_ff and src_f in src and dst_f in dst:
                    w_sum += w
                    hit = True
            if hit:
                n += 1
                total += w_sum
        return n, total

    rows = {r["neighbour"] + r["direction"]: r for r in read.neighbours(db, "supernode:low")}
    n, total = oracle(set(a_members), set(b_members))
    assert rows["highout"]["n_prompts"] == n
    assert rows["highout"]["sum_w"] == pytest.approx(total, abs=1e-5)
    n, total = oracle(set(b_members), set(a_members))
    if n:
        assert rows["highin"]["n_prompts"] == n
        assert rows["highin"]["sum_w"] == pytest.approx(total, abs=1e-5)

    assert {s["name"] for s in supernodes.list_supernodes(db)} == {"low", "high"}
    assert len(supernodes.show(db, "low")["members"]) == len(a_members)
    assert supernodes.delete(db, "low")
    assert not supernodes.delete(db, "low")
    assert not db.execute_query("MATCH ()-[g:SAGG]->() RETURN g").records


def test_supernode_patterns_and_qparams(db: neo4j.Driver, tmp_path: Path) -> None:
    from atlas.interchange import write_json

    g = small(50)
    ingest_graph(db, g)
    db.execute_query(
        "MATCH (f:Feature) WHERE f.layer = 0 SET f.label = 'early ' + toString(f.index), f.top_tokens = [' Austin', ' Paris']"
    )
    n0 = sum(1 for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE and g.layer[i] == 0)
    n_unique = len(
        {
            int(g.feature[i])
            for i in range(g.n_nodes)
            if g.kind[i] == NodeKind.FEATURE and g.layer[i] == 0
        }
    )
    assert n0 > 0
    assert supernodes.define_from_label(db, "early", "early .*") == n_unique
    assert supernodes.define_from_token(db, "says-austin", r"\s*Austin") == n_unique
    with pytest.raises(InputError):
        supernodes.define_from_label(db, "bad", "([unclosed")

    feat_ids = [
        nid for nid, k in zip(g.node_ids(), g.kind.tolist(), strict=True) if k == NodeKind.FEATURE
    ][:3]
    p = write_json(g, tmp_path / "g.json", supernodes=[["from json", *feat_ids]])
    assert supernodes.import_from_json(db, p) == {
        "from json": len({f.rsplit("_", 1)[0] for f in feat_ids})
    }
    doc = read.export_json(db, g.prompt_id)
    assert any(sn[0] == "from json" for sn in doc["qParams"]["supernodes"])


HOSTILE = [
    'x"}) DETACH DELETE n //',
    "'; MATCH (n) DETACH DELETE n; //",
    "`) MATCH (n) DETACH DELETE n //",
    "Robert'); DROP TABLE students;--",
    "$name {name: 1}",
]


def test_hostile_supernode_names_are_data(db: neo4j.Driver) -> None:
    g = small(60)
    ingest_graph(db, g)
    i = next(i for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE)
    before = counts(db)
    for name in HOSTILE:
        assert (
            supernodes.define_from_features(db, name, [f"{int(g.layer[i])}/{int(g.feature[i])}"])
            == 1
        )
    assert {s["name"] for s in supernodes.list_supernodes(db)} == set(HOSTILE)
    for name in HOSTILE:
        assert supernodes.show(db, name)["name"] == name
        assert supernodes.delete(db, name)
    assert counts(db) == before
    for bad in ["", "   ", "a\x00b", "line\nbreak", "x" * 500]:
        with pytest.raises(InputError):
            supernodes.define_from_features(db, bad, [f"{int(g.layer[i])}/{int(g.feature[i])}"])
    assert counts(db) == before


REFUSED = [
    "CREATE (n:Evil)",
    "MATCH (n) DETACH DELETE n",
    "MATCH (n) SET n.x = 1",
    "MERGE (n:Evil {x: 1})",
    "MATCH (n) REMOVE n.prompt",
    "FOREACH (x IN [1] | CREATE (:Evil))",
    "LOAD CSV FROM 'file:///etc/passwd' AS row RETURN row",
    "load csv with headers from 'http://127.0.0.1:1/x.csv' as r return r",
    "CALL db.createLabel('Evil')",
    "CALL dbms.listConfig() YIELD name RETURN name",
    "CALL { CREATE (:Evil) } IN TRANSACTIONS",
    "CREATE INDEX evil FOR (n:Evil) ON (n.x)",
    "DROP CONSTRAINT node_key",
    "CREATE USER evil SET PASSWORD 'abcdefgh'",
    "SHOW USERS",
    "STOP DATABASE neo4j",
    "MATCH (n) RETURN n; MATCH (m) DETACH DELETE m",
    "EXPLAIN MATCH (n) RETURN n",
    "",
]


def test_raw_cypher_is_read_only(db: neo4j.Driver) -> None:
    ingest_graph(db, small(70))
    before = counts(db)
    for text in REFUSED:
        with pytest.raises(CypherRefused):
            run_cypher(db, text)
    assert counts(db) == before
    res = run_cypher(db, "MATCH (n:Node) RETURN n.id AS id ORDER BY id", row_cap=7)
    assert res.keys == ["id"] and len(res.rows) == 7 and res.truncated
    res = run_cypher(db, "MATCH (p:Prompt) WHERE p.n_nodes > $k RETURN count(p) AS n", {"k": 1})
    assert res.rows == [{"n": 1}] and not res.truncated


def test_malformed_inputs_are_refused_and_change_nothing(db: neo4j.Driver, tmp_path: Path) -> None:
    from atlas.interchange import graph_to_json

    ingest_graph(db, small(80))
    before = counts(db)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"metadata": {"scan": ')
    doc = graph_to_json(small(81))
    unknown = json.loads(json.dumps(doc))
    unknown["links"][0]["source"] = "99_12345_3"
    (tmp_path / "unknown.json").write_text(json.dumps(unknown))
    nan = json.loads(json.dumps(doc))
    nan["links"][0]["weight"] = float("nan")
    (tmp_path / "nan.json").write_text(json.dumps(nan))
    (tmp_path / "x.txt").write_text("hello")
    for name in ("bad.json", "unknown.json", "nan.json", "x.txt", "missing.safetensors"):
        with pytest.raises(InputError):
            ingest_path(db, tmp_path / name)
    not_graph = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(not_graph))
    with pytest.raises(InputError):
        ingest_path(db, not_graph)
    assert counts(db) == before
    with pytest.raises(InputError):
        read.paths(db, "feature:abc", "logit:x")
    with pytest.raises(InputError):
        read.paths(db, "nonsense", "logit:x")
    with pytest.raises(InputError):
        read.paths(db, "token:a", "logit:x", max_hops=99)
    with pytest.raises(InputError):
        read.export_graph(db, "ffffffff")


def test_logit_lens_and_labels_are_stored(db: neo4j.Driver) -> None:
    from atlas.circuits.lens import logit_lens
    from atlas.store.labels import label_features, store_logit_lens

    graphs = [small(s) for s in range(90, 93)]
    for g in graphs:
        ingest_graph(db, g)
    gen = torch.Generator().manual_seed(0)
    w_dec = [torch.randn(4096, 8, generator=gen) for _ in range(4)]
    w_u = torch.randn(8, 12, generator=gen)
    n = store_logit_lens(db, "tset0", w_dec, w_u, word, k=3)
    n_feats = db.execute_query("MATCH (f:Feature) RETURN count(f) AS n").records[0]["n"]
    assert n == n_feats
    rec = db.execute_query(
        "MATCH (f:Feature) RETURN f.layer AS l, f.index AS i, f.top_tokens AS top, f.bottom_values AS bv LIMIT 1"
    ).records[0]
    want = logit_lens(w_dec[rec["l"]][rec["i"]][None], w_u, k=3)
    assert rec["top"] == [word(int(t)) for t in want.top_ids[0]]
    assert rec["bv"] == pytest.approx(want.bottom_values[0].tolist(), abs=1e-5)

    assert label_features(db, top_k=5, batch_size=7) == n_feats
    rows = db.execute_query(
        "MATCH (f:Feature) RETURN f.fid AS fid, f.label AS label, f.top_act_values AS vals, "
        "f.top_act_prompts AS prompts, f.max_act AS max_act"
    ).records
    for r in rows:
        assert r["label"] and "says:" in r["label"]
        assert r["vals"] == sorted(r["vals"], reverse=True) and len(r["vals"]) <= 5
        assert r["vals"][0] == pytest.approx(r["max_act"], rel=1e-6)
    top_word = rows[0]["label"].split("says: ")[1].split(",")[0]
    assert supernodes.define_from_token(db, "lens", rf"\s*{top_word}") >= 1


def test_delete_prompt_restores_the_aggregates(db: neo4j.Driver) -> None:
    from atlas.store.ingest import delete_prompt

    graphs = [small(s) for s in range(100, 104)]
    for g in graphs:
        ingest_graph(db, g)
    pool = sorted(
        {
            (int(g.layer[i]), int(g.feature[i]))
            for g in graphs
            for i in range(g.n_nodes)
            if g.kind[i] == NodeKind.FEATURE
        }
    )
    supernodes.define_from_features(db, "lo", [f"{x}/{y}" for x, y in pool[: len(pool) // 2]])
    supernodes.define_from_features(db, "hi", [f"{x}/{y}" for x, y in pool[len(pool) // 2 :]])
    sagg_before = {r["neighbour"] + r["direction"]: r for r in read.neighbours(db, "supernode:lo")}
    assert delete_prompt(db, graphs[1].prompt_id)
    assert not delete_prompt(db, graphs[1].prompt_id)
    assert_agg_equal(db, [graphs[0], *graphs[2:]])
    n = db.execute_query(
        "MATCH (n:Node {prompt: $id}) RETURN count(n) AS n", id=graphs[1].prompt_id
    )
    assert n.records[0]["n"] == 0
    assert ingest_graph(db, graphs[1]).created  # forced re-ingestion path
    assert_agg_equal(db, graphs)
    sagg_after = {r["neighbour"] + r["direction"]: r for r in read.neighbours(db, "supernode:lo")}
    assert set(sagg_after) == set(sagg_before)
    for k, r in sagg_before.items():
        assert sagg_after[k]["n_prompts"] == r["n_prompts"]
        assert sagg_after[k]["sum_w"] == pytest.approx(r["sum_w"], abs=1e-5)
    feats = db.execute_query("MATCH (f:Feature) RETURN sum(f.n_prompts) AS n").records[0]["n"]
    assert feats == sum(len(graph_rows_features(g)) for g in graphs)


def graph_rows_features(g: Graph) -> set[tuple[int, int]]:
    return {
        (int(g.layer[i]), int(g.feature[i]))
        for i in range(g.n_nodes)
        if g.kind[i] == NodeKind.FEATURE
    }


# --------------------------------------------------------------------------- ingest plans
def _operators(plan: Any) -> list[str]:
    """Operator names of an EXPLAIN plan (depth first), as the driver returns them."""
    if not plan:
        return []
    ops = [str(plan.get("operatorType", "")).split("@")[0]]
    for child in plan.get("children", []):
        ops.extend(_operators(child))
    return ops


def assert_agg_keyed(driver: neo4j.Driver) -> None:
    """Every aggregate carries the pair key Python computes (schema/0005 agrees), no string."""
    from atlas.store.ingest import agg_pair_key

    recs = driver.execute_query(
        "MATCH (a:Feature)-[g:AGG]->(b:Feature) RETURN a.layer AS al, a.index AS ai, "
        "b.layer AS bl, b.index AS bi, g.pair_key AS key, g.pair AS pair"
    ).records
    assert recs and all(
        r["key"] == agg_pair_key(r["al"], r["ai"], r["bl"], r["bi"]) and r["pair"] is None
        for r in recs
    )


def test_agg_pairs_are_keyed_and_found_by_index(db: neo4j.Driver) -> None:
    """AGG is found by its pair key: no write statement expands a Feature's relationships (they
    grow with the atlas) or scans a label; Python and schema/0005 compute the same key."""

    graphs = [small(s) for s in range(200, 203)]
    for g in graphs:
        ingest_graph(db, g)
    assert_agg_keyed(db)
    rows = [{"k": 7, "a": "4:x:1", "b": "4:x:2", "w": 1.0}]
    for query, params in (
        (Q.UPDATE_FEATURE_AGG, {"rows": rows}),
        (Q.FINISH_PROMPT, {"rows": rows, "id": "p"}),
        (Q.DELETE_PROMPT_AGG, {"id": "p"}),
        (Q.CREATE_NODES_AND_EDGES, {"rows": [], "prompt": "p", "src": [], "tgt": [], "w": []}),
    ):
        ops = _operators(db.execute_query("EXPLAIN " + query, **params).summary.plan)
        assert not [o for o in ops if "LabelScan" in o or "AllNodesScan" in o], ops
        if "AGG" in query:
            assert any("RelationshipIndexSeek" in o for o in ops), " ".join(ops)
        if query == Q.UPDATE_FEATURE_AGG:
            assert not [o for o in ops if o.startswith("Expand")], ops


def test_agg_key_collisions_are_told_apart(db: neo4j.Driver) -> None:
    """Keys wrap (layer 128 = layer 0, index 2**20 = index 0): aggregates that share a key stay
    separate, and each prompt's weights fold into its own pair."""
    from atlas.store.ingest import agg_pair_key

    assert agg_pair_key(128, 1, 2, 3) == agg_pair_key(0, 1, 2, 3)
    assert agg_pair_key(1, 2**20 + 5, 2, 3) == agg_pair_key(1, 5, 2, 3)
    assert agg_pair_key(1, 2, 3, 4) != agg_pair_key(3, 4, 1, 2)
    graphs = [small(s, d_transcoder=8, feature_pool=8) for s in (220, 221)]
    shared = {(r["s"], r["t"]) for r in graph_rows(graphs[0]).agg}
    assert shared & {(r["s"], r["t"]) for r in graph_rows(graphs[1]).agg}
    ingest_graph(db, graphs[0])
    # give every aggregate the same key: lookups must still find their own pair
    db.execute_query("MATCH ()-[g:AGG]->() SET g.pair_key = 0")
    rows = graph_rows(graphs[1])
    for r in rows.agg:
        r["k"] = 0
    ingest_rows(db, rows)
    assert_agg_equal(db, graphs)


def test_schema_backfills_agg_pairs_of_older_atlases(db: neo4j.Driver) -> None:

    graphs = [small(s) for s in range(210, 213)]
    for g in graphs[:2]:
        ingest_graph(db, g)
    # an atlas written before 0003 and 0005 (so neither is in its schema ledger)
    db.execute_query("MATCH ()-[g:AGG]->() REMOVE g.pair_key")
    db.execute_query(
        "MATCH (m:SchemaMigration) WHERE m.name IN "
        "['0003_aggregates.cypher', '0005_agg_pair_key.cypher'] DELETE m"
    )
    apply_schema(db)
    apply_schema(db)  # idempotent
    assert_agg_keyed(db)
    names = {r["name"] for r in db.execute_query("SHOW CONSTRAINTS YIELD name").records}
    assert "agg_pair" not in names
    ingest_graph(db, graphs[2])
    assert_agg_equal(db, graphs)
