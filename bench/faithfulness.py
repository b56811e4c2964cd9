"""Anthropic's graph validation on the toy world: :func:`atlas.interventions.faithfulness` per prompt.

For each of ``--prompts`` toy prompts (``atlas.toy.demo.demo_prompts``; with ``--vision``, the
toy VLM's demo image prompts, ``atlas.toy.vision_demo.demo_image_prompts``, every kind in turn),
attribute, then ablate each of the ``--sources`` feature nodes of highest logit
influence under constrained patching over ``[layer, layer + 2]`` with frozen attention; print the
Spearman correlation of graph influence and measured ``|delta a| / a`` over the reachable active
feature nodes, and the log-log Pearson correlation of logit influence and ablation KL; then the
means. Anthropic report a Spearman of 0.72 on average over 20 prompts on their models.

Usage::

    .venv/bin/python bench/faithfulness.py [--prompts 20] [--sources 10] [--vision]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--vision", action="store_true", help="Image prompts on the toy VLM.")
    args = ap.parse_args()
    from atlas.attribution import attribute
    from atlas.interventions import faithfulness
    from atlas.models import load_model
    from atlas.toy import toy_paths
    from atlas.toy.demo import demo_prompts
    from atlas.transcoders import load_transcoders

    torch.manual_seed(0)
    cases: list[tuple[str, str | None, str]]
    if args.vision:
        import tempfile

        from atlas.toy.vision_build import vision_paths
        from atlas.toy.vision_demo import demo_image_prompts

        paths = vision_paths()
        items = demo_image_prompts(Path(tempfile.mkdtemp(prefix="faithfulness-")))
        by_kind: dict[str, list] = {}
        for it in items:
            by_kind.setdefault(it.tags[0], []).append(it)
        mixed = [it for group in zip(*by_kind.values(), strict=False) for it in group]
        cases = [(it.prompt, str(it.image), it.image.stem) for it in mixed[: args.prompts]]
    else:
        paths = toy_paths()
        cases = [(p, None, p) for p in demo_prompts(args.prompts)]
    model = load_model(paths.model_dir)
    tset = load_transcoders(paths.transcoder_dir, model)
    rows = []
    t0 = time.perf_counter()
    for prompt, image, name in cases:
        res = attribute(prompt, model, tset, image=image, batch_size=64)
        inputs = model.inputs(prompt, image=image)
        rep = faithfulness(model, tset, inputs, res, n_sources=args.sources)
        rows.append({"prompt": name, "spearman": rep.spearman, "log_log": rep.log_log_pearson})
        print(
            f"{name!r:40s} pairs {rep.influence.numel():6d}  spearman {rep.spearman:6.3f}  "
            f"log-log {rep.log_log_pearson:6.3f}"
        )

    def mean(key: str) -> float:
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        return sum(vals) / len(vals) if vals else float("nan")

    summary = {
        "prompts": len(rows),
        "mean_spearman": mean("spearman"),
        "mean_log_log_pearson": mean("log_log"),
        "seconds": time.perf_counter() - t0,
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
