"""Runs circuit-tracer 0.5.0's feature interventions (the reference) on a local model. ct venv ONLY.

Executed with circuit-tracer's own interpreter (``bench/.venv-ct/bin/python``, see
``bench/ct_env.sh``) by ``bench/make_golden_interventions.py`` and ``bench/interventions.py``; the
project never imports it.

Input: a JSON job file::

    {"model_dir": "...", "transcoder_dir": "...", "scan": "case", "out": "x.safetensors",
     "prompt": "hello world", "repeat": 1,
     "specs": [{"name": "set_iter_frozen",
                "edits": [[layer, pos, feature, mode, amount]],   # pos: int or {"start": p}
                "constrained": [a, b] | null,                     # layers a..b-1
                "freeze_attention": true, "generate": 0}]}

Modes resolve against circuit-tracer's own clean activations (``get_activations``): ``set``
value = amount, ``scale`` amount * a, ``add`` a + amount, ``ablate`` 0.

Output: one safetensors file with, per spec ``name``: ``name.logits`` (P, vocab) or, for a
generation, ``name.gen_logits`` (n, vocab) and ``name.gen_tokens`` (n,); ``name.activations``
(L, P, d_tc) for interventions; metadata ``golden`` = JSON with the resolved values, the generated
text, per-spec seconds and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ct_golden_worker import _load_transcoders


def _pos(p):
    return slice(p["start"], None) if isinstance(p, dict) else int(p)


def _resolve(edits, clean):
    out = []
    for layer, pos, feature, mode, amount in edits:
        p = _pos(pos)
        a = clean[layer, p, feature]
        if mode == "set":
            value = float(amount)
        elif mode == "ablate":
            value = 0.0
        elif mode == "scale":
            value = float(amount * a) if a.ndim == 0 else amount * a
        else:
            value = float(a + amount)
        out.append((layer, p, feature, value))
    return out


def _jsonable(value):
    return value.tolist() if isinstance(value, torch.Tensor) else value


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("job", type=Path)
    args = ap.parse_args()
    job = json.loads(args.job.read_text())

    import circuit_tracer
    from circuit_tracer import ReplacementModel
    from safetensors.torch import save_file

    torch.manual_seed(0)
    device = torch.device(job.get("device", "cpu"))
    tc_dir = Path(job["transcoder_dir"]).resolve()
    transcoders = _load_transcoders(tc_dir, job.get("scan") or tc_dir.name, device)
    model = ReplacementModel.from_pretrained_and_transcoders(
        str(Path(job["model_dir"]).resolve()),
        transcoders,
        backend="nnsight",
        device=device,
        dtype=torch.float32,
    )
    prompt = job["prompt"]
    _, clean = model.get_activations(prompt)
    tensors, meta = {}, {"prompt": prompt, "specs": {}, "seconds": {}}
    for spec in job["specs"]:
        name = spec["name"]
        ivs = _resolve(spec["edits"], clean)
        rng = spec.get("constrained")
        constrained = range(rng[0], rng[1]) if rng else None
        freeze = spec.get("freeze_attention", True)
        times = []
        for _ in range(job.get("repeat", 1)):
            t0 = time.perf_counter()
            if spec.get("generate"):
                # token ids: the tokenizer's token_type_ids would reach generate() otherwise
                text, logits, _ = model.feature_intervention_generate(
                    model.ensure_tokenized(prompt)[None],
                    ivs,
                    constrained_layers=constrained,
                    freeze_attention=freeze,
                    max_new_tokens=spec["generate"],
                    do_sample=False,
                )
            else:
                logits, acts = model.feature_intervention(
                    prompt, ivs, constrained_layers=constrained, freeze_attention=freeze
                )
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        if spec.get("generate"):
            tensors[f"{name}.gen_logits"] = logits.detach().cpu().float()
            tensors[f"{name}.gen_tokens"] = logits.argmax(-1).cpu().to(torch.int64)
            meta["specs"][name] = {"text": text}
        else:
            tensors[f"{name}.logits"] = logits.detach().cpu().float().reshape(-1, logits.shape[-1])
            tensors[f"{name}.activations"] = acts.detach().cpu().float()
            meta["specs"][name] = {}
        meta["specs"][name]["resolved"] = [
            [lay, {"start": p.start} if isinstance(p, slice) else p, f, _jsonable(v)]
            for lay, p, f, v in ivs
        ]
        meta["seconds"][name] = times
        print(f"[ct] {name}: {min(times):.3f}s", file=sys.stderr)
    meta["versions"] = {"circuit_tracer": circuit_tracer.__version__, "torch": torch.__version__}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, job["out"], metadata={"golden": json.dumps(meta)})
    return 0


if __name__ == "__main__":
    sys.exit(main())
