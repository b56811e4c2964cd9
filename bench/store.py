"""Store benchmark: ingestion throughput vs a plain ``UNWIND CREATE`` baseline, named-query
latency (p50/p95) and disk per prompt, on a synthetic atlas.

    .venv/bin/python bench/store.py --prompts 1000                 # ~500 nodes / 5,000 edges each
    .venv/bin/python bench/store.py --prompts 3000 --home DIR --keep  # grow an existing atlas
    .venv/bin/python bench/store.py --prompts 10000 --home DIR     # the big one (hours on 2 cores)

Without ``--uri`` a local Neo4j (the project's launcher) runs on a free port with its store under
``--home`` (default: a temporary directory, removed unless ``--keep``). ``--prompts`` is the
atlas size to reach: prompts already in the store are kept, so runs can grow one atlas in steps.

Baselines: every ``--baseline-every``-th prompt is also written twice more, each time in one
transaction of plain ``UNWIND $rows CREATE`` statements, then deleted:

* "nodes+edges": the same node and edge rows only (no claim, no links, no aggregates);
* "same rows": also everything else our model stores per prompt (each node's link to its global
  Feature/Token, one aggregate row per feature pair), but with CREATE instead of MERGE, no claim,
  no idempotence.

Each ratio is baseline time / our time on the same prompts at the same atlas size (1.0 = as fast
as the plain write). Order alternates between prompts. Results go to stdout and, with ``--out``,
to a JSON file.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import neo4j

from atlas.store import queries as Q
from atlas.store import read, supernodes
from atlas.store.ingest import PromptRows, graph_rows, ingest_rows
from atlas.store.schema import apply_schema
from atlas.store.synthetic import WORDS, synthetic_graph

# --------------------------------------------------------------------------- baseline Cypher
# Baseline for the benchmark: the same rows written with plain CREATE, no checks, no links.
BASELINE_CREATE_NODES = """
UNWIND $rows AS r
CREATE (n:BaselineNode {prompt: $prompt, id: r.id, idx: r.idx, kind: r.kind, ref: r.ref,
                        layer: r.layer, pos: r.pos, feature: r.feature, token_id: r.token_id, activation: r.activation,
                        influence: r.influence, logit_prob: r.logit_prob})
RETURN r.idx AS idx, elementId(n) AS eid
"""

BASELINE_CREATE_EDGES = """
UNWIND $rows AS r
MATCH (s) WHERE elementId(s) = r.s
MATCH (t) WHERE elementId(t) = r.t
CREATE (s)-[:BASELINE_EDGE {w: r.w}]->(t)
"""

# The "same rows" baseline adds what our graph model also stores per prompt, still as plain
# CREATE: each node's link to its global entity, and one aggregate row per feature pair
# (endpoints found by their unique keys; rows whose entity does not exist are simply dropped).
BASELINE_CREATE_FEATURE_LINKS = """
UNWIND $rows AS r
MATCH (n) WHERE elementId(n) = r.n
MATCH (e:Feature {fid: r.ref})
CREATE (n)-[:BASELINE_OF]->(e)
"""

BASELINE_CREATE_TOKEN_LINKS = """
UNWIND $rows AS r
MATCH (n) WHERE elementId(n) = r.n
MATCH (e:Token {tid: r.ref})
CREATE (n)-[:BASELINE_OF]->(e)
"""

BASELINE_CREATE_AGG = """
UNWIND $rows AS r
MATCH (a:Feature {fid: r.s})
MATCH (b:Feature {fid: r.t})
CREATE (a)-[:BASELINE_AGG {n_prompts: 1, sum_w: r.w, max_w: r.w, min_w: r.w}]->(b)
"""

BASELINE_WIPE = """
MATCH (n:BaselineNode) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 5000 ROWS
"""

BASELINE_WIPE_AGG = """
MATCH ()-[r:BASELINE_AGG]->() CALL (r) { DELETE r } IN TRANSACTIONS OF 5000 ROWS
"""


# The store's size, printed with the figures.
STORE_COUNTS = """
CALL () { MATCH (p:Prompt) WHERE p.complete RETURN count(p) AS prompts }
CALL () { MATCH (n:Node) RETURN count(n) AS nodes }
CALL () { MATCH ()-[e:EDGE]->() RETURN count(e) AS edges }
CALL () { MATCH (f:Feature) RETURN count(f) AS features }
CALL () { MATCH ()-[g:AGG]->() RETURN count(g) AS agg_edges }
RETURN prompts, nodes, edges, features, agg_edges
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def du(path: Path) -> int:
    if not path.exists():
        return 0
    out = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[0])


def baseline_write(driver: neo4j.Driver, rows: PromptRows, batch: int, *, full: bool) -> float:
    """Plain UNWIND CREATE of the same rows in one transaction; returns seconds.

    ``full=False``: the graph's node and edge rows only. ``full=True``: also what our model
    stores per prompt (the node -> Feature/Token links and one aggregate row per feature pair),
    all with CREATE: no claim, no MERGE, no idempotence.
    """
    node_rows = [r for rs in rows.nodes.values() for r in rs]

    def work(tx: neo4j.ManagedTransaction) -> None:
        eids: dict[int, str] = {}
        for start in range(0, len(node_rows), batch):
            for rec in tx.run(
                BASELINE_CREATE_NODES,
                rows=node_rows[start : start + batch],
                prompt=rows.prompt_id,
            ):
                eids[rec["idx"]] = rec["eid"]
        edge_rows = [{"s": eids[s], "t": eids[t], "w": w} for s, t, w in rows.edges]
        for start in range(0, len(edge_rows), batch):
            tx.run(BASELINE_CREATE_EDGES, rows=edge_rows[start : start + batch]).consume()
        if not full:
            return
        for kind, query in (
            ("feature", BASELINE_CREATE_FEATURE_LINKS),
            ("token", BASELINE_CREATE_TOKEN_LINKS),
            ("logit", BASELINE_CREATE_TOKEN_LINKS),
        ):
            links = [{"n": eids[r["idx"]], "ref": r["ref"]} for r in rows.nodes[kind]]
            for start in range(0, len(links), batch):
                tx.run(query, rows=links[start : start + batch]).consume()
        for start in range(0, len(rows.agg), batch):
            tx.run(BASELINE_CREATE_AGG, rows=rows.agg[start : start + batch]).consume()

    t0 = time.perf_counter()
    with driver.session() as session:
        session.execute_write(work)
    dt = time.perf_counter() - t0
    with driver.session() as session:
        session.run(BASELINE_WIPE).consume()
        if full:
            session.run(BASELINE_WIPE_AGG).consume()
    return dt


class _TimedTx:
    """Wraps a transaction to time each statement (by its first line) for the breakdown."""

    def __init__(self, tx: neo4j.ManagedTransaction, times: dict[str, float]) -> None:
        self.tx, self.times = tx, times

    def run(self, query: str, **kw: Any) -> Any:
        t0 = time.perf_counter()
        recs = list(self.tx.run(query, **kw))
        name = (
            next(n for n in dir(Q) if getattr(Q, n) is query)
            if query in vars(Q).values()
            else "other"
        )
        self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0
        return _Records(recs)


class _Records:
    def __init__(self, recs: list[Any]) -> None:
        self.recs = recs

    def single(self) -> Any:
        return self.recs[0] if self.recs else None

    def consume(self) -> None:
        return None

    def __iter__(self) -> Any:
        return iter(self.recs)


def ours_breakdown(
    driver: neo4j.Driver, rows: PromptRows, batch: int, times: dict[str, float]
) -> float:
    """Our ingestion unit of work, statement by statement timed (same statements, same tx)."""
    from atlas.store.ingest import write_prompt

    t0 = time.perf_counter()
    with driver.session() as session:
        created = session.execute_write(lambda tx: write_prompt(_TimedTx(tx, times), rows, batch))  # type: ignore[arg-type]
    assert created
    return time.perf_counter() - t0


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def timed(fn: Callable[[], Any], reps: int) -> tuple[list[float], Any]:
    lat, last = [], None
    for _ in range(reps):
        t0 = time.perf_counter()
        last = fn()
        lat.append(time.perf_counter() - t0)
    return lat, last


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--prompts", type=int, default=1000, help="atlas size to reach")
    ap.add_argument("--uri", default=None, help="an existing Neo4j (disk use is then not measured)")
    ap.add_argument(
        "--home", type=Path, default=None, help="launcher home (store) to create or grow"
    )
    ap.add_argument("--keep", action="store_true", help="keep the store (and leave it stopped)")
    ap.add_argument("--heap", default="2g")
    ap.add_argument("--pagecache", default="3g")
    ap.add_argument("--features", type=int, default=405, help="feature nodes per prompt")
    ap.add_argument("--edges", type=int, default=5000, help="edges per prompt")
    ap.add_argument("--batch", type=int, default=5000)
    ap.add_argument("--baseline-every", type=int, default=10)
    ap.add_argument("--reps", type=int, default=40, help="runs of each named query")
    ap.add_argument("--min-weight", type=float, default=0.8, help="paths queries: |w| threshold")
    ap.add_argument("--max-hops", type=int, default=4)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip-queries", action="store_true")
    args = ap.parse_args()

    stop: Callable[[], None] = lambda: None  # noqa: E731
    home = args.home
    tmp_home = None
    if args.uri:
        uri = args.uri
    else:
        from atlas.services import neo4j_local
        from atlas.settings import AtlasSettings

        if home is None:
            tmp_home = Path(tempfile.mkdtemp(prefix="atlas-bench-"))
            home = tmp_home / "neo4j"
        settings = AtlasSettings(_env_file=None, atlas_home=home.parent)  # type: ignore[call-arg]
        uri = neo4j_local.start(
            settings,
            home=home,
            port=free_port(),
            heap=args.heap,
            pagecache=args.pagecache,
            die_with_parent=True,
        )

        def stop() -> None:
            neo4j_local.stop(settings, home=home)
            if tmp_home is not None and not args.keep:
                shutil.rmtree(tmp_home, ignore_errors=True)

    driver = neo4j.GraphDatabase.driver(uri)
    report: dict[str, Any] = {"target_prompts": args.prompts, "edges_per_prompt": args.edges}
    try:
        apply_schema(driver)
        have = read.count_prompts(driver)
        data_dir = home / "data" if home else None
        disk0 = du(data_dir) if data_dir else 0
        shape = {"n_features": args.features, "n_edges": args.edges}
        ours_t = ours_e = 0.0
        pair_ours = pair_base = pair_full = pair_edges = 0.0
        gen_t = 0.0
        breakdown: dict[str, float] = {}
        per_segment: list[float] = []
        seg_t = seg_e = 0.0
        # paired sums per 1,000 prompts (ours, same rows, nodes+edges): the marginal ratios
        marginal: list[dict[str, float]] = []
        seg_pair = [0.0, 0.0, 0.0]
        todo = max(0, args.prompts - have)
        print(f"atlas has {have} prompts; ingesting {todo} more into {uri}", flush=True)
        for i in range(have, args.prompts):
            t0 = time.perf_counter()
            rows = graph_rows(synthetic_graph(i, **shape))
            gen_t += time.perf_counter() - t0
            paired = args.baseline_every > 0 and i % args.baseline_every == 0
            base_first = paired and (i // args.baseline_every) % 2 == 0
            if base_first:
                tb = baseline_write(driver, rows, args.batch, full=False)
                tf = baseline_write(driver, rows, args.batch, full=True)
            t0 = time.perf_counter()
            if paired:
                ours_breakdown(driver, rows, args.batch, breakdown)
            else:
                assert ingest_rows(driver, rows, batch_size=args.batch).created
            dt = time.perf_counter() - t0
            if paired and not base_first:
                tb = baseline_write(driver, rows, args.batch, full=False)
                tf = baseline_write(driver, rows, args.batch, full=True)
            if paired:
                pair_ours += dt
                pair_base += tb
                pair_full += tf
                pair_edges += len(rows.edges)
                seg_pair = [seg_pair[0] + dt, seg_pair[1] + tf, seg_pair[2] + tb]
            ours_t += dt
            ours_e += len(rows.edges)
            seg_t += dt
            seg_e += len(rows.edges)
            done = i - have + 1
            if done % 100 == 0 or i == args.prompts - 1:
                per_segment.append(seg_e / seg_t)
                print(
                    f"  {i + 1} prompts: {seg_e / seg_t:,.0f} edges/s (last {int(seg_e / args.edges)} prompts)"
                    + (
                        f", paired ratio so far {pair_base / pair_ours:.2f} (nodes+edges),"
                        f" {pair_full / pair_ours:.2f} (same rows)"
                        if pair_ours
                        else ""
                    ),
                    flush=True,
                )
                seg_t = seg_e = 0.0
            if ((i + 1) % 1000 == 0 or i == args.prompts - 1) and seg_pair[0]:
                marginal.append(
                    {
                        "up_to_prompts": i + 1,
                        "ratio_same_rows": seg_pair[1] / seg_pair[0],
                        "ratio_nodes_edges": seg_pair[2] / seg_pair[0],
                    }
                )
                print(
                    f"  paired ratio over prompts since the last 1,000 mark: "
                    f"{seg_pair[1] / seg_pair[0]:.2f} (same rows), "
                    f"{seg_pair[2] / seg_pair[0]:.2f} (nodes+edges)",
                    flush=True,
                )
                seg_pair = [0.0, 0.0, 0.0]
        if todo:
            report["ingest"] = {
                "prompts_ingested": todo,
                "edges_per_s": ours_e / ours_t,
                "prompts_per_s": todo / ours_t,
                "edges_per_s_by_100_prompts": per_segment,
                "baseline_edges_per_s_paired": pair_edges / pair_base if pair_base else None,
                "ours_edges_per_s_paired": pair_edges / pair_ours if pair_ours else None,
                "ratio_vs_baseline": pair_base / pair_ours if pair_ours else None,
                "baseline_same_rows_edges_per_s_paired": pair_edges / pair_full
                if pair_full
                else None,
                "ratio_vs_baseline_same_rows": pair_full / pair_ours if pair_ours else None,
                "paired_ratios_by_1000_prompts": marginal,
                "synthetic_generation_s": gen_t,
                "share_of_time_by_statement_paired": {
                    k: v / pair_ours for k, v in sorted(breakdown.items(), key=lambda kv: -kv[1])
                }
                if pair_ours
                else {},
            }
        # idempotence check on a few prompts: nothing new is written
        t0 = time.perf_counter()
        for i in range(3):
            assert not ingest_rows(driver, graph_rows(synthetic_graph(i, **shape))).created
        report["reingest_noop_s"] = (time.perf_counter() - t0) / 3

        counts = driver.execute_query(STORE_COUNTS).records[0].data()
        report["counts"] = counts
        if data_dir:
            db_dir = data_dir / "databases" / "neo4j"
            tx_dir = data_dir / "transactions" / "neo4j"
            report["disk"] = {
                "store_bytes": du(db_dir),
                "tx_log_bytes": du(tx_dir),
                "store_bytes_per_prompt": du(db_dir) / max(counts["prompts"], 1),
                "growth_bytes_per_prompt_this_run": (du(data_dir) - disk0) / todo if todo else None,
            }
        print(
            json.dumps(
                {k: report[k] for k in report if k in ("ingest", "counts", "disk")}, indent=2
            ),
            flush=True,
        )

        if not args.skip_queries:
            report["queries"] = run_queries(driver, args)
    finally:
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(report, indent=2))
        driver.close()
        stop()
    print(json.dumps(report.get("queries", {}), indent=2))


def run_queries(driver: neo4j.Driver, args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(0)
    feats = driver.execute_query(
        "MATCH (f:Feature) RETURN f.layer AS l, f.index AS i, f.n_prompts AS n ORDER BY n DESC LIMIT 2000"
    ).records
    popular = [f"feature:{r['l']}/{r['i']}" for r in feats[:50]]
    mid = [f"feature:{r['l']}/{r['i']}" for r in feats[200:2000]] or popular
    low_layer = [f"feature:{r['l']}/{r['i']}" for r in feats if r["l"] <= 2][:200] or popular
    prompts = [
        r["id"]
        for r in driver.execute_query("MATCH (p:Prompt) RETURN p.id AS id LIMIT 5000").records
    ]
    words = sorted({w.strip() for w in WORDS})
    # three supernodes of popular features (defining them rebuilds their aggregate edges)
    t0 = time.perf_counter()
    for k in range(3):
        supernodes.define_from_features(
            driver, f"bench-{k}", [s.split(":")[1] for s in rng.sample(popular, 8)]
        )
    define_s = (time.perf_counter() - t0) / 3

    hops, mw = args.max_hops, args.min_weight

    def paths(source: str, target: str, min_weight: float = mw) -> Any:
        return read.paths(driver, source, target, max_hops=hops, min_weight=min_weight, limit=20)

    def logit() -> str:
        return f"logit:{rng.choice(words)}"

    def supernode() -> str:
        return f"supernode:bench-{rng.randrange(3)}"

    cases: dict[str, Callable[[], Any]] = {
        "paths feature->logit": lambda: paths(rng.choice(low_layer), logit()),
        "paths token->logit": lambda: paths(f"token:{rng.choice(words)}", logit()),
        "paths supernode->logit": lambda: paths(supernode(), logit()),
        "paths feature->logit |w|>=0.3": lambda: paths(rng.choice(low_layer), logit(), 0.3),
        "paths feature->feature": lambda: paths(rng.choice(low_layer), rng.choice(mid)),
        "active prompts (feature)": lambda: read.active_prompts(driver, rng.choice(mid), limit=50),
        "active prompts (supernode)": lambda: read.active_prompts(driver, supernode(), limit=50),
        "top contributors to a logit": lambda: read.top_contributors(driver, logit(), limit=20),
        "feature neighbours (aggregate)": lambda: read.neighbours(
            driver, rng.choice(popular), limit=20
        ),
        "supernode neighbours (aggregate)": lambda: read.neighbours(driver, supernode()),
        "prompt supernode graph": lambda: read.prompt_supernode_graph(driver, rng.choice(prompts)),
        "compare two prompts": lambda: read.compare_prompts(
            driver, rng.choice(prompts), rng.choice(prompts)
        ),
        "export one prompt": lambda: read.export_graph(driver, rng.choice(prompts)),
    }
    out: dict[str, Any] = {"supernode_define_s": define_s}
    for name, fn in cases.items():
        fn()  # warm the plan cache
        lat, last = timed(fn, args.reps)
        sizes = ""
        if isinstance(last, dict) and "paths" in last:
            sizes = f" (last: {len(last['paths'])} paths shown, {sum(a['n_paths'] for a in last['aggregate'])} found)"
        out[name] = {
            "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * pct(lat, 0.95),
            "reps": len(lat),
        }
        print(
            f"  {name:34s} p50 {out[name]['p50_ms']:8.1f} ms  p95 {out[name]['p95_ms']:8.1f} ms{sizes}",
            flush=True,
        )
    for k in range(3):
        supernodes.delete(driver, f"bench-{k}")
    return out


if __name__ == "__main__":
    main()
