"""Seconds per intervention, ours against circuit-tracer 0.5.0's, on the same model in one run.

Builds one tiny Gemma-2 model with JumpReLU transcoders (``atlas.testing.tiny``; sizes below),
runs the interventions of ``bench/make_golden_interventions.py`` (set / scale / ablate, iterative
with attention frozen and live, constrained over every layer and over layer 0; two 4-token greedy
generations) ``--repeat`` times in circuit-tracer's own venv (``bench/ct_interventions_worker.py``,
nnsight backend) and here, and prints the best time of each with the ratio. Each of our runs
includes its clean pass (circuit-tracer's does too). Also checks that both agree (last-position
logits, relative).

Usage::

    .venv/bin/python bench/interventions.py [--layers 4] [--d-model 128] [--d-tc 512] [--repeat 5]
        [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden_interventions import default_ct_python, pick_top, run_ct, specs


def _edits(spec: dict) -> list:
    from atlas.interventions import FeatureEdit

    return [
        FeatureEdit(lay, slice(p["start"], None) if isinstance(p, dict) else p, f, mode, amount)
        for lay, p, f, mode, amount in spec["edits"]
    ]


def _ours(model_dir: Path, tc_dir: Path, prompt: str, job_specs: list, repeat: int) -> dict:
    from atlas.interventions import feature_intervention, generate
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    model = load_model(model_dir)
    tset = load_transcoders(tc_dir, model)
    inputs = model.inputs(prompt)
    out: dict = {}
    for spec in job_specs:
        rng = spec["constrained"]
        kwargs = {
            "constrained": range(rng[0], rng[1]) if rng else None,
            "freeze_attention": spec["freeze_attention"],
        }
        times = []
        for _ in range(repeat):
            t0 = time.perf_counter()
            if spec.get("generate"):
                res = generate(model, tset, inputs, _edits(spec), spec["generate"], **kwargs)
            else:
                res = feature_intervention(model, tset, inputs, _edits(spec), **kwargs)
            if model.device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        last = res.generated_logits if spec.get("generate") else res.logits
        out[spec["name"]] = (min(times), last)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--d-tc", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--prompt", default="The cat sat on the mat and looked at the dog")
    ap.add_argument("--ct-python", type=Path, default=default_ct_python())
    ap.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the circuit-tracer subprocess too
    torch.set_num_threads(args.threads)
    from safetensors.torch import load_file

    from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = build_tiny_model(
            "gemma2",
            root / "model",
            n_layers=args.layers,
            d_model=args.d_model,
            d_mlp=4 * args.d_model,
        )
        tc_dir = build_tiny_transcoders(model_dir, root / "transcoders", d_transcoder=args.d_tc)
        from atlas.interventions import clean_run
        from atlas.models import load_model
        from atlas.transcoders import load_transcoders

        model = load_model(model_dir)
        tset = load_transcoders(tc_dir, model)
        acts = clean_run(model, tset, model.inputs(args.prompt)).activations
        job_specs = specs(args.layers, pick_top(acts))
        case = root / "case"
        case.mkdir()
        (case / "model").symlink_to(model_dir)
        (case / "transcoders").symlink_to(tc_dir)
        ref_path = root / "ct.safetensors"
        meta = run_ct(args.ct_python, case, args.prompt, job_specs, ref_path, args.repeat)
        ref = load_file(str(ref_path))
        ours = _ours(model_dir, tc_dir, args.prompt, job_specs, args.repeat)
    print(
        f"gemma2 {args.layers} layers, d_model {args.d_model}, d_tc {args.d_tc}, "
        f"{len(model.inputs(args.prompt).input_ids)} tokens, best of {args.repeat}, cpu, "
        f"{args.threads} thread(s)"
    )
    print(f"{'intervention':32s} {'ours s':>8s} {'ct s':>8s} {'ct/ours':>8s} {'max rel':>9s}")
    ratios = []
    for spec in job_specs:
        name = spec["name"]
        t_ours, logits = ours[name]
        t_ct = min(meta["seconds"][name])
        key = f"{name}.gen_logits" if spec.get("generate") else f"{name}.logits"
        r = ref[key]
        rel = float((logits - r).abs().max() / r.abs().max())
        ratios.append(t_ct / t_ours)
        print(f"{name:32s} {t_ours:8.4f} {t_ct:8.4f} {t_ct / t_ours:8.2f} {rel:9.1e}")
    geo = float(torch.tensor(ratios).log().mean().exp())
    print(f"geometric mean ct/ours: {geo:.2f}")
    print(json.dumps({"geomean_ct_over_ours": geo}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
