"""Build the golden files in tests/golden/ from circuit-tracer 0.5.0 (the reference).

Runs with OUR venv (``.venv/bin/python bench/make_golden.py``): it builds tiny local models and
transcoders with ``atlas.testing.tiny`` into ``tests/golden/<case>/{model,transcoders}`` and then runs
``bench/.venv-ct/bin/python bench/ct_golden_worker.py`` (circuit-tracer's own venv, created by
``bench/ct_env.sh``) which writes, per prompt, ``<slug>.safetensors`` (dense adjacency, features,
logits, pruning masks, scores) and ``<slug>.json`` (circuit-tracer's JSON export).

Everything is seeded; re-running reproduces the same files (up to float noise in circuit-tracer).
Nothing from circuit-tracer's code is stored: the golden files are data.

Usage::

    .venv/bin/python bench/make_golden.py               # all cases
    .venv/bin/python bench/make_golden.py gemma2_clt    # one case
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

GOLDEN = ROOT / "tests" / "golden"
CT_PYTHON = ROOT / "bench" / ".venv-ct" / "bin" / "python"
WORKER = ROOT / "bench" / "ct_golden_worker.py"

#: a small model with grouped-query attention (two KV heads)
GQA_MODEL = {
    "n_layers": 2,
    "d_model": 64,
    "n_heads": 4,
    "n_kv_heads": 2,
    "d_mlp": 128,
    "vocab_size": 128,
}
#: influence-ordered feature selection: max_feature_nodes < n_active
CAT_MAXNODES = {
    "slug": "cat_maxnodes",
    "prompt": "The cat sat",
    "max_feature_nodes": 40,
    "batch_size": 8,
    "update_interval": 2,
}

#: case name -> model builder args, transcoder builder args, prompts (slug, text, extra settings)
CASES: dict[str, dict[str, Any]] = {
    "gemma2_jumprelu": {
        "family": "gemma2",
        "model": {"n_layers": 2, "d_model": 64, "n_heads": 4, "d_mlp": 128, "vocab_size": 128},
        "transcoders": {"kind": "jumprelu", "d_transcoder": 128, "target_l0": 8},
        "prompts": [
            {"slug": "hello_world", "prompt": "hello world"},
            {"slug": "sum", "prompt": "1 + 2 = 3"},
            CAT_MAXNODES,
        ],
    },
    "gemma2_clt": {
        "family": "gemma2",
        "model": {"n_layers": 3, "d_model": 64, "n_heads": 4, "d_mlp": 128, "vocab_size": 128},
        "transcoders": {"kind": "clt", "d_transcoder": 64, "target_l0": 5},
        "prompts": [
            {"slug": "hello_world", "prompt": "hello world"},
            {"slug": "paris", "prompt": "capital: Paris"},
        ],
    },
    "qwen3_gqa_relu": {
        "family": "qwen3",
        "model": GQA_MODEL,
        "transcoders": {"kind": "relu", "d_transcoder": 128, "target_l0": 8},
        "prompts": [
            {"slug": "hello_world", "prompt": "hello world"},
            {"slug": "store", "prompt": "John gave a"},
        ],
    },
    "llama_gqa_jumprelu_skip": {
        "family": "llama",
        "model": GQA_MODEL,
        "transcoders": {"kind": "jumprelu", "d_transcoder": 128, "target_l0": 8, "skip": True},
        "prompts": [
            {"slug": "hello_world", "prompt": "hello world"},
            {"slug": "sum", "prompt": "2 + 3 = 5"},
            CAT_MAXNODES,
        ],
    },
}

DEFAULTS = {"batch_size": 64, "update_interval": 4, "max_feature_nodes": None}


def run_worker(python: Path, worker: Path, job: dict[str, Any], job_path: Path) -> None:
    """Run ``worker`` under circuit-tracer's ``python`` (offline) on ``job``, written to
    ``job_path`` for the run and removed after it."""
    job_path.write_text(json.dumps(job))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    try:
        subprocess.run([str(python), str(worker), str(job_path)], check=True, env=env)
    finally:
        job_path.unlink(missing_ok=True)


def build_case(case: str, spec: dict[str, Any], device: str = "cpu") -> Path:
    """Build model + transcoders for one case and run circuit-tracer on its prompts."""
    from atlas.testing.tiny import (
        build_tiny_model,
        build_tiny_transcoders,
        portable_model_dir,
        portable_transcoder_dir,
    )

    case_dir = GOLDEN / case
    if case_dir.exists():
        shutil.rmtree(case_dir)
    model_dir = build_tiny_model(spec["family"], case_dir / "model", seed=0, **spec["model"])
    portable_model_dir(model_dir)
    tc_dir = build_tiny_transcoders(
        model_dir, case_dir / "transcoders", seed=0, **spec["transcoders"]
    )
    portable_transcoder_dir(tc_dir, case)
    prompts = [{**DEFAULTS, **p} for p in spec["prompts"]]
    (case_dir / "case.json").write_text(
        json.dumps(
            {
                "case": case,
                "family": spec["family"],
                "model": spec["model"],
                "transcoders": spec["transcoders"],
                "prompts": prompts,
                "reference": "circuit-tracer==0.5.0 (nnsight backend, float32, cpu)",
            },
            indent=1,
        )
        + "\n"
    )
    job = {
        "model_dir": str(model_dir),
        "transcoder_dir": str(tc_dir),
        "scan": case,
        "out_dir": str(case_dir),
        "device": device,
        "write_json": True,
        "prompts": prompts,
    }
    run_worker(CT_PYTHON, WORKER, job, case_dir / ".job.json")
    for timing in case_dir.glob("*.timing.json"):
        timing.unlink()
    return case_dir


def chosen_cases(ct_python: Path, asked: list[str], known: list[str]) -> list[str] | None:
    """The cases to build (every one of ``known`` when none is asked), or None once it has said
    why not: circuit-tracer's venv is missing, or a case is unknown."""
    if not ct_python.exists():
        print("circuit-tracer venv missing: run `bash bench/ct_env.sh` first", file=sys.stderr)
        return None
    for case in asked:
        if case not in known:
            print(f"unknown case {case!r}; choose from {known}", file=sys.stderr)
            return None
    return asked or known


def main() -> int:
    ap = argparse.ArgumentParser(description="Build tests/golden from circuit-tracer 0.5.0.")
    ap.add_argument("cases", nargs="*", help=f"cases to build (default: all of {list(CASES)})")
    args = ap.parse_args()
    cases = chosen_cases(CT_PYTHON, args.cases, list(CASES))
    if cases is None:
        return 2
    for case in cases:
        out = build_case(case, CASES[case])
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
        print(f"{case}: {size / 1e6:.2f} MB in {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
