"""Build tests/golden/<case>/interventions.{safetensors,json} from circuit-tracer 0.5.0.

Runs with OUR venv (``.venv/bin/python bench/make_golden_interventions.py``) on the golden cases'
existing ``model/`` and ``transcoders/`` (built by ``bench/make_golden.py``); it picks a few active
features from the case's ``hello_world`` golden graph and runs
``bench/ct_interventions_worker.py`` in circuit-tracer's own venv: set, scale and ablate, each
iterative with attention frozen and not, constrained over every layer and over layer 0 only, and
two greedy generations (an open-ended ``slice(1, None)`` edit; a constrained scale).

Usage::

    .venv/bin/python bench/make_golden_interventions.py [case ...] [--ct-python PATH]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_golden import chosen_cases, run_worker

ROOT = Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden"
WORKER = ROOT / "bench" / "ct_interventions_worker.py"
CASES = ("gemma2_jumprelu", "gemma2_clt", "qwen3_gqa_relu", "llama_gqa_jumprelu_skip")
PROMPT_SLUG = "hello_world"


def default_ct_python() -> Path:
    """circuit-tracer's interpreter: this checkout's ``bench/.venv-ct``, else the main one's."""
    here = ROOT / "bench" / ".venv-ct" / "bin" / "python"
    return here if here.exists() else Path("/work/main/bench/.venv-ct/bin/python")


def pick_features(case_dir: Path) -> dict[str, list[int]]:
    """Three active features of the golden graph: the strongest at layer 0 at the last
    position, the strongest at layer 0 elsewhere, the strongest in the last layer at the end."""
    from safetensors.torch import load_file

    g = load_file(str(case_dir / f"{PROMPT_SLUG}.safetensors"))
    feats, vals = g["active_features"], g["activation_values"]
    last = int(g["input_ids"].shape[0]) - 1
    top_layer = int(feats[:, 0].max())

    def best(mask: Any) -> list[int]:
        idx = int((vals * mask).argmax())
        return [int(v) for v in feats[idx]]

    lay, pos = feats[:, 0], feats[:, 1]
    return {
        "a": best((lay == 0) & (pos == last)),
        "b": best((lay == 0) & (pos != last) & (pos > 0)),
        "c": best((lay == top_layer) & (pos == last)),
    }


def pick_top(acts: Any) -> dict[str, list[int]]:
    """The same three features from clean activations ``(L, P, d_tc)`` (position 0 excluded)."""
    n_layers, n_pos, _ = acts.shape
    last = n_pos - 1

    def best(layer: int, positions: list[int]) -> list[int]:
        sub = acts[layer, positions]
        idx = int(sub.argmax())
        p, f = divmod(idx, sub.shape[1])
        return [layer, positions[p], f]

    return {
        "a": best(0, [last]),
        "b": best(0, list(range(1, last))),
        "c": best(n_layers - 1, [last]),
    }


def specs(n_layers: int, f: dict[str, list[int]]) -> list[dict[str, Any]]:
    """The interventions of one case (edits as ``[layer, pos, feature, mode, amount]``)."""
    a, b, c = f["a"], f["b"], f["c"]
    edits = {
        "set": [[a[0], a[1], a[2], "set", 4.0]],
        "scale": [[b[0], b[1], b[2], "scale", -2.0], [c[0], c[1], c[2], "scale", 3.0]],
        "ablate": [[a[0], a[1], a[2], "ablate", 0.0], [c[0], c[1], c[2], "ablate", 0.0]],
    }
    modes = {
        "iter_frozen": (None, True),
        "iter_live": (None, False),
        "constrained_all": ([0, n_layers], True),
        "constrained_first": ([0, 1], False),
    }
    out = [
        {"name": f"{e}_{m}", "edits": ed, "constrained": rng, "freeze_attention": fr}
        for e, ed in edits.items()
        for m, (rng, fr) in modes.items()
    ]
    out.append(
        {
            "name": "generate_open_ended",
            "edits": [[a[0], {"start": 1}, a[2], "set", 3.0]],
            "constrained": None,
            "freeze_attention": True,
            "generate": 4,
        }
    )
    out.append(
        {
            "name": "generate_constrained",
            "edits": edits["scale"],
            "constrained": [0, n_layers],
            "freeze_attention": True,
            "generate": 4,
        }
    )
    return out


def run_ct(
    ct_python: Path, case_dir: Path, prompt: str, job_specs: list[dict], out: Path, repeat: int = 1
) -> dict[str, Any]:
    """Run the worker on one case; returns its metadata (the tensors are in ``out``)."""
    from safetensors import safe_open

    job = {
        "model_dir": str(case_dir / "model"),
        "transcoder_dir": str(case_dir / "transcoders"),
        "scan": case_dir.name,
        "out": str(out),
        "prompt": prompt,
        "repeat": repeat,
        "specs": job_specs,
    }
    run_worker(ct_python, WORKER, job, out.with_suffix(".job.json"))
    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    return dict(json.loads(meta["golden"]))


def build_case(case: str, ct_python: Path) -> Path:
    case_dir = GOLDEN / case
    info = json.loads((case_dir / "case.json").read_text())
    prompt = next(p["prompt"] for p in info["prompts"] if p["slug"] == PROMPT_SLUG)
    feats = pick_features(case_dir)
    job_specs = specs(int(info["model"]["n_layers"]), feats)
    out = case_dir / "interventions.safetensors"
    meta = run_ct(ct_python, case_dir, prompt, job_specs, out)
    record = {
        "case": case,
        "prompt": prompt,
        "features": feats,
        "specs": job_specs,
        "reference": meta,
        "note": "circuit-tracer==0.5.0 (nnsight backend, float32, cpu); modes resolved against "
        "its clean activations; constrained [a, b] = layers a..b-1",
    }
    (case_dir / "interventions.json").write_text(json.dumps(record, indent=1) + "\n")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cases", nargs="*", help=f"cases (default: all of {list(CASES)})")
    ap.add_argument("--ct-python", type=Path, default=default_ct_python())
    args = ap.parse_args()
    cases = chosen_cases(args.ct_python, args.cases, list(CASES))
    if cases is None:
        return 2
    for case in cases:
        out = build_case(case, args.ct_python)
        print(f"{case}: {out.stat().st_size / 1e3:.0f} kB in {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
