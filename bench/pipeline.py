"""End-to-end pipeline throughput: prompts per minute with 1 and 2 workers, and the share of
time spent outside attribution (queueing, serialisation, ingestion).

For each worker count it starts a fresh local Neo4j and redis-server (temporary homes, free
ports) and real ``atlas worker`` processes (one torch thread, ``-c 1``): with ``--topology split``
(the default, as deployed: GPU workers attribute, a CPU worker ingests) N workers on the
``attribute`` queue plus one on ``ingest``; with ``shared`` N workers on both queues. It warms
them up (model load) with a few prompts that are not measured, then enqueues the measured batch
and waits for the job. The baseline ("peer") is the same attribution run in-process, one prompt
after the other, with no infrastructure at all.

Reported per run:
    e2e prompts/min           batch size / wall time from enqueue to the job finished
    attribution-only /min     the in-process baseline with the same thread count per process
    attribution s (sum)       sum over prompts of attribute + prune time inside the workers
    outside-attribution share 1 - sum(attribution s) / (wall s * N): every attribution-worker
                              second not spent attributing (queue, job records, artifact
                              save, Celery; with ``shared`` also ingestion), as a share
    overhead / attribution    (wall s * N - sum attribution s) / sum attribution s
    per-prompt means of each timed stage (from the job records)

Then, on a fresh Neo4j with nothing else running, the storage floor: the same graphs stored by
our chunked ingestion and by a plain ``UNWIND CREATE`` of their rows (bench/store.py's
baselines), in ms per prompt and as a share of the attribution time. Where Neo4j shares the
CPUs with attribution, the plain write alone bounds how small the overhead can be.

Usage: ``python bench/pipeline.py [--prompts 60] [--workers 1 2] [--tiny]``. The toy world is
used when it exists (``atlas toy build`` or shipped assets), else ``--tiny`` models.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _world(tiny: bool, tmp: Path) -> tuple[str, str, list[str], str]:
    """(model dir, transcoder dir, prompts, name)."""
    if not tiny:
        try:
            from atlas.toy import toy_paths
            from atlas.toy.demo import demo_prompts

            paths = toy_paths()
            return str(paths.model_dir), str(paths.transcoder_dir), demo_prompts(400), "toy"
        except Exception as exc:  # no toy world: fall back to the tiny model
            print(f"(no toy world: {exc}; using the tiny test model)")
    from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders

    model = build_tiny_model("llama", tmp / "tiny-model")
    tcs = build_tiny_transcoders(model, tmp / "tiny-tc")
    words = [
        "the",
        "cat",
        "sat",
        "on",
        "a",
        "mat",
        "while",
        "two",
        "dogs",
        "ran",
        "far",
        "away",
        "home",
    ]
    prompts = [" ".join(words[i % 7 : i % 7 + 3 + i % 5]) + f" {i}" for i in range(400)]
    return str(model), str(tcs), prompts, "tiny"


def _baseline(model: str, tcs: str, prompts: list[str], batch_size: int) -> float:
    """Seconds per prompt of attribution + pruning in-process (no queue, no store)."""
    code = f"""
import json, sys, time, torch
torch.set_num_threads(1)
from atlas.models import load_model
from atlas.transcoders import load_transcoders
from atlas.attribution import attribute
m = load_model({model!r}); t = load_transcoders({tcs!r}, m)
prompts = json.loads(sys.stdin.read())
attribute(prompts[0], m, t, batch_size={batch_size}).to_graph(prune=True)  # warm-up
t0 = time.perf_counter()
for p in prompts:
    attribute(p, m, t, batch_size={batch_size}).to_graph(prune=True)
print(json.dumps((time.perf_counter() - t0) / len(prompts)))
"""
    out = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        check=True,
    )
    return float(out.stdout.strip().splitlines()[-1])


def _start_neo4j(home: Path) -> str:
    """A fresh local Neo4j for one measurement (small heap and page cache, free port)."""
    from atlas.services import _proc, neo4j_local
    from atlas.settings import AtlasSettings

    return neo4j_local.start(
        home=home,
        port=_proc.free_port(),
        heap="1g",
        pagecache="512m",
        build_root=AtlasSettings().atlas_home / "launcher",
        die_with_parent=True,
    )


def _run(
    n_workers: int,
    model: str,
    tcs: str,
    warm: list[str],
    prompts: list[str],
    tmp: Path,
    split: bool,
    ingest_concurrency: int = 1,
    chunk_size: int = 8,
) -> dict[str, Any]:
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import job_store, submit, wait_for_job
    from atlas.services import neo4j_local, redis_local
    from atlas.settings import AtlasSettings
    from atlas.store.connection import open_driver
    from workers.app import ATTRIBUTE_QUEUE, INGEST_QUEUE, PIPELINE_QUEUES, make_celery

    home = tmp / f"run-{n_workers}"
    uri = _start_neo4j(home / "neo4j")
    redis = redis_local.start(home / "redis", die_with_parent=True)
    settings = AtlasSettings(  # type: ignore[call-arg]
        _env_file=None, atlas_home=home, neo4j_uri=uri, redis_url=redis.url, chunk_size=chunk_size
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "CELERY_"))}
    env.update(ATLAS_HOME=str(home), NEO4J_URI=uri, REDIS_URL=redis.url, OMP_NUM_THREADS="1")
    procs: list[subprocess.Popen[bytes]] = []
    driver = None
    try:
        names = []
        queues = [ATTRIBUTE_QUEUE if split else PIPELINE_QUEUES] * n_workers
        if split:
            queues.append(INGEST_QUEUE)
        conc = ["1"] * n_workers + ([str(ingest_concurrency)] if split else [])
        for i, (queue, c) in enumerate(zip(queues, conc, strict=True)):
            name = f"bench-{i}-{os.getpid()}@localhost"
            names.append(name)
            with (home / f"worker-{i}.log").open("wb") as log:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "atlas",
                            "worker",
                            "--threads",
                            "1",
                            "--name",
                            name,
                            "--queues",
                            queue,
                            "--concurrency",
                            c,
                        ],
                        env=env,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                        cwd=REPO,
                    )
                )
        app = make_celery(settings)
        pending = set(names)
        deadline = time.monotonic() + 300
        while pending and time.monotonic() < deadline:
            for reply in app.control.ping(destination=sorted(pending), timeout=1.0):
                pending -= set(reply)
        if pending:
            raise RuntimeError(f"workers not ready: {pending}")
        driver = open_driver(settings)

        def specs(ps: list[str]) -> list[Any]:
            return [PromptSpec(prompt=p, model=model, transcoders=tcs) for p in ps]

        # warm-up: two chunks per attribution worker, so that every worker has loaded the model
        warm = warm[: 2 * chunk_size * n_workers]
        job, _ = submit(settings, specs(warm), source="bench warm-up", driver=driver)
        wait_for_job(settings, driver, job, timeout_s=900, poll_s=0.2)

        t0 = time.monotonic()
        job, _ = submit(settings, specs(prompts), source="bench", driver=driver)
        summary = wait_for_job(settings, driver, job, timeout_s=3600, poll_s=0.2)
        wall = time.monotonic() - t0
        items = job_store(driver, settings).items(job)
    finally:
        if driver is not None:
            driver.close()
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
        redis_local.stop(home / "redis")
        neo4j_local.stop(home=home / "neo4j")

    stages = [
        "queue_s",
        "records_s",
        "load_s",
        "attribute_s",
        "prune_s",
        "save_s",
        "ingest_queue_s",
        "load_artifact_s",
        "ingest_s",
    ]
    means = {s: statistics.fmean(i.timings.get(s, 0.0) for i in items) for s in stages}
    attr = sum(i.timings.get("attribute_s", 0.0) + i.timings.get("prune_s", 0.0) for i in items)
    # the attribution phase: first attribute task start to last hand-off to the ingest queue
    starts = [i.timings["started_at"] for i in items if "started_at" in i.timings]
    ends = [i.timings["handed_off_at"] for i in items if "handed_off_at" in i.timings]
    phase = (max(ends) - min(starts)) if starts and ends else float("nan")
    worker_s = wall * n_workers
    return {
        "workers": n_workers,
        "topology": (
            f"split (N attribute + 1 ingest worker, -c {ingest_concurrency})"
            if split
            else "shared (both queues)"
        ),
        "prompts": len(prompts),
        "chunk_size": chunk_size,
        "done": summary.done,
        "failed": summary.failed,
        "wall_s": wall,
        "e2e_per_min": summary.done / wall * 60,
        "attribution_s_sum": attr,
        "outside_attribution_share": 1 - attr / worker_s,
        "overhead_over_attribution": (worker_s - attr) / attr if attr else float("nan"),
        "stage_means_s": means,
        "attribution_phase_s": phase,
        "attribution_worker_overhead_share": 1 - attr / (phase * n_workers),
    }


def _storage_floor(artifacts: Path, chunk_size: int, tmp: Path) -> dict[str, Any]:
    """Neo4j's cost of storing these graphs with nothing else running: our chunked ingestion
    (one transaction per chunk, as the ingest worker writes) and a plain ``UNWIND CREATE`` of
    the same rows (bench/store.py's baselines), in ms per prompt on a fresh store."""
    import neo4j

    from atlas.graph import Graph
    from atlas.services import neo4j_local
    from atlas.store.ingest import graph_rows, ingest_many
    from atlas.store.schema import apply_schema

    sys.path.insert(0, str(REPO / "bench"))
    from store import baseline_write  # bench/store.py

    rows = [graph_rows(Graph.load(p)) for p in sorted(artifacts.rglob("*.safetensors"))]
    home = tmp / "floor"
    uri = _start_neo4j(home / "neo4j")
    ours: list[float] = []
    same: list[float] = []
    plain: list[float] = []
    try:
        with neo4j.GraphDatabase.driver(uri) as driver:
            apply_schema(driver)
            warm, rest = rows[: 2 * chunk_size], rows[2 * chunk_size :]
            for start in range(0, len(warm), chunk_size):
                ingest_many(driver, [(r, None) for r in warm[start : start + chunk_size]])
            for start in range(0, len(rest), chunk_size):
                chunk = rest[start : start + chunk_size]
                same.append(baseline_write(driver, chunk[0], 5000, full=True))
                plain.append(baseline_write(driver, chunk[0], 5000, full=False))
                t0 = time.perf_counter()
                ingest_many(driver, [(r, None) for r in chunk])
                ours.append((time.perf_counter() - t0) / len(chunk))
    finally:
        neo4j_local.stop(home=home / "neo4j")
    return {
        "graphs": len(rows),
        "mean_nodes": statistics.fmean(r.n_nodes for r in rows),
        "mean_edges": statistics.fmean(len(r.edges) for r in rows),
        "ours_chunked_s": statistics.fmean(ours),
        "plain_create_same_rows_s": statistics.fmean(same),
        "plain_create_nodes_edges_s": statistics.fmean(plain),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--tiny", action="store_true", help="use the tiny test model, not the toy")
    ap.add_argument(
        "--topology",
        choices=["split", "shared"],
        default="split",
        help="split: N attribute workers + 1 ingest worker; shared: N workers on both queues",
    )
    ap.add_argument(
        "--ingest-concurrency", type=int, default=1, help="processes of the ingest worker (split)"
    )
    ap.add_argument("--chunk-size", type=int, default=8, help="prompt specs per attribute message")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="atlas-bench-pipeline-"))
    model, tcs, pool, world = _world(args.tiny, tmp)
    n_warm = max(args.warmup, 2 * args.chunk_size * max(args.workers))
    warm, prompts = pool[:n_warm], pool[n_warm : n_warm + args.prompts]
    print(
        f"world: {world}  prompts: {len(prompts)}  (+ up to {len(warm)} warm-up)"
        f"  chunk: {args.chunk_size}  cpus: {os.cpu_count()}"
    )
    base = _baseline(model, tcs, prompts, batch_size=64)
    print(
        f"attribution only, in-process, 1 thread: {base:.3f} s/prompt = {60 / base:.1f} prompts/min"
    )
    results = []
    for n in args.workers:
        r = _run(
            n,
            model,
            tcs,
            warm,
            prompts,
            tmp,
            split=args.topology == "split",
            ingest_concurrency=args.ingest_concurrency,
            chunk_size=args.chunk_size,
        )
        r["baseline_s_per_prompt"] = base
        r["e2e_vs_attribution_only"] = r["e2e_per_min"] / (60 / base)
        results.append(r)
        m = r["stage_means_s"]
        print(
            f"\n{n} attribution worker(s), {r['topology']}: {r['done']}/{r['prompts']} done in {r['wall_s']:.1f}s = "
            f"{r['e2e_per_min']:.1f} prompts/min end to end "
            f"({r['e2e_vs_attribution_only']:.2f}x the 1-process attribution-only rate)\n"
            f"  attribution inside workers: {r['attribution_s_sum']:.1f}s summed; outside-"
            f"attribution share of worker time {r['outside_attribution_share']:.1%} "
            f"(overhead = {r['overhead_over_attribution']:.1%} of attribution time)\n"
            f"  attribution phase (first task start -> last hand-off to ingest): "
            f"{r['attribution_phase_s']:.1f}s; attribution workers' time outside attribution "
            f"(queue, job records, artifact save, Celery): "
            f"{r['attribution_worker_overhead_share']:.1%}\n"
            "  mean per prompt: "
            + ", ".join(f"{k.removesuffix('_s')} {v * 1000:.0f}ms" for k, v in m.items())
        )
    floor = _storage_floor(tmp / f"run-{args.workers[-1]}" / "artifacts", args.chunk_size, tmp)
    print(
        f"\nstoring these {floor['graphs']} graphs (mean {floor['mean_nodes']:.0f} nodes, "
        f"{floor['mean_edges']:.0f} edges) in a fresh Neo4j with nothing else running, ms per "
        f"prompt (and as a share of the {base * 1000:.0f} ms attribution):\n"
        f"  our ingestion, chunks of {args.chunk_size}: {floor['ours_chunked_s'] * 1000:.1f} "
        f"({floor['ours_chunked_s'] / base:.0%})\n"
        f"  plain UNWIND CREATE, same rows: {floor['plain_create_same_rows_s'] * 1000:.1f} "
        f"({floor['plain_create_same_rows_s'] / base:.0%})\n"
        f"  plain UNWIND CREATE, nodes + edges only: "
        f"{floor['plain_create_nodes_edges_s'] * 1000:.1f} "
        f"({floor['plain_create_nodes_edges_s'] / base:.0%})"
    )
    if args.json:
        args.json.write_text(
            json.dumps({"world": world, "results": results, "storage_floor": floor}, indent=2)
        )


if __name__ == "__main__":
    main()
