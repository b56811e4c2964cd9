"""Build the toy world: tokenizer + model + transcoders in one directory, reproducibly.

Layout of a toy directory::

    model/           Hugging Face model dir (config.json, model.safetensors, tokenizer files)
    transcoders/     circuit-tracer layout (config.yaml, layer_{i}.safetensors)
    manifest.json    seed, rebuild command, library versions, sha256 of every file, metrics

``build_toy(out_dir, seed)`` is a pure function of the seed on a given machine and library
versions (fixed thread count, seeded samplers, deterministic kernels): two builds give identical
files. The package ships a prebuilt toy under ``atlas/toy/assets/``; :func:`toy_paths` finds it
(or a build under ``~/.circuit-atlas/toy``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.errors import ConfigError, ModelLoadError

if TYPE_CHECKING:
    from atlas.toy.train_model import ModelTrainConfig
    from atlas.transcoders.training import TranscoderTrainConfig

logger = logging.getLogger(__name__)

ASSETS_DIR = Path(__file__).resolve().parent / "assets"
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class ToyPaths:
    """Where a toy world lives."""

    root: Path
    model_dir: Path
    """Hugging Face model directory (tokenizer included)."""
    transcoder_dir: Path
    """Transcoder set in circuit-tracer's layout."""

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @classmethod
    def at(cls, root: Path) -> ToyPaths:
        root = Path(root)
        return cls(root=root, model_dir=root / "model", transcoder_dir=root / "transcoders")

    def emptied(self) -> ToyPaths:
        """These paths with the root made and a previous build's model, transcoders and
        manifest removed (what a build writes anew)."""
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in (self.model_dir, self.transcoder_dir):
            if stale.exists():
                shutil.rmtree(stale)
        self.manifest.unlink(missing_ok=True)
        return self

    def exists(self) -> bool:
        return (
            self.manifest.is_file()
            and (self.model_dir / "config.json").is_file()
            and (self.transcoder_dir / "config.yaml").is_file()
        )


def _toy_model_config() -> ModelTrainConfig:
    from atlas.toy.train_model import ModelTrainConfig

    return ModelTrainConfig(steps=1000, seq_len=40, batch_size=24, lr=4e-3)


def _toy_transcoder_config() -> TranscoderTrainConfig:
    from atlas.transcoders.training import TranscoderTrainConfig

    return TranscoderTrainConfig(d_transcoder=512, chunks=40, passes=2, resample_dead_until=0.8)


#: manifest ``build_config`` key -> (sub-config, field) of the settings a toy build records
RECORDED: dict[str, tuple[str, str]] = {
    "model_steps": ("model", "steps"),
    "model_seq_len": ("model", "seq_len"),
    "model_batch": ("model", "batch_size"),
    "model_lr": ("model", "lr"),
    "d_transcoder": ("transcoders", "d_transcoder"),
    "target_l0": ("transcoders", "target_l0"),
    "tc_chunks": ("transcoders", "chunks"),
    "tc_batch_tokens": ("transcoders", "batch_tokens"),
    "tc_passes": ("transcoders", "passes"),
    "tc_resample_dead_until": ("transcoders", "resample_dead_until"),
    "tc_skip": ("transcoders", "skip"),
}


@dataclass
class ToyBuildConfig:
    """Everything that shapes a toy build (recorded in the manifest, see :meth:`record`).

    ``seed`` and ``threads`` are the whole build's: they replace the sub-configs' own.
    """

    seed: int = 0
    model: ModelTrainConfig = field(default_factory=_toy_model_config)
    transcoders: TranscoderTrainConfig = field(default_factory=_toy_transcoder_config)
    tc_docs_per_chunk: int = 96
    eval_docs: int = 256
    threads: int = 1
    """torch threads for the whole build (1: fastest on a shared 2-core machine, deterministic)."""

    def model_config(self) -> ModelTrainConfig:
        """The toy model's training settings, with the build's seed and threads."""
        return replace(self.model, seed=self.seed, threads=self.threads)

    def transcoder_config(self) -> TranscoderTrainConfig:
        """The transcoders' training settings, with the build's seed and threads."""
        return replace(self.transcoders, seed=self.seed, threads=self.threads)

    def record(self) -> dict[str, Any]:
        """The manifest's ``build_config``: the build's own settings and the sub-configs' ones
        named in :data:`RECORDED`, under flat keys; any other sub-config setting that differs
        from the toy default is added as ``"<sub-config>.<field>"``."""
        out: dict[str, Any] = {
            "seed": self.seed,
            "tc_docs_per_chunk": self.tc_docs_per_chunk,
            "eval_docs": self.eval_docs,
            "threads": self.threads,
        }
        for key, (sub, name) in RECORDED.items():
            out[key] = getattr(getattr(self, sub), name)
        default = replace(ToyBuildConfig(), seed=self.seed, threads=self.threads)
        subs: list[tuple[str, Any, Any]] = [
            ("model", self.model_config(), default.model_config()),
            ("transcoders", self.transcoder_config(), default.transcoder_config()),
        ]
        for sub, mine, base in subs:
            for name, value in asdict(mine).items():
                if (sub, name) not in RECORDED.values() and value != getattr(base, name):
                    out[f"{sub}.{name}"] = value
        return out


def write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as the toy world's JSON files are written: indent 2, sorted keys, final
    newline (the bytes are part of the reproducible build)."""
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root/model`` and ``root/transcoders``, by relative path."""
    out: dict[str, str] = {}
    for sub in ("model", "transcoders"):
        for path in sorted((root / sub).rglob("*")):
            if path.is_file():
                out[path.relative_to(root).as_posix()] = sha256_file(path)
    return out


def _versions() -> dict[str, str]:
    import tokenizers
    import torch
    import transformers

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def transcoder_text_source(corpus: Any, cfg: ToyBuildConfig) -> Any:
    """``chunk -> documents`` for transcoder training (train-split text, deterministic)."""

    def source(chunk: int) -> list[str]:
        return list(corpus.documents(seed=10_000 + chunk, n=cfg.tc_docs_per_chunk, min_words=48))

    return source


def heldout_texts(corpus: Any, n: int) -> list[str]:
    """Held-out documents (held-out facts + filler) for evaluating transcoders."""
    return list(corpus.documents(seed=777, n=n, min_words=48, heldout=True))


def build_toy(
    out_dir: Path,
    seed: int = 0,
    progress: bool = True,
    config: ToyBuildConfig | None = None,
) -> ToyPaths:
    """Train the toy model and its transcoders into ``out_dir``; returns their paths.

    ``seed`` overrides ``config.seed``. Overwrites ``model/``, ``transcoders/`` and ``manifest.json`` under ``out_dir``.
    """
    from atlas.toy.train_model import deterministic_torch, train_and_save
    from atlas.transcoders.training import train_transcoders

    cfg = replace(config or ToyBuildConfig(), seed=seed)
    paths = ToyPaths.at(Path(out_dir)).emptied()

    t0 = time.perf_counter()
    mcfg = cfg.model_config()
    logger.info("training the toy model (%d steps)", mcfg.steps)
    model, tokenizer, corpus, metrics = train_and_save(paths.model_dir, mcfg, progress=progress)
    t_model = time.perf_counter() - t0

    tcfg = cfg.transcoder_config()
    logger.info("training transcoders (%d chunks)", tcfg.chunks)
    with deterministic_torch(cfg.seed, cfg.threads):
        reports = train_transcoders(
            model,
            tokenizer,
            transcoder_text_source(corpus, cfg),
            heldout_texts(corpus, cfg.eval_docs),
            paths.transcoder_dir,
            tcfg,
            model_name="circuit-atlas-toy",
            progress=progress,
        )
    t_total = time.perf_counter() - t0

    manifest = {
        "name": "circuit-atlas toy world",
        "seed": cfg.seed,
        "command": f"atlas toy build --seed {cfg.seed} --out <DIR>",
        "python_api": f"atlas.toy.build.build_toy(out_dir, seed={cfg.seed})",
        "build_config": cfg.record(),
        "versions": _versions(),
        "files": file_hashes(paths.root),
        "metrics": {
            **{k: v for k, v in metrics.items() if k.startswith("accuracy")},
            "transcoders": [asdict(r) for r in reports],
        },
        "elapsed_s": {"model": round(t_model, 1), "total": round(t_total, 1)},
    }
    write_json(paths.manifest, manifest)
    logger.info("toy world built in %.0f s at %s", t_total, paths.root)
    return paths


def toy_paths(home: Path | None = None) -> ToyPaths:
    """The toy world to use: the assets shipped with the package, else a build under
    ``{home}/toy`` (``home`` defaults to ``~/.circuit-atlas``).

    Raises:
        ConfigError: when neither exists (run ``atlas toy build``).
    """
    shipped = ToyPaths.at(ASSETS_DIR)
    if shipped.exists():
        return shipped
    built = ToyPaths.at((home or Path.home() / ".circuit-atlas") / "toy")
    if built.exists():
        return built
    raise ConfigError(
        f"no toy world found (looked in {ASSETS_DIR} and {built.root}); run `atlas toy build`"
    )


def load_toy(paths: ToyPaths | None = None) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of a toy world with transformers, in eval mode, on CPU."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    paths = paths or toy_paths()
    try:
        model = AutoModelForCausalLM.from_pretrained(str(paths.model_dir)).eval()
        tokenizer = AutoTokenizer.from_pretrained(str(paths.model_dir))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the toy model from {paths.model_dir}: {exc}") from exc
    return model, tokenizer


def evaluate_toy(paths: ToyPaths | None = None, eval_docs: int = 256) -> dict[str, Any]:
    """Fact accuracy per split and transcoder FVU / L0 / dead features on held-out text."""
    import torch
    import yaml
    from safetensors.torch import load_file

    from atlas.toy.corpus import SPLITS, ToyCorpus
    from atlas.toy.train_model import fact_accuracy
    from atlas.transcoders.training import collect_activations, evaluate_transcoders

    paths = paths or toy_paths()
    manifest = json.loads(paths.manifest.read_text())
    seed = int(manifest.get("seed", 0))
    model, tokenizer = load_toy(paths)
    corpus = ToyCorpus(seed)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    out: dict[str, Any] = {"root": str(paths.root), "seed": seed}
    with torch.no_grad():
        for split in SPLITS:
            out[f"accuracy_{split}"] = fact_accuracy(model, tokenizer, corpus.split(split))
        tc_cfg = yaml.safe_load((paths.transcoder_dir / "config.yaml").read_text())
        files = sorted(paths.transcoder_dir.glob("layer_*.safetensors"))
        tensors = {int(f.stem.split("_")[1]): load_file(str(f)) for f in files}
        acts = collect_activations(
            model,
            tokenizer,
            heldout_texts(corpus, eval_docs),
            sorted(tensors),
            input_hook=tc_cfg["feature_input_hook"],
            output_hook=tc_cfg["feature_output_hook"],
        )
        out["transcoders"] = [asdict(r) for r in evaluate_transcoders(tensors, acts)]
    return out
