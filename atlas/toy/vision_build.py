"""Build and evaluate the toy vision world: the toy VLM and its transcoders, reproducibly.

Layout (as the text toy world's, :class:`atlas.toy.build.ToyPaths`)::

    model/           LLaVA model directory (config, safetensors, tokenizer, processor files)
    transcoders/     circuit-tracer layout, trained on a mix of text and image+text prompts
    manifest.json    seed, rebuild command, versions, sha256 of every file, eval figures

The package ships a build under ``atlas/toy/assets/vision/``; :func:`vision_paths` finds it (or
a build under ``~/.circuit-atlas/toy/vision``). The build starts from the text toy world's
model (its sha256 is recorded) and is a pure function of the seed on a given machine and
library versions, with a fixed thread count.

Transcoders (the VLM paper's recipe): each buffer holds the activations of text documents of
the toy corpus and of image prompts of the vision world, in a fixed ratio
(:attr:`VisionBuildConfig.tc_image_share`); image prompts contribute every position but BOS,
image tokens included. :func:`transcoder_figures` reports FVU, L0 and dead features per layer
on held-out image prompts (``bench/toy_vision_report.py`` compares with text-only
transcoders).
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atlas.errors import ConfigError
from atlas.toy.build import (
    ASSETS_DIR,
    ToyPaths,
    file_hashes,
    sha256_file,
    toy_paths,
    write_json,
)
from atlas.toy.vision_data import FINGER_COUNTS, VisionSample, VisionWorld

if TYPE_CHECKING:
    from atlas.toy.vision_model import VisionTrainConfig
    from atlas.transcoders.training import TranscoderTrainConfig

logger = logging.getLogger(__name__)

VISION_ASSETS_DIR = ASSETS_DIR / "vision"

#: Metrics of :func:`evaluate_vision` that the manifest records and a test reproduces.
HEADLINE_KEYS = (
    "dots_accuracy",
    "hands_accuracy",
    "hands_5_accuracy",
    "six_finger_answered_5",
    "six_finger_answered_6",
    "planets_accuracy",
    "colour_accuracy",
    "shape_accuracy",
    "heldout_combo_accuracy",
)


def _vision_model_config() -> VisionTrainConfig:
    from atlas.toy.vision_model import VisionTrainConfig

    return VisionTrainConfig()


def _vision_tc_config() -> TranscoderTrainConfig:
    from atlas.transcoders.training import TranscoderTrainConfig

    return TranscoderTrainConfig(d_transcoder=512, chunks=30, passes=2, resample_dead_until=0.8)


@dataclass
class VisionBuildConfig:
    """Everything that shapes a toy vision build (recorded in the manifest)."""

    seed: int = 0
    model: VisionTrainConfig = field(default_factory=_vision_model_config)
    transcoders: TranscoderTrainConfig = field(default_factory=_vision_tc_config)
    tc_docs_per_chunk: int = 48
    """Toy-corpus documents per transcoder buffer."""
    tc_images_per_chunk: int = 48
    """Image prompts per transcoder buffer (each ~40 positions, a document ~48)."""
    tc_eval_images: int = 240
    eval_per_count: int = 40
    """Held-out hands per finger count in the eval (half as many dots and stars per count)."""
    eval_per_class: int = 30
    """Held-out planets per kind (and shapes per shape and question: two thirds of it)."""
    threads: int = 1

    @property
    def tc_image_share(self) -> float:
        return self.tc_images_per_chunk / (self.tc_images_per_chunk + self.tc_docs_per_chunk)

    def model_config(self) -> VisionTrainConfig:
        return replace(self.model, seed=self.seed, threads=self.threads)

    def transcoder_config(self) -> TranscoderTrainConfig:
        return replace(self.transcoders, seed=self.seed, threads=self.threads)

    def record(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "threads": self.threads,
            "model": asdict(self.model_config()),
            "transcoders": asdict(self.transcoder_config()),
            "tc_docs_per_chunk": self.tc_docs_per_chunk,
            "tc_images_per_chunk": self.tc_images_per_chunk,
            "tc_eval_images": self.tc_eval_images,
            "eval_per_count": self.eval_per_count,
            "eval_per_class": self.eval_per_class,
        }


def vision_paths(home: Path | None = None) -> ToyPaths:
    """The toy vision world: the shipped assets, else a build under ``{home}/toy/vision``.

    Raises:
        ConfigError: when neither exists (run ``atlas toy build --vision``).
    """
    shipped = ToyPaths.at(VISION_ASSETS_DIR)
    if shipped.exists():
        return shipped
    built = ToyPaths.at((home or Path.home() / ".circuit-atlas") / "toy" / "vision")
    if built.exists():
        return built
    raise ConfigError(
        f"no toy vision world found (looked in {VISION_ASSETS_DIR} and {built.root}); "
        "run `atlas toy build --vision`"
    )


# ---------------------------------------------------------------------- image activations
ImageItem = tuple[str, VisionSample]
"""A transcoder-training item: plain text ``("text", doc)`` is a str; an image prompt is a
:class:`VisionSample`."""


@torch.no_grad()
def collect_image_activations(
    model: Any,
    tokenizer: Any,
    samples: Sequence[VisionSample],
    layers: Sequence[int],
    *,
    input_hook: str | None = None,
    output_hook: str | None = None,
    batch: int = 48,
) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
    """``{layer: (x, y)}`` transcoder inputs/outputs at every position but BOS of image
    prompts (question without answer), like
    :func:`atlas.transcoders.training.collect_activations` for text."""
    from atlas.toy.vision_model import batch_tensors, normalise, pixels_u8
    from atlas.transcoders.training import capture_mlp_io

    xs: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    ys: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    image_id = int(model.config.image_token_id)
    with capture_mlp_io(model, layers, input_hook, output_hook) as captured:
        for start in range(0, len(samples), batch):
            chunk = samples[start : start + batch]
            ids, mask, _, _ = batch_tensors(tokenizer, chunk, image_id)
            keep = mask.bool().clone()
            keep[:, 0] = False
            captured.clear()
            model(input_ids=ids, attention_mask=mask, pixel_values=normalise(pixels_u8(chunk)))
            for layer in layers:
                xs[layer].append(captured[(layer, "x")][keep].float())
                ys[layer].append(captured[(layer, "y")][keep].float())
    return {layer: (torch.cat(xs[layer]), torch.cat(ys[layer])) for layer in layers}


def _mixed_trainer(model: Any, tokenizer: Any, cfg: TranscoderTrainConfig) -> Any:
    """A :class:`~atlas.transcoders.training.TranscoderTrainer` whose buffers may mix text
    documents and image prompts (``(docs, samples)`` per chunk)."""
    from atlas.transcoders.training import TranscoderTrainer, collect_activations

    class MixedTrainer(TranscoderTrainer):
        def _collect(self, texts: Any) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
            docs, samples = texts if isinstance(texts, tuple) else (texts, [])
            parts = []
            if docs:
                parts.append(
                    collect_activations(
                        self.model,
                        self.tokenizer,
                        docs,
                        self.layers,
                        input_hook=self.input_hook,
                        output_hook=self.output_hook,
                        max_length=self.cfg.max_length,
                        docs_per_forward=self.cfg.docs_per_forward,
                    )
                )
            if samples:
                parts.append(
                    collect_image_activations(
                        self.model,
                        self.tokenizer,
                        samples,
                        self.layers,
                        input_hook=self.input_hook,
                        output_hook=self.output_hook,
                    )
                )
            return {
                layer: (
                    torch.cat([p[layer][0] for p in parts]),
                    torch.cat([p[layer][1] for p in parts]),
                )
                for layer in self.layers
            }

    return MixedTrainer(model, tokenizer, cfg)


def transcoder_source(
    cfg: VisionBuildConfig, images: bool
) -> Callable[[int], tuple[list[str], list[VisionSample]]]:
    """``chunk -> (documents, image prompts)`` for transcoder training (deterministic); with
    ``images=False`` text only (twice the documents, the same number of buffers)."""
    from atlas.toy.corpus import ToyCorpus

    corpus = ToyCorpus(cfg.seed)
    world = VisionWorld(cfg.seed)
    n_docs = cfg.tc_docs_per_chunk if images else cfg.tc_docs_per_chunk * 2
    n_img = cfg.tc_images_per_chunk

    def source(chunk: int) -> tuple[list[str], list[VisionSample]]:
        docs = list(corpus.documents(seed=20_000 + chunk, n=n_docs, min_words=48))
        samples = (
            list(world.train_samples(n_img, start=1_000_000 + chunk * n_img)) if images else []
        )
        return docs, samples

    return source


def train_vision_transcoders(
    model: Any,
    tokenizer: Any,
    cfg: VisionBuildConfig,
    out_dir: Path,
    images: bool = True,
    progress: bool = True,
) -> Path:
    """Train a transcoder set for the toy VLM (mixed text + image prompts, or text only) into
    ``out_dir``."""
    from atlas.toy.train_model import deterministic_torch

    tcfg = cfg.transcoder_config()
    with deterministic_torch(cfg.seed, cfg.threads):
        trainer = _mixed_trainer(model, tokenizer, tcfg)
        trainer.train(transcoder_source(cfg, images), progress=progress)
        trainer.save(out_dir, model_name="circuit-atlas-toy-vision")
    return out_dir


def heldout_image_prompts(seed: int, n: int) -> list[VisionSample]:
    """``n`` held-out image prompts (from the eval stream), tasks interleaved."""
    samples = VisionWorld(seed).eval_samples(per_count=12, per_class=12, seed_offset=1)
    step = max(1, len(samples) // n)
    return samples[::step][:n]


def transcoder_figures(
    model: Any, tokenizer: Any, tc_dir: Path, samples: Sequence[VisionSample]
) -> list[dict[str, Any]]:
    """FVU, L0 and dead features per layer of the transcoders in ``tc_dir`` on image prompts."""
    import yaml
    from safetensors.torch import load_file

    from atlas.transcoders.training import evaluate_transcoders

    tc_cfg = yaml.safe_load((tc_dir / "config.yaml").read_text())
    files = sorted(tc_dir.glob("layer_*.safetensors"))
    tensors = {int(f.stem.split("_")[1]): load_file(str(f)) for f in files}
    acts = collect_image_activations(
        model,
        tokenizer,
        samples,
        sorted(tensors),
        input_hook=tc_cfg["feature_input_hook"],
        output_hook=tc_cfg["feature_output_hook"],
    )
    return [asdict(r) for r in evaluate_transcoders(tensors, acts)]


# ---------------------------------------------------------------------- eval
def predict(loaded: Any, samples: Sequence[VisionSample]) -> list[str]:
    """The top-1 next word of each sample's prompt, computed as attribution computes inputs:
    :meth:`atlas.models.LoadedModel.inputs` with the image (the processor's path), one prompt
    per forward pass."""
    from atlas.models.vision import image_from_pil

    out = []
    with torch.no_grad():
        for s in samples:
            inputs = loaded.inputs(s.question, image=image_from_pil(s.image))
            logits = loaded.hf(**inputs.forward_kwargs(loaded.device)).logits[0, -1]
            out.append(loaded.tokenizer.convert_ids_to_tokens(int(logits.argmax())))
    return out


def score(samples: Sequence[VisionSample], preds: Sequence[str]) -> dict[str, Any]:
    """Accuracy per task, per count and the six-finger shares (fractions; see
    :data:`HEADLINE_KEYS`)."""
    hits: dict[str, list[int]] = defaultdict(list)
    answers: dict[int, Counter[str]] = {n: Counter() for n in FINGER_COUNTS}
    dots_by_count: dict[str, list[int]] = defaultdict(list)
    for s, p in zip(samples, preds, strict=True):
        ok = int(p == s.answer)
        if "heldout" in s.attr:
            hits["heldout_combo"].append(ok)
            continue
        hits[s.task].append(ok)
        if s.task == "hand":
            answers[int(s.answer)][p] += 1
            hits[f"hand_{s.answer}"].append(ok)
        elif s.task == "dots":
            dots_by_count[s.answer].append(ok)
            hits[f"kind_{s.attr['kind']}"].append(ok)

    def frac(v: list[int]) -> float:
        return sum(v) / len(v) if v else 0.0

    six = answers[6]
    n_six = max(1, sum(six.values()))
    return {
        "dots_accuracy": frac(hits["dots"]),
        "dots_kind_accuracy": {k: frac(hits[f"kind_{k}"]) for k in ("dots", "stars")},
        "hands_accuracy": frac(hits["hand"]),
        "hands_5_accuracy": frac(hits["hand_5"]),
        "six_finger_answered_5": six["5"] / n_six,
        "six_finger_answered_6": six["6"] / n_six,
        "planets_accuracy": frac(hits["planet"]),
        "colour_accuracy": frac(hits["colour"]),
        "shape_accuracy": frac(hits["shape"]),
        "heldout_combo_accuracy": frac(hits["heldout_combo"]),
        "dots_accuracy_by_count": {k: frac(v) for k, v in sorted(dots_by_count.items())},
        "hands_accuracy_by_fingers": {str(n): frac(hits[f"hand_{n}"]) for n in FINGER_COUNTS},
        "hand_answers_by_fingers": {str(n): dict(sorted(c.items())) for n, c in answers.items()},
        "n": {k: len(v) for k, v in sorted(hits.items()) if not k.startswith(("hand_", "kind_"))},
    }


def load_vision(paths: ToyPaths | None = None) -> Any:
    """The toy VLM through the hub code path (:func:`atlas.models.load_model`), on CPU."""
    from atlas.models import load_model

    paths = paths or vision_paths()
    return load_model(paths.model_dir)


def evaluate_vision(
    paths: ToyPaths | None = None, per_count: int | None = None, per_class: int | None = None
) -> dict[str, Any]:
    """Accuracy per task and per count on the held-out images (:meth:`VisionWorld.eval_samples`
    of the build's seed and eval sizes), through the hub code path (:func:`predict`)."""
    paths = paths or vision_paths()
    manifest = json.loads(paths.manifest.read_text())
    seed = int(manifest.get("seed", 0))
    recorded = manifest.get("build_config", {})
    per_count = per_count or int(recorded.get("eval_per_count", 40))
    per_class = per_class or int(recorded.get("eval_per_class", 30))
    loaded = load_vision(paths)
    samples = VisionWorld(seed).eval_samples(per_count=per_count, per_class=per_class)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        preds = predict(loaded, samples)
        text = _text_accuracy(loaded, seed)
    finally:
        torch.set_num_threads(old)
    return {"root": str(paths.root), "seed": seed, **score(samples, preds), "text_facts": text}


def _text_accuracy(loaded: Any, seed: int) -> dict[str, float]:
    """The language model's toy-corpus fact accuracy (train split; text prompts, no image)."""
    from atlas.toy.corpus import ToyCorpus
    from atlas.toy.train_model import fact_accuracy

    with torch.no_grad():
        return fact_accuracy(loaded.hf, loaded.tokenizer, ToyCorpus(seed).split("train"))


def build_toy_vision(
    out_dir: Path,
    seed: int = 0,
    progress: bool = True,
    config: VisionBuildConfig | None = None,
    text_paths: ToyPaths | None = None,
) -> ToyPaths:
    """Train the toy VLM (from the text toy world's model) and its mixed transcoders into
    ``out_dir``, evaluate both and write the manifest; returns the paths.

    Overwrites ``model/``, ``transcoders/`` and ``manifest.json`` under ``out_dir``.
    """
    from atlas.toy.build import _versions
    from atlas.toy.train_model import deterministic_torch
    from atlas.toy.vision_model import init_vlm, save_vlm, train_vlm

    cfg = replace(config or VisionBuildConfig(), seed=seed)
    text = text_paths or toy_paths()
    paths = ToyPaths.at(Path(out_dir)).emptied()

    t0 = time.perf_counter()
    mcfg = cfg.model_config()
    with deterministic_torch(cfg.seed, cfg.threads):
        model, processor = init_vlm(mcfg, text.model_dir)
    losses = train_vlm(model, processor, mcfg, progress=progress)
    save_vlm(model, processor, paths.model_dir)
    t_model = time.perf_counter() - t0
    train_vision_transcoders(model, processor.tokenizer, cfg, paths.transcoder_dir, True, progress)
    t_tc = time.perf_counter() - t0 - t_model
    with deterministic_torch(cfg.seed, cfg.threads):
        figures = transcoder_figures(
            model,
            processor.tokenizer,
            paths.transcoder_dir,
            heldout_image_prompts(cfg.seed, cfg.tc_eval_images),
        )
    write_json(paths.manifest, {"seed": cfg.seed})  # evaluate_vision reads the seed
    metrics = evaluate_vision(paths, cfg.eval_per_count, cfg.eval_per_class)
    metrics.pop("root")
    t_total = time.perf_counter() - t0
    manifest = {
        "name": "circuit-atlas toy vision world",
        "seed": cfg.seed,
        "command": f"atlas toy build --vision --seed {cfg.seed} --out <DIR>",
        "python_api": f"atlas.toy.vision_build.build_toy_vision(out_dir, seed={cfg.seed})",
        "build_config": cfg.record(),
        "text_model_sha256": sha256_file(text.model_dir / "model.safetensors"),
        "versions": _versions(),
        "files": file_hashes(paths.root),
        "metrics": {
            "eval": metrics,
            "train_losses": {k: round(v, 4) for k, v in losses.items()},
            "transcoders_on_image_prompts": figures,
        },
        "elapsed_s": {
            "model": round(t_model, 1),
            "transcoders": round(t_tc, 1),
            "total": round(t_total, 1),
        },
    }
    write_json(paths.manifest, manifest)
    logger.info("toy vision world built in %.0f s at %s", t_total, paths.root)
    return paths
