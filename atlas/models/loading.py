"""Loading a model (local Hugging Face directory or hub id) together with its family adapter.

Text models load through ``AutoModelForCausalLM`` + ``AutoTokenizer``; vision-language models
(Gemma-3, LLaVA: see :func:`atlas.models.adapters.vision_adapter`) through
``AutoModelForImageTextToText`` + ``AutoProcessor``, with the processor kept on the
:class:`LoadedModel` (its tokenizer is the model's tokenizer). Every module runs eager attention:
the engine swaps the language model's attention for its frozen variant, and the rollout needs the
vision tower's attention weights.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from atlas.errors import AtlasError, ConfigError, InputError, ModelLoadError
from atlas.graph import ModelInfo
from atlas.models.adapters import FamilyAdapter, VisionLanguageAdapter, adapter_for_config
from atlas.models.inputs import ModelInputs

if TYPE_CHECKING:
    from atlas.models.vision import ImageSource

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass
class LoadedModel:
    """A model ready for attribution.

    Attributes:
        hf: the transformers causal LM, or the image-text-to-text model (eval mode).
        tokenizer: its tokenizer.
        adapter: where things are in this family.
        info: provenance (name, family, revision, sizes of the language model) recorded on
            every graph.
        device, dtype: where and how the weights live.
        processor: the vision-language model's processor (``None`` for a text model).
    """

    hf: Any
    tokenizer: Any
    adapter: FamilyAdapter
    info: ModelInfo
    device: torch.device
    dtype: torch.dtype
    processor: Any = None

    @property
    def is_vision(self) -> bool:
        """Whether the model takes images (a vision-language adapter and its processor)."""
        return isinstance(self.adapter, VisionLanguageAdapter) and self.processor is not None

    @property
    def text_config(self) -> Any:
        """The language model's config (the model's own config for a text model)."""
        return self.hf.config.get_text_config()

    @property
    def n_layers(self) -> int:
        return self.info.n_layers

    @property
    def d_model(self) -> int:
        return self.info.d_model

    @property
    def max_positions(self) -> int | None:
        cfg = self.text_config
        for key in ("max_position_embeddings", "n_positions"):
            val = getattr(cfg, key, None)
            if val:
                return int(val)
        return None

    def bos_candidates(self) -> list[int]:
        """Token ids accepted as a leading special token (BOS first)."""
        tok = self.tokenizer
        ids = [tok.bos_token_id, tok.pad_token_id, tok.eos_token_id, *tok.all_special_ids]
        return [int(i) for i in ids if i is not None]

    def inputs(
        self,
        prompt: str | torch.Tensor | list[int] | ModelInputs,
        image: ImageSource | None = None,
    ) -> ModelInputs:
        """The model's inputs for ``prompt`` and optionally ``image`` (a path, bytes or a
        :class:`~atlas.images.LoadedImage`).

        Text: token ids, causal attention. With an image (vision-language models only): the
        processor's ids, pixels and image positions (:func:`atlas.models.vision.image_inputs`).
        A vision-language model without an image gets exactly the text inputs.
        """
        from atlas.models import vision

        if image is not None:
            if not isinstance(prompt, str):
                raise InputError(
                    f"{vision.image_label(image)}: an image needs a text prompt, "
                    f"not {type(prompt).__name__}"
                )
            return vision.image_inputs(self, prompt, image)
        if isinstance(prompt, ModelInputs):
            return prompt
        if self.is_vision and isinstance(prompt, str):
            return vision.text_inputs(self, prompt)
        return ModelInputs(input_ids=self.to_input_ids(prompt))

    def to_input_ids(self, prompt: str | torch.Tensor | list[int]) -> torch.Tensor:
        """1-D token ids with a special token first (prepended unless already present)."""
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("empty prompt")
            ids = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
            tokens = ids["input_ids"].reshape(-1)
        elif isinstance(prompt, torch.Tensor):
            tokens = prompt.detach().to("cpu", torch.long).squeeze()
            if tokens.ndim == 0:
                tokens = tokens.reshape(1)
        elif isinstance(prompt, list):
            tokens = torch.tensor(prompt, dtype=torch.long)
        else:
            raise InputError(f"prompt must be a string or token ids, not {type(prompt).__name__}")
        if tokens.ndim != 1 or tokens.numel() == 0:
            raise InputError(
                f"token ids must be a non-empty 1-D sequence, got {tuple(tokens.shape)}"
            )
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.info.vocab_size:
            raise InputError("token id out of the model's vocabulary")
        special = set(int(i) for i in self.tokenizer.all_special_ids)
        if int(tokens[0]) not in special:
            candidates = self.bos_candidates()
            if candidates:
                tokens = torch.cat([torch.tensor([candidates[0]]), tokens])
            else:
                log.warning("no special token to prepend; position 0 is ignored as is")
        return tokens


def _content_hash(model_dir: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    files += [model_dir / "config.json"] if (model_dir / "config.json").is_file() else []
    for path in files:
        h.update(path.name.encode())
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()[:32]


def _names_a_path(name: str) -> bool:
    """Whether ``name`` can only be a directory, not a hub id (``org/name``): absolute, relative
    to ``.`` or ``~``, or with more than one ``/``."""
    return name.startswith(("/", "./", "../", "~", ".")) or name.count("/") > 1


def load_model(
    name_or_path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    revision: str | None = None,
) -> LoadedModel:
    """Load a causal LM and its tokenizer, or a vision-language model and its processor, from a
    local directory or a hub id.

    Raises :class:`ModelLoadError` when the model cannot be read and :class:`ConfigError` for an
    architecture outside the supported families.
    """
    from transformers import AutoConfig

    name = str(name_or_path)
    local = Path(name).expanduser()
    is_local = local.exists()
    if not is_local and _names_a_path(name):
        raise ModelLoadError(f"model directory {local} does not exist")
    if is_local and not (local / "config.json").is_file():
        raise ModelLoadError(f"{local} has no config.json: not a Hugging Face model directory")
    source = str(local) if is_local else name
    try:
        config = AutoConfig.from_pretrained(source, revision=revision)
    except Exception as exc:
        raise ModelLoadError(f"cannot read model config for {name!r}: {exc}") from exc
    adapter = adapter_for_config(config)
    try:
        hf, tokenizer, processor = _load_hf(source, revision, dtype, adapter)
    except AtlasError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {exc}") from exc
    try:
        dev = torch.device(device)
        hf = hf.to(dev).eval()
    except (RuntimeError, AssertionError) as exc:
        raise ConfigError(f"cannot move model to device {device!r}: {exc}") from exc
    rev = _content_hash(local) if is_local else (revision or getattr(config, "_commit_hash", None))
    cfg = hf.config.get_text_config()
    n_layers = int(getattr(cfg, "num_hidden_layers", None) or cfg.n_layer)
    d_model = int(getattr(cfg, "hidden_size", None) or cfg.n_embd)
    info = ModelInfo(
        name=name,
        family=adapter.family,
        revision=rev,
        n_layers=n_layers,
        d_model=d_model,
        vocab_size=int(cfg.vocab_size),
    )
    log.info("loaded %s (%s, %d layers, d_model %d)", name, adapter.family, n_layers, d_model)
    return LoadedModel(
        hf=hf,
        tokenizer=tokenizer,
        adapter=adapter,
        info=info,
        device=dev,
        dtype=dtype,
        processor=processor,
    )


def _load_hf(
    source: str, revision: str | None, dtype: torch.dtype, adapter: FamilyAdapter
) -> tuple[Any, Any, Any]:
    """``(model, tokenizer, processor or None)`` through the Auto classes of the model's kind."""
    # AutoProcessor pulls in transformers' image and video processing (seconds of imports):
    # only a vision-language model needs it
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(adapter, VisionLanguageAdapter):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        hf = AutoModelForImageTextToText.from_pretrained(
            source, revision=revision, dtype=dtype, attn_implementation="eager"
        )
        processor = AutoProcessor.from_pretrained(source, revision=revision)
        return hf, processor.tokenizer, processor
    hf = AutoModelForCausalLM.from_pretrained(
        source, revision=revision, dtype=dtype, attn_implementation="eager"
    )
    return hf, AutoTokenizer.from_pretrained(source, revision=revision), None
