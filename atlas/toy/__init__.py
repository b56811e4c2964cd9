"""The embedded default "toy world": a small Llama-style model and JumpReLU transcoders trained
locally on a synthetic fact corpus (hand -> 5 fingers, spider -> 8 legs, 2 plus 3 -> 5, ...).

Public API::

    toy_paths(home=None) -> ToyPaths        shipped assets (atlas/toy/assets), else {home}/toy
    build_toy(out_dir, seed=0, progress=True) -> ToyPaths
    load_toy(paths=None) -> (model, tokenizer)
    evaluate_toy(paths=None) -> dict        fact accuracy + transcoder FVU / L0 / dead
    ToyCorpus(seed)                         facts, splits, vocabulary, document sampler
    atlas.toy.demo.demo_prompts(n)          the demo's prompts (hand facts first)

The toy vision world (``atlas.toy.vision_*``, shipped under ``assets/vision``): a LLaVA-style
model started from the toy model, with a CLIP tower trained from scratch on drawn images
(hands, dots and stars, planets, shapes), and transcoders trained on text and image prompts::

    atlas.toy.vision_data.VisionWorld(seed)         the seeded image + question generator
    atlas.toy.vision_build.vision_paths() / build_toy_vision(out_dir, seed=0) / evaluate_vision()
    atlas.toy.vision_demo.demo_image_prompts(out_dir) / hand_features()

CLI: ``atlas toy build [--out DIR] [--seed N] [--force] [--vision]`` and
``atlas toy eval [--vision] [--format json]``.
"""

from atlas.toy.build import ToyBuildConfig, ToyPaths, build_toy, evaluate_toy, load_toy, toy_paths
from atlas.toy.corpus import Fact, ToyCorpus

__all__ = [
    "Fact",
    "ToyBuildConfig",
    "ToyCorpus",
    "ToyPaths",
    "build_toy",
    "evaluate_toy",
    "load_toy",
    "toy_paths",
]
