"""Side-by-side benchmark: circuit-tracer 0.5.0 (the peer) vs our engine, same inputs, one run.

The peer is circuit-tracer's fastest configuration: its TransformerLens backend (its default;
``--ct-backend nnsight`` for the other), loaded from the local model as
``bench/ct_golden_worker.py`` describes. Every run is a FRESH subprocess (circuit-tracer in its own
venv, ``bench/.venv-ct``; ours in this venv) on the same local model, transcoders and prompt, and
the sides are interleaved (ours, ct, ours, ct, ...; ``--reps``), medians reported with the load
average before each run, since the machines this runs on are often shared. Modes:

  attribute  ``attribute()`` alone (loading excluded) and its pruning time, inside a process that
             also saves the tensors the outputs are compared on: active features, logit targets,
             sampled adjacency rows (all logit rows and the feature rows whose identity hashes to
             0 mod 64, columns aligned by node identity)
  pruned     whole user processes: circuit-tracer's load + ``attribute()`` + ``create_graph_files``
             (pruning + graph JSON) against ``atlas attribute`` (load, attribute, prune, artifact,
             JSON)
  unpruned   circuit-tracer's load + ``attribute()`` + ``Graph.to_pt`` against ``atlas attribute
             --no-prune`` (the full artifact; its JSON refused above the link limit)

For each: process CPU and wall time and peak RSS (``os.wait4`` rusage of that child alone; plus
peak CUDA memory on GPU), ``attribute()``'s CPU time on both sides, ratios ct / ours, the peer's
backend on every row; then, for the whole processes, where their CPU time goes (ours from
``atlas attribute --timings``, the peer's phases from its worker). ``--timeout`` kills a child that
runs longer and says so.

Shapes:
  small      Gemma-2 shape: 8 layers, d_model 256, d_mlp 1024, vocab 2048, positions up to 4,096;
             per-layer JumpReLU transcoders 4096 wide (~32 active per token); variant ``clt``: a
             cross-layer transcoder of the same width.
  gemma2-2b  Gemma-2-2B shape (26 layers, d_model 2304, d_mlp 9216, vocab 256000) with random
             weights + 16k-wide transcoders: for GPU runs (``--device cuda``).

Usage::

    .venv/bin/python bench/attribution.py                        # small, 32 + 64 tokens, 3 modes
    .venv/bin/python bench/attribution.py --lengths 32 --modes attribute pruned --reps 2
    .venv/bin/python bench/attribution.py --lengths 256 1024 --max-feature-nodes 8192 --timeout 1800
    .venv/bin/python bench/attribution.py --device cuda --shape gemma2-2b --lengths 64 512
    .venv/bin/python bench/attribution.py --skip-ct              # ours only (no ct venv)

Models are built once under ``bench/out/models/<shape>`` (gitignored) with atlas.testing.tiny.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"
CT_PYTHON = BENCH / ".venv-ct" / "bin" / "python"
CT_WORKER = BENCH / "ct_golden_worker.py"

SHAPES: dict[str, dict[str, Any]] = {
    "small": {
        "model": {"n_layers": 8, "d_model": 256, "n_heads": 4, "d_mlp": 1024, "vocab_size": 2048},
        "d_transcoder": 4096,
        # atlas.testing.tiny's calibration target; gives ~32 active features per token on the bench
        # prompts (8.8k features at 33 tokens, as in REFERENCE.md's measurements)
        "target_l0": 20,
        "max_positions": 4096,
    },
    # bench/gpu.sh --dry-run: the GPU script's steps on CPU in seconds
    "tiny": {
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "vocab_size": 512},
        "d_transcoder": 256,
        "target_l0": 8,
        "max_positions": 1024,
    },
    "gemma2-2b": {
        "model": {
            "n_layers": 26,
            "d_model": 2304,
            "n_heads": 8,
            "n_kv_heads": 4,
            "d_mlp": 9216,
            "vocab_size": 256000,
        },
        "d_transcoder": 16384,
        "target_l0": 64,
        "max_positions": 8192,
    },
}

_TEXT = (
    "The quick brown fox jumps over the lazy dog while Mary and John went to the store; "
    "John gave a drink to Mary. Fact: the capital of France is Paris, 1 + 2 = 3 and 2 + 3 = 5. "
)


def prompt_of_length(n_tokens: int) -> str:
    """A prompt of exactly ``n_tokens`` tokens with the character-level tiny tokenizer (BOS + chars)."""
    n_chars = n_tokens - 1
    text = (_TEXT * (n_chars // len(_TEXT) + 1))[:n_chars]
    return text


def sample_rows(features: Any, n_nodes: int, n_logits: int, stride: int = 64) -> Any:
    """Same rule as ``ct_golden_worker.sample_rows`` (logit rows + hashed feature rows)."""
    import torch

    lay, pos, feat = features[:, 0], features[:, 1], features[:, 2]
    keep = ((lay * 7919 + pos * 104729 + feat) % stride) == 0
    rows = torch.nonzero(keep).flatten()
    logits = torch.arange(n_nodes - n_logits, n_nodes)
    return torch.cat([rows, logits]).to(torch.int64)


# ----------------------------------------------------------------------------- building inputs
def _allow_positions(model_dir: Path, n: int) -> None:
    """Raise the config's ``max_position_embeddings`` to ``n`` (rotary: no weights change), so
    long-prompt runs are admissible on both sides."""
    path = model_dir / "config.json"
    cfg = json.loads(path.read_text())
    if cfg.get("max_position_embeddings", 0) < n:
        cfg["max_position_embeddings"] = n
        path.write_text(json.dumps(cfg, indent=2) + "\n")


def build_inputs(shape: str, variant: str) -> tuple[Path, Path]:
    """Model dir and transcoder dir for (shape, variant), built once and cached."""
    from atlas.testing.tiny import (
        build_tiny_model,
        build_tiny_transcoders,
        portable_model_dir,
        portable_transcoder_dir,
    )

    spec = SHAPES[shape]
    base = OUT / "models" / shape
    model_dir = base / "model"
    if not (model_dir / "config.json").exists():
        print(f"[bench] building {shape} model in {model_dir} ...", flush=True)
        build_tiny_model("gemma2", model_dir, seed=0, **spec["model"])
        portable_model_dir(model_dir)
    _allow_positions(model_dir, spec.get("max_positions", 0))
    tc_dir = base / f"transcoders-{variant}"
    if not (tc_dir / "config.yaml").exists():
        print(f"[bench] building {variant} transcoders in {tc_dir} ...", flush=True)
        build_tiny_transcoders(
            model_dir,
            tc_dir,
            kind="clt" if variant == "clt" else "jumprelu",
            d_transcoder=spec["d_transcoder"],
            target_l0=spec["target_l0"],
            seed=0,
        )
        portable_transcoder_dir(tc_dir, f"bench-{shape}-{variant}")
    return model_dir, tc_dir


# ----------------------------------------------------------------------------- our side (child)
def run_ours(job_path: Path) -> int:
    """Child process: our engine on the job's prompts (same outputs as the ct worker)."""
    import resource

    import torch
    from safetensors.torch import save_file

    from atlas.attribution import attribute
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    job = json.loads(job_path.read_text())
    device = job.get("device", "cpu")
    out_dir = Path(job["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    dtype = getattr(torch, job.get("dtype", "float32"))
    model = load_model(job["model_dir"], device=device, dtype=dtype)
    tcs = load_transcoders(job["transcoder_dir"], model, device=device, dtype=dtype)
    load_s = time.perf_counter() - t0
    for spec in job["prompts"]:
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t1, c1 = time.perf_counter(), time.process_time()
        progress_path = out_dir / f"{spec['slug']}.progress.jsonl"
        progress_path.unlink(missing_ok=True)
        batch = int(spec.get("batch_size", 64))

        def progress(done: int, total: int, path: Path = progress_path, batch: int = batch) -> None:
            # rows done, CPU seconds and peak RSS so far: how memory grows with the rows kept
            if done % (8 * batch) < batch or done == total:
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                line = {"rows": done, "of": total, "cpu_s": time.process_time(), "peak_rss_kb": rss}
                with path.open("a") as fh:
                    fh.write(json.dumps(line) + "\n")

        r = attribute(
            spec["prompt"],
            model,
            tcs,
            batch_size=spec.get("batch_size", 64),
            max_feature_nodes=spec.get("max_feature_nodes"),
            progress=progress,
        )
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        attr_s = time.perf_counter() - t1
        attr_cpu_s = time.process_time() - c1
        t2 = time.perf_counter()
        g = r.to_graph(prune=True)
        prune_s = time.perf_counter() - t2
        rep, comp = r.scores()
        adj = r.adjacency
        feats = r.active_features[r.selected_features].cpu()
        rows = sample_rows(feats, int(adj.shape[0]), int(r.logit_tokens.shape[0]))
        tensors = {
            "input_ids": r.input_ids.cpu().to(torch.int64),
            "active_features": r.active_features.cpu().to(torch.int64),
            "activation_values": r.activation_values.cpu().float(),
            "selected_features": r.selected_features.cpu().to(torch.int64),
            "logit_tokens": r.logit_tokens.cpu().to(torch.int64),
            "logit_probabilities": r.logit_probabilities.cpu().float(),
            "row_index": rows,
            "adjacency_rows": adj[rows.to(adj.device)].cpu().float(),
        }
        meta = {
            "attribute_s": attr_s,
            "attribute_cpu_s": attr_cpu_s,
            "prune_s": prune_s,
            "load_s": load_s,
            "n_nodes": int(adj.shape[0]),
            "n_active": int(r.active_features.shape[0]),
            "n_tokens": int(r.input_ids.shape[0]),
            "n_pruned_nodes": g.n_nodes,
            "n_pruned_edges": g.n_edges,
            "replacement_score": rep,
            "completeness_score": comp,
            "self_peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }
        if device.startswith("cuda"):
            meta["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        save_file(tensors, str(out_dir / f"{spec['slug']}.safetensors"))
        (out_dir / f"{spec['slug']}.timing.json").write_text(json.dumps(meta, indent=1))
        del r, g, adj
    return 0


# ----------------------------------------------------------------------------- driver
def _run_child(
    cmd: list[str], env: dict[str, str], timeout: float | None = None
) -> tuple[int, float, int, float]:
    """Run ``cmd``; return (exit code, wall s, peak RSS bytes, CPU s) of that child alone.

    Past ``timeout`` seconds the child is killed and the exit code is ``TIMED_OUT``.
    """
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    deadline = None if timeout is None else t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            _, status, usage = os.wait4(proc.pid, 0)
            return TIMED_OUT, time.perf_counter() - t0, int(usage.ru_maxrss) * 1024, 0.0
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    cpu = usage.ru_utime + usage.ru_stime
    return proc.returncode, wall, int(usage.ru_maxrss) * 1024, cpu  # Linux: ru_maxrss in KiB


TIMED_OUT = -999

#: what each benchmark mode runs: ``attribute`` times attribute() inside a process that also
#: saves the comparison tensors; ``pruned`` / ``unpruned`` time whole user processes
MODES = ("attribute", "pruned", "unpruned")


def _command(
    side: str, mode: str, job_path: Path, job: dict[str, Any], spec: dict[str, Any]
) -> list[str]:
    """The child process of ``side`` in ``mode``.

    Whole processes are what a user runs: circuit-tracer's worker in process mode (load,
    ``attribute()``, ``create_graph_files`` or ``Graph.to_pt``), and ``atlas attribute`` (load,
    attribute, prune, the safetensors artifact and the JSON; ``--no-prune``: the full artifact, the
    JSON refused above its size limit).
    """
    if side == "ct":
        return [str(CT_PYTHON), str(CT_WORKER), str(job_path)]
    if mode == "attribute":
        return [sys.executable, str(Path(__file__).resolve()), "--_ours", str(job_path)]
    cmd = [
        str(Path(sys.executable).with_name("atlas")),
        "attribute",
        "--model",
        job["model_dir"],
        "--transcoders",
        job["transcoder_dir"],
        "--prompt",
        spec["prompt"],
        "--batch-size",
        str(spec["batch_size"]),
        "--device",
        job["device"],
        "--dtype",
        job["dtype"],
        "--no-progress",
        "--out",
        job["out_dir"],
    ]
    if spec.get("max_feature_nodes") is not None:
        cmd += ["--max-feature-nodes", str(spec["max_feature_nodes"])]
    if mode == "unpruned":
        cmd.append("--no-prune")
    cmd += ["--timings", str(Path(job["out_dir"]) / f"{spec['slug']}.phases.json")]
    return cmd


def _one_run(
    side: str,
    mode: str,
    spec: dict[str, Any],
    dirs: tuple[Path, Path],
    args: argparse.Namespace,
    env: dict[str, str],
) -> dict[str, Any]:
    """One child of ``side`` in ``mode``: its timing file plus wall, CPU, peak RSS, load."""
    slug = spec["slug"]
    out_dir = args.out / side / mode
    out_dir.mkdir(parents=True, exist_ok=True)
    job: dict[str, Any] = {
        "model_dir": str(dirs[0]),
        "transcoder_dir": str(dirs[1]),
        "scan": slug,
        "out_dir": str(out_dir),
        "device": args.device,
        "dtype": args.dtype,
        "measure_only": True,
        "save_adjacency": "rows",
        "backend": args.ct_backend,
        "prompts": [spec],
    }
    if mode != "attribute":
        job["process"] = mode
    job_path = out_dir / f"{slug}.job.json"
    job_path.write_text(json.dumps(job))
    timing_path = out_dir / f"{slug}.timing.json"
    timing_path.unlink(missing_ok=True)
    phases_path = out_dir / f"{slug}.phases.json"
    phases_path.unlink(missing_ok=True)
    load = os.getloadavg()[0]
    print(f"[bench] {slug} {mode}: {side} (load {load:.2f}) ...", flush=True)
    rc, wall, rss, cpu = _run_child(_command(side, mode, job_path, job, spec), env, args.timeout)
    res: dict[str, Any] = {"load_avg_before": load, "process_wall_s": wall, "peak_rss_bytes": rss}
    if rc == TIMED_OUT:
        print(f"[bench] {slug} {mode}: {side} did not finish in {args.timeout:.0f} s")
        return {**res, "timed_out": True}
    if rc != 0:
        print(f"[bench] {slug} {mode}: {side} failed with exit code {rc}")
        return {**res, "error": rc}
    res["process_cpu_s"] = cpu
    if timing_path.exists():
        res.update(json.loads(timing_path.read_text()))
    if phases_path.exists():  # ours, whole process: CPU per phase (atlas attribute --timings)
        phases = json.loads(phases_path.read_text())["phases"]
        res["phases"] = phases
        res["attribute_cpu_s"] = sum(p["cpu_s"] for p in phases if p["phase"] == "attribute()")
    return res


def _compare(ct_file: Path, our_file: Path, n_layers: int) -> dict[str, Any]:
    import torch
    from safetensors.torch import load_file

    a, b = load_file(str(ct_file)), load_file(str(our_file))
    out: dict[str, Any] = {}
    fa = {tuple(x) for x in a["active_features"].tolist()}
    fb = {tuple(x) for x in b["active_features"].tolist()}
    out["active_equal"] = fa == fb
    out["active_diff"] = len(fa ^ fb)
    out["logits_equal"] = a["logit_tokens"].tolist() == b["logit_tokens"].tolist()

    def idents(t: dict[str, torch.Tensor]) -> list[tuple]:
        n_pos = int(t["input_ids"].shape[0])
        ids: list[tuple] = [
            ("f", *x) for x in t["active_features"][t["selected_features"]].tolist()
        ]
        ids += [("e", lay, p) for lay in range(n_layers) for p in range(n_pos)]
        ids += [("t", p) for p in range(n_pos)]
        ids += [("l", int(x)) for x in t["logit_tokens"].tolist()]
        return ids

    ia, ib = idents(a), idents(b)
    index_b = {x: i for i, x in enumerate(ib)}
    rows_a = {ia[int(r)]: k for k, r in enumerate(a["row_index"].tolist())}
    rows_b = {ib[int(r)]: k for k, r in enumerate(b["row_index"].tolist())}
    common_rows = [x for x in rows_a if x in rows_b]
    cols = [i for i, x in enumerate(ia) if x in index_b]
    cols_b = [index_b[ia[i]] for i in cols]
    ra = a["adjacency_rows"][[rows_a[x] for x in common_rows]][:, cols].double()
    rb = b["adjacency_rows"][[rows_b[x] for x in common_rows]][:, cols_b].double()
    scale = float(ra.abs().max()) if ra.numel() else 1.0
    diff = (ra - rb).abs()
    out["rows_compared"] = len(common_rows)
    out["max_abs_diff_over_max"] = float(diff.max()) / scale if diff.numel() else 0.0
    big = ra.abs() > 1e-3 * scale
    out["max_rel_diff"] = float((diff[big] / ra.abs()[big]).max()) if big.any() else 0.0
    return out


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median of every numeric field over the runs that finished (the others are reported)."""
    ok = [r for r in runs if "error" not in r and "timed_out" not in r]
    if not ok:
        return runs[-1] | {"runs": len(runs)}
    out: dict[str, Any] = dict(ok[-1])
    for key, value in ok[-1].items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[key] = statistics.median(float(r[key]) for r in ok if key in r)
    if all("phases" in r for r in ok):  # per phase, the median over the runs
        names = [p["phase"] for p in ok[-1]["phases"]]
        out["phases"] = [
            {
                "phase": name,
                "cpu_s": statistics.median(
                    sum(p["cpu_s"] for p in r["phases"] if p["phase"] == name) for r in ok
                ),
            }
            for name in names
        ]
    out["runs"] = len(ok)
    out["all_wall_s"] = [round(r["process_wall_s"], 2) for r in runs]
    out["all_cpu_s"] = [round(r["process_cpu_s"], 2) for r in ok]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="circuit-tracer 0.5.0 vs our engine, side by side")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--shape", choices=sorted(SHAPES), default="small")
    ap.add_argument("--lengths", type=int, nargs="+", default=[32, 64], help="prompt tokens")
    ap.add_argument("--variants", nargs="+", choices=["plt", "clt"], default=["plt"])
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads of every child, both sides (0: torch's default); 1 keeps CPU time "
        "meaningful on a shared machine (idle OpenMP threads spin)",
    )
    ap.add_argument("--max-feature-nodes", type=int, default=None)
    ap.add_argument("--reps", type=int, default=2, help="interleaved runs per side (median)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds before a child is killed")
    ap.add_argument(
        "--ct-backend",
        choices=["transformerlens", "nnsight"],
        default="transformerlens",
        help="circuit-tracer backend (default: its fastest, TransformerLens)",
    )
    ap.add_argument("--skip-ct", action="store_true", help="only our engine")
    ap.add_argument("--skip-ours", action="store_true", help="only circuit-tracer")
    ap.add_argument("--out", type=Path, default=OUT / "runs")
    ap.add_argument("--_ours", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._ours:
        return run_ours(args._ours)

    sides = []
    if not args.skip_ours:
        sides.append("ours")
    if not args.skip_ct:
        if CT_PYTHON.exists():
            sides.append("ct")
        else:
            print("[bench] no circuit-tracer venv (bash bench/ct_env.sh); running ours only")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = str(ROOT)
    if args.threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env[var] = str(args.threads)
    n_layers = SHAPES[args.shape]["model"]["n_layers"]
    results = []
    for variant in args.variants:
        dirs = build_inputs(args.shape, variant)
        for n_tok in args.lengths:
            spec = {
                "slug": f"{args.shape}-{variant}-{n_tok}",
                "prompt": prompt_of_length(n_tok),
                "batch_size": args.batch_size,
                "max_feature_nodes": args.max_feature_nodes,
            }
            for mode in args.modes:
                row: dict[str, Any] = {
                    "case": spec["slug"],
                    "mode": mode,
                    "n_tokens": n_tok,
                    "max_feature_nodes": args.max_feature_nodes,
                    "ct_backend": args.ct_backend,
                    "dtype": args.dtype,
                    "threads": args.threads,
                }
                runs: dict[str, list[dict[str, Any]]] = {side: [] for side in sides}
                for _ in range(args.reps):  # interleaved: ours, ct, ours, ct
                    for side in sides:
                        runs[side].append(_one_run(side, mode, spec, dirs, args, env))
                        if runs[side][-1].get("timed_out"):
                            break
                for side in sides:
                    row[side] = _median_of(runs[side])
                if mode == "attribute" and all(
                    "attribute_s" in row.get(side, {}) for side in ("ct", "ours")
                ):
                    row["compare"] = _compare(
                        args.out / "ct" / mode / f"{spec['slug']}.safetensors",
                        args.out / "ours" / mode / f"{spec['slug']}.safetensors",
                        n_layers,
                    )
                results.append(row)
                _print_row(row)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print()
    _print_table(results)
    return 0


def _fmt_mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 2**20:,.0f}"


def _print_row(row: dict[str, Any]) -> None:
    print(json.dumps(row, indent=1, default=str), flush=True)


def _ratio(ct: dict[str, Any], us: dict[str, Any], key: str) -> str:
    """ct / ours for ``key`` (so > 1 means ours is faster or smaller)."""
    if key in ct and key in us and us[key] and not ct.get("timed_out"):
        return f"{ct[key] / us[key]:.1f}x"
    return "-"


def _print_table(results: list[dict[str, Any]]) -> None:
    """One line per (case, mode): medians of the interleaved runs and ct / ours ratios (> 1:
    ours faster or smaller), then where each whole process's CPU time goes."""
    nan = float("nan")
    print(
        "| case | mode | peer backend | N | ct CPU s | ours CPU s | x | ct wall s | ours wall s "
        "| x | ct attribute() CPU s | ours attribute() CPU s | x | ct peak RSS MB "
        "| ours peak RSS MB | x | load avg | agreement |"
    )
    print("| --- " * 18 + "|")
    for r in results:
        ct, us = r.get("ct", {}), r.get("ours", {})
        n = us.get("n_nodes") or ct.get("n_nodes") or 0
        cmp_ = r.get("compare", {})
        agree = f"feats {cmp_['active_equal']}, rel {cmp_['max_rel_diff']:.1e}" if cmp_ else "-"
        ct_wall = (
            f">{ct['process_wall_s']:.0f} (killed)"
            if ct.get("timed_out")
            else f"{ct.get('process_wall_s', nan):.1f}"
        )
        loads = [d.get("load_avg_before") for d in (ct, us) if "load_avg_before" in d]
        print(
            f"| {r['case']} | {_MODE_LABEL.get(r['mode'], r['mode'])} | {r['ct_backend']} "
            f"| {int(n):,} "
            f"| {ct.get('process_cpu_s', nan):.1f} | {us.get('process_cpu_s', nan):.1f} "
            f"| {_ratio(ct, us, 'process_cpu_s')} "
            f"| {ct_wall} | {us.get('process_wall_s', nan):.1f} "
            f"| {_ratio(ct, us, 'process_wall_s')} "
            f"| {ct.get('attribute_cpu_s', nan):.2f} | {us.get('attribute_cpu_s', nan):.2f} "
            f"| {_ratio(ct, us, 'attribute_cpu_s')} "
            f"| {_fmt_mb(ct.get('peak_rss_bytes'))} | {_fmt_mb(us.get('peak_rss_bytes'))} "
            f"| {_ratio(ct, us, 'peak_rss_bytes')} "
            f"| {statistics.median(loads) if loads else nan:.2f} | {agree} |"
        )
        for side, d in (("ct", ct), ("ours", us)):
            if "peak_cuda_bytes" in d:
                print(f"    {side} peak CUDA memory: {_fmt_mb(d['peak_cuda_bytes'])} MB")
    _print_profiles(results)


_MODE_LABEL = {
    "attribute": "attribute() alone",
    "pruned": "whole process, pruned + JSON",
    "unpruned": "whole process, unpruned",
}


def _print_profiles(results: list[dict[str, Any]]) -> None:
    """Where each whole process's CPU time goes (medians per phase); what the phases leave
    unaccounted is the interpreter's start and exit."""
    for r in results:
        if r["mode"] == "attribute":
            continue
        for side in ("ours", "ct"):
            d = r.get(side, {})
            if "phases" not in d or "process_cpu_s" not in d:
                continue
            total = float(d["process_cpu_s"])
            parts = [(p["phase"], float(p["cpu_s"])) for p in d["phases"]]
            parts.append(("rest (exit, unaccounted)", max(0.0, total - sum(c for _, c in parts))))
            text = ", ".join(
                f"{name} {cpu:.1f} s ({100 * cpu / total:.0f}%)" for name, cpu in parts
            )
            print(f"  profile {r['case']} {r['mode']} {side} ({total:.1f} CPU s): {text}")


if __name__ == "__main__":
    sys.exit(main())
