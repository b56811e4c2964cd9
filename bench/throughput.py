"""Worker throughput: prompts per minute in ONE process that keeps its model loaded, ours vs
circuit-tracer 0.5.0 called in a loop.

Ours runs what an attribution worker runs per prompt (``atlas.engine``): the engine loaded once
through :class:`~atlas.engine.EngineCache` (as :data:`~atlas.engine.PROCESS_ENGINES` keeps it per
worker), then for every prompt :func:`~atlas.engine.attribute_with_halving` (attribute + prune)
and the graph's safetensors artifact. circuit-tracer runs ``attribute()`` + ``create_graph_files``
(pruning + its JSON) per prompt in one process (``bench/ct_golden_worker.py``, process mode),
its model loaded once. Both sides: same prompts, same knobs (circuit-tracer's defaults:
10 logits, 0.95 probability, all features, node 0.8 / edge 0.98), same batch size, float32, CPU,
the same torch thread count. The first prompt of each process is a warm-up and is not counted.

Worlds:
  toy    the shipped toy world (Llama, 4 layers, d_model 128; ``atlas/toy/assets``), the demo's
         prompts. circuit-tracer: nnsight backend (its TransformerLens path here loads Gemma-2
         only).
  small  bench/attribution.py's ``small`` Gemma-2 (8 layers, d_model 256, 4096-wide JumpReLU)
         on ``--tokens``-token prompts. circuit-tracer: TransformerLens backend.

Usage::

    .venv/bin/python bench/throughput.py                              # both worlds
    .venv/bin/python bench/throughput.py --worlds toy --prompts 20
    .venv/bin/python bench/throughput.py --worlds small --prompts 3 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from attribution import (
    CT_PYTHON,
    CT_WORKER,
    OUT,
    ROOT,
    TIMED_OUT,
    _run_child,
    build_inputs,
    prompt_of_length,
)


def toy_inputs() -> tuple[Path, Path]:
    """A copy of the shipped toy world that circuit-tracer can load (tokenizer class, paths)."""
    from atlas.testing.tiny import portable_model_dir, portable_transcoder_dir
    from atlas.toy.build import ASSETS_DIR

    base = OUT / "models" / "toy"
    if not (base / "transcoders" / "config.yaml").exists():
        shutil.rmtree(base, ignore_errors=True)
        shutil.copytree(ASSETS_DIR / "model", base / "model")
        shutil.copytree(ASSETS_DIR / "transcoders", base / "transcoders")
        portable_model_dir(base / "model")
        portable_transcoder_dir(base / "transcoders", "bench-toy")
    return base / "model", base / "transcoders"


def world(name: str, n_prompts: int, n_tokens: int) -> tuple[Path, Path, list[str], str]:
    """(model dir, transcoder dir, prompts, circuit-tracer backend) of a world."""
    if name == "toy":
        from atlas.toy.demo import demo_prompts

        model_dir, tc_dir = toy_inputs()
        return model_dir, tc_dir, demo_prompts(n_prompts + 1), "nnsight"
    model_dir, tc_dir = build_inputs("small", "plt")
    base = prompt_of_length(n_tokens + 8)
    # distinct prompts of the same length: rotate the text
    prompts = [(base[i:] + base[:i])[: n_tokens - 1] for i in range(n_prompts + 1)]
    return model_dir, tc_dir, prompts, "transformerlens"


# ----------------------------------------------------------------------------- our worker (child)
def run_ours(job_path: Path) -> int:
    """Child: one worker's loop (engine kept loaded; attribute + prune + artifact per prompt)."""
    from atlas.engine import EngineCache, attribute_with_halving
    from atlas.graph import AttributionSettings
    from atlas.settings import AtlasSettings

    job = json.loads(job_path.read_text())
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = AtlasSettings(device="cpu", dtype="float32")
    t0 = time.perf_counter()
    engine = EngineCache(size=1).get(job["model_dir"], job["transcoder_dir"], settings)
    load_s = time.perf_counter() - t0
    knobs = AttributionSettings()
    per_prompt = []
    for i, prompt in enumerate(job["prompts"]):
        t1, c1 = time.perf_counter(), time.process_time()
        timings: dict[str, float] = {}
        graph = attribute_with_halving(
            engine, prompt, knobs, batch_size=job["batch_size"], timings=timings
        )
        graph.save(out_dir / f"p{i}.safetensors")
        per_prompt.append(
            {"wall_s": time.perf_counter() - t1, "cpu_s": time.process_time() - c1, **timings}
        )
    (out_dir / "timing.json").write_text(json.dumps({"load_s": load_s, "prompts": per_prompt}))
    return 0


def _ct_job(job: dict[str, Any], backend: str) -> dict[str, Any]:
    return {
        **job,
        "scan": "bench",
        "device": "cpu",
        "measure_only": True,
        "backend": backend,
        "process": "pruned",
        "prompts": [
            {"slug": f"p{i}", "prompt": p, "batch_size": job["batch_size"]}
            for i, p in enumerate(job["prompts"])
        ],
    }


def _summary(wall: float, load_s: float, per_prompt: list[float], n: int) -> dict[str, Any]:
    """Prompts per minute over the prompts after the warm-up one."""
    counted = per_prompt[1:]
    total = sum(counted)
    return {
        "process_wall_s": wall,
        "load_s": load_s,
        "prompts_counted": len(counted),
        "seconds_per_prompt": total / len(counted) if counted else None,
        "prompts_per_min": 60 * len(counted) / total if total else None,
        "n_prompts": n,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="prompts per minute per worker, ours vs circuit-tracer"
    )
    ap.add_argument("--worlds", nargs="+", choices=["toy", "small"], default=["toy", "small"])
    ap.add_argument("--prompts", type=int, default=None, help="counted prompts (toy 20, small 3)")
    ap.add_argument("--tokens", type=int, default=32, help="prompt length on the small world")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    ap.add_argument("--timeout", type=float, default=None)
    ap.add_argument("--skip-ct", action="store_true")
    ap.add_argument("--out", type=Path, default=OUT / "throughput")
    ap.add_argument("--_ours", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._ours:
        return run_ours(args._ours)

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    sides = ["ours"] + ([] if args.skip_ct or not CT_PYTHON.exists() else ["ct"])
    results = []
    for name in args.worlds:
        n = args.prompts or (20 if name == "toy" else 3)
        model_dir, tc_dir, prompts, backend = world(name, n, args.tokens)
        row: dict[str, Any] = {"world": name, "ct_backend": backend, "threads": args.threads}
        for side in sides:
            out_dir = args.out / name / side
            shutil.rmtree(out_dir, ignore_errors=True)
            out_dir.mkdir(parents=True)
            job = {
                "model_dir": str(model_dir),
                "transcoder_dir": str(tc_dir),
                "out_dir": str(out_dir),
                "batch_size": args.batch_size,
                "prompts": prompts,
            }
            if side == "ct":
                job = _ct_job(job, backend)
                cmd = [str(CT_PYTHON), str(CT_WORKER)]
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_ours"]
            job_path = out_dir / "job.json"
            job_path.write_text(json.dumps(job))
            load = os.getloadavg()[0]
            print(f"[throughput] {name}: {side}, {len(prompts)} prompts (load {load:.2f}) ...")
            rc, wall, rss, cpu = _run_child([*cmd, str(job_path)], env, args.timeout)
            if rc != 0:
                what = "timed out" if rc == TIMED_OUT else f"failed ({rc})"
                row[side] = {"error": what, "process_wall_s": wall}
                continue
            if side == "ct":
                times = [
                    json.loads((out_dir / f"p{i}.timing.json").read_text())
                    for i in range(len(prompts))
                ]
                per = [t["attribute_s"] + t["write_s"] for t in times]
                per_cpu = [t["cpu_s"] for t in times]
                load_s = float(times[0]["load_s"])
            else:
                data = json.loads((out_dir / "timing.json").read_text())
                per = [p["wall_s"] for p in data["prompts"]]
                per_cpu = [p["cpu_s"] for p in data["prompts"]]
                load_s = float(data["load_s"])
            row[side] = {
                **_summary(wall, load_s, per, len(prompts)),
                "cpu_s_per_prompt": sum(per_cpu[1:]) / max(1, len(per_cpu) - 1),
                "process_cpu_s": cpu,
                "peak_rss_bytes": rss,
                "load_avg_before": load,
            }
        ours, ct = row.get("ours", {}), row.get("ct", {})
        if ours.get("prompts_per_min") and ct.get("prompts_per_min"):
            row["ours_over_ct"] = ours["prompts_per_min"] / ct["prompts_per_min"]
            row["ours_over_ct_cpu"] = ct["cpu_s_per_prompt"] / ours["cpu_s_per_prompt"]
        results.append(row)
        print(json.dumps(row, indent=1), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(
        "| world | ct backend | ours prompts/min | ct prompts/min | ours / ct "
        "| ours CPU s/prompt | ct CPU s/prompt | ct / ours CPU |"
    )
    print("| --- " * 8 + "|")
    for r in results:
        o, c = r.get("ours", {}), r.get("ct", {})
        ratio = f"{r['ours_over_ct']:.1f}x" if "ours_over_ct" in r else "-"
        ratio_cpu = f"{r['ours_over_ct_cpu']:.1f}x" if "ours_over_ct_cpu" in r else "-"

        def num(d: dict[str, Any], key: str, fmt: str) -> str:
            return format(d[key], fmt) if d.get(key) is not None else "-"

        print(
            f"| {r['world']} | {r['ct_backend']} | {num(o, 'prompts_per_min', '.1f')} "
            f"| {num(c, 'prompts_per_min', '.1f')} | {ratio} | {num(o, 'cpu_s_per_prompt', '.3f')} "
            f"| {num(c, 'cpu_s_per_prompt', '.3f')} | {ratio_cpu} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
