"""Transcoders for the toy VLM trained on text only against text + image prompts, on image prompts.

Usage::

    .venv/bin/python bench/toy_vision_report.py [--dir DIR] [--out OUT] [--rebuild-check]

1. Trains a text-only transcoder set for the toy VLM (``atlas.toy.vision_build``, the same
   buffers, settings and seed as the shipped mixed set, each buffer's image prompts replaced by
   as many extra toy-corpus documents) into ``OUT/transcoders_text``.
2. Reports FVU, L0 and dead features per layer of both sets on held-out image prompts (every
   position but BOS, image tokens included), on their image positions only, and on held-out text.
3. With ``--rebuild-check``: rebuilds the whole toy vision world into ``OUT/rebuild`` and compares
   every file's sha256 with the shipped manifest (reproducibility; ~10-15 min on 2 cores).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any


def _table(name: str, rows: list[dict[str, Any]]) -> None:
    print(f"  {name}")
    for r in rows:
        print(
            f"    layer {r['layer']}: FVU {r['fvu']:.4f}  L0 {r['l0']:6.1f}  dead {r['dead']:4d}"
            f"  ({r['n_tokens']} tokens)"
        )


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from atlas.toy.build import ToyPaths, file_hashes
    from atlas.toy.corpus import ToyCorpus
    from atlas.toy.train_model import deterministic_torch
    from atlas.toy.vision_build import (
        VisionBuildConfig,
        build_toy_vision,
        collect_image_activations,
        heldout_image_prompts,
        load_vision,
        train_vision_transcoders,
        transcoder_figures,
        vision_paths,
    )
    from atlas.toy.vision_model import N_IMAGE_TOKENS
    from atlas.transcoders.training import collect_activations, evaluate_transcoders

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", type=Path, default=None, help="toy vision world (default: shipped)")
    ap.add_argument("--out", type=Path, default=None, help="work directory (default: a temp dir)")
    ap.add_argument("--rebuild-check", action="store_true")
    args = ap.parse_args()
    paths = ToyPaths.at(args.dir) if args.dir else vision_paths()
    out = args.out or Path(tempfile.mkdtemp(prefix="toy-vision-report-"))
    manifest = json.loads(paths.manifest.read_text())
    cfg = VisionBuildConfig(seed=int(manifest["seed"]))
    torch.set_num_threads(1)

    loaded = load_vision(paths)
    model, tok = loaded.hf, loaded.tokenizer
    text_dir = out / "transcoders_text"
    t0 = time.perf_counter()
    train_vision_transcoders(model, tok, cfg, text_dir, images=False, progress=False)
    print(f"text-only transcoders trained in {time.perf_counter() - t0:.0f} s -> {text_dir}")

    images = heldout_image_prompts(cfg.seed, cfg.tc_eval_images)
    same_q = [s for s in images if s.question == images[0].question]
    docs = list(ToyCorpus(cfg.seed).documents(seed=777, n=256, min_words=48, heldout=True))
    result: dict[str, Any] = {"n_image_prompts": len(images)}
    for name, tc_dir in (("mixed", paths.transcoder_dir), ("text_only", text_dir)):
        tensors = {
            int(f.stem.split("_")[1]): load_file(str(f))
            for f in sorted(tc_dir.glob("layer_*.safetensors"))
        }
        with deterministic_torch(cfg.seed, 1):
            on_images = transcoder_figures(model, tok, tc_dir, images)
            acts = collect_image_activations(model, tok, same_q, sorted(tensors))
            n = len(same_q)
            image_only = {}
            for layer, (x, y) in acts.items():
                per = x.shape[0] // n
                keep = torch.zeros(n, per, dtype=torch.bool)
                keep[:, :N_IMAGE_TOKENS] = True
                image_only[layer] = (x[keep.flatten()], y[keep.flatten()])
            at_image_pos = [asdict(r) for r in evaluate_transcoders(tensors, image_only)]
            text_acts = collect_activations(model, tok, docs, sorted(tensors))
            on_text = [asdict(r) for r in evaluate_transcoders(tensors, text_acts)]
        result[name] = {
            "image_prompts": on_images,
            "image_positions": at_image_pos,
            "heldout_text": on_text,
        }
        print(f"\n{name} transcoders")
        _table("held-out image prompts (all positions but BOS)", on_images)
        _table(f"image positions only ({images[0].question!r} prompts)", at_image_pos)
        _table("held-out toy-corpus text", on_text)
    (out / "report.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nreport: {out / 'report.json'}")

    if args.rebuild_check:
        t0 = time.perf_counter()
        rebuilt = build_toy_vision(out / "rebuild", seed=cfg.seed, progress=False)
        took = time.perf_counter() - t0
        got = file_hashes(rebuilt.root)
        want = manifest["files"]
        diff = sorted(k for k in set(got) | set(want) if got.get(k) != want.get(k))
        print(f"\nrebuild in {took:.0f} s: {len(got)} files, {len(diff)} differ {diff}")
        raise SystemExit(1 if diff else 0)


if __name__ == "__main__":
    main()
