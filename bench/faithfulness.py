"""Anthropic's graph validation on the toy world: :func:`atlas.interventions.faithfulness` per prompt.

For each of ``--prompts`` toy prompts (``atlas.toy.demo.demo_prompts``; text: the toy world has no
vision model), attribute, then ablate each of the ``--sources`` feature nodes of highest logit
influence under constrained patching over ``[layer, layer + 2]`` with frozen attention; print the
Spearman correlation of graph influence and measured ``|delta a| / a`` over the reachable active
feature nodes, and the log-log Pearson correlation of logit influence and ablation KL; then the
means. Anthropic report a Spearman of 0.72 on average over 20 prompts on their models.

Usage::

    .venv/bin/python bench/faithfulness.py [--prompts 20] [--sources 10]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--sources", type=int, default=10)
    args = ap.parse_args()
    from atlas.attribution import attribute
    from atlas.interventions import faithfulness
    from atlas.models import load_model
    from atlas.toy import toy_paths
    from atlas.toy.demo import demo_prompts
    from atlas.transcoders import load_transcoders

    torch.manual_seed(0)
    paths = toy_paths()
    model = load_model(paths.model_dir)
    tset = load_transcoders(paths.transcoder_dir, model)
    rows = []
    t0 = time.perf_counter()
    for prompt in demo_prompts(args.prompts):
        res = attribute(prompt, model, tset, batch_size=64)
        rep = faithfulness(model, tset, model.inputs(prompt), res, n_sources=args.sources)
        rows.append({"prompt": prompt, "spearman": rep.spearman, "log_log": rep.log_log_pearson})
        print(
            f"{prompt!r:40s} pairs {rep.influence.numel():6d}  spearman {rep.spearman:6.3f}  "
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
