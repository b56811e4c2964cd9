"""Image + text prompts on vision-language models: the processor's inputs and the tower's rollout.

:func:`image_inputs` turns ``(text, image)`` into :class:`ModelInputs` the way the model's own
processor does (Gemma-3: ``<start_of_image>`` expanded to ``"\\n\\n<start_of_image>" +
"<image_soft_token>" * n + "<end_of_image>\\n\\n"``, ``<bos>`` first, ``token_type_ids`` 1 at the
soft tokens; LLaVA: ``<image>`` repeated once per patch token). A prompt without a placeholder gets
one before its text, where the chat template puts the image; the processors themselves refuse such
a prompt. One image per prompt.

:func:`image_rollout` runs the vision tower with eager attention and returns the attention-rollout
map of every image soft token (:func:`atlas.attribution.rollout.attention_rollout`), rolling out
only the tower layers the language model's image rows come from.
"""

from __future__ import annotations

import dataclasses
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from atlas.errors import ConfigError, InputError
from atlas.images import DEFAULT_MAX_PIXELS, ImageInfo, LoadedImage, load_image
from atlas.models.adapters import VisionLanguageAdapter
from atlas.models.inputs import ModelInputs

if TYPE_CHECKING:
    from atlas.attribution.rollout import Rollout, RolloutParams
    from atlas.models.loading import LoadedModel

ImageSource = str | Path | bytes | LoadedImage
"""An image as callers give it: a file path, the file's bytes, or an already loaded image."""

#: Image-processor settings recorded with a graph (those that change the pixels).
_PROCESSING_KEYS = (
    "size",
    "crop_size",
    "do_resize",
    "do_center_crop",
    "resample",
    "do_rescale",
    "rescale_factor",
    "do_normalize",
    "image_mean",
    "image_std",
    "do_convert_rgb",
    "do_pan_and_scan",
)


def vision_adapter_of(model: LoadedModel) -> VisionLanguageAdapter:
    """The model's vision-language adapter; :class:`InputError` for a text-only model."""
    if not isinstance(model.adapter, VisionLanguageAdapter) or model.processor is None:
        raise InputError(
            f"{model.info.name} is a text-only model ({model.info.family}): it takes no image"
        )
    return model.adapter


def as_loaded_image(image: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS) -> LoadedImage:
    """Decode ``image`` safely (:func:`atlas.images.load_image`) unless already decoded."""
    if isinstance(image, LoadedImage):
        return image
    return load_image(image, max_pixels=max_pixels)


def image_label(image: ImageSource) -> str:
    """How an error message names the image (its path when it has one)."""
    if isinstance(image, str | Path):
        return str(image)
    if isinstance(image, LoadedImage):
        if image.name and image.name != "<bytes>":
            return image.name
        return f"image sha256:{image.info.sha256[:12]}"
    return "<bytes>"


def image_inputs(model: LoadedModel, text: str, image: ImageSource) -> ModelInputs:
    """The model inputs of ``text`` with ``image`` (see the module docstring).

    Raises :class:`InputError` (one line naming the image) for a text-only model, an empty
    prompt, more than one placeholder, or a processor that refuses the pair.
    """
    label = image_label(image)
    try:
        adapter = vision_adapter_of(model)
    except InputError as exc:
        raise InputError(f"{label}: {exc}") from None
    if not text:
        raise InputError(f"{label}: empty prompt")
    n_placeholders = text.count(adapter.image_placeholder)
    if n_placeholders > 1:
        raise InputError(
            f"{label}: the prompt has {n_placeholders} image placeholders "
            f"({adapter.image_placeholder}) for 1 image"
        )
    if n_placeholders == 0:
        text = adapter.image_prefix + text
    loaded = as_loaded_image(image)
    try:
        enc = model.processor(images=[loaded.image], text=text, return_tensors="pt")
    except (ValueError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"{label}: the processor refused the prompt: {first}") from exc
    return _from_encoding(model, adapter, enc, loaded.info, label)


def _from_encoding(
    model: LoadedModel,
    adapter: VisionLanguageAdapter,
    enc: Any,
    info: ImageInfo,
    label: str,
) -> ModelInputs:
    """:class:`ModelInputs` from the processor's output, with image positions and grid."""
    ids = enc["input_ids"][0].to(torch.long)
    special = {int(i) for i in model.tokenizer.all_special_ids}
    prepend = int(ids[0]) not in special and model.bos_candidates()
    if prepend:
        ids = torch.cat([torch.tensor([model.bos_candidates()[0]]), ids])
    config = model.hf.config
    n_tokens = adapter.tokens_per_image(config)
    positions = torch.nonzero(ids == int(config.image_token_id)).flatten()
    if positions.numel() != n_tokens:
        raise InputError(
            f"{label}: {positions.numel()} image tokens in the prompt, the model expects {n_tokens}"
        )
    if int(positions[-1] - positions[0]) + 1 != n_tokens:
        raise InputError(f"{label}: the image tokens are not one contiguous block")
    token_types = None
    if adapter.bidirectional_images:
        token_types = torch.zeros_like(ids)
        token_types[positions] = 1
    pixels = enc["pixel_values"].to(model.dtype)
    return ModelInputs(
        input_ids=ids,
        pixel_values=pixels,
        token_type_ids=token_types,
        bidirectional_prefix=int(positions[-1]) + 1,
        image_positions=positions,
        image_grid=pooled_grid_coordinates(n_tokens),
        image=info,
    )


def pooled_grid_coordinates(n_tokens: int) -> torch.Tensor:
    """``(n_tokens, 2)`` ``(row, col)`` of each soft token, row-major over the square pooled grid
    (Gemma-3's average pool and LLaVA's patch order both flatten rows first)."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise ConfigError(f"{n_tokens} image tokens per image do not form a square grid")
    k = torch.arange(n_tokens)
    return torch.stack([k // side, k % side], dim=1)


def text_inputs(model: LoadedModel, text: str) -> ModelInputs:
    """A prompt without an image on a vision-language model: the language model's text inputs
    (the same ids as the text model), refused if it holds an image placeholder."""
    adapter = vision_adapter_of(model)
    if adapter.image_placeholder in text:
        raise InputError(
            f"the prompt has an image placeholder ({adapter.image_placeholder}) but no image"
        )
    ids = model.to_input_ids(text)
    if bool((ids == int(model.hf.config.image_token_id)).any()):
        raise InputError("the prompt has image tokens but no image")
    return ModelInputs(input_ids=ids)


def image_settings(model: LoadedModel) -> dict[str, Any]:
    """JSON-ready processor settings that decide the pixels and the image tokens of a prompt."""
    processor = model.processor
    adapter = vision_adapter_of(model)
    image_processor = getattr(processor, "image_processor", None)
    raw = image_processor.to_dict() if image_processor is not None else {}
    out: dict[str, Any] = {k: raw[k] for k in _PROCESSING_KEYS if k in raw}
    out["image_processor"] = type(image_processor).__name__
    out["processor"] = type(processor).__name__
    out["tokens_per_image"] = adapter.tokens_per_image(model.hf.config)
    out["image_placeholder"] = adapter.image_placeholder
    return _json_ready(out)


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_ready(v) for v in value]
    if isinstance(value, bool | int | float | str) or value is None:
        return value
    return int(value) if hasattr(value, "__int__") else str(value)


# ---------------------------------------------------------------------- rollout
def rollout_layers(model: LoadedModel) -> tuple[int, int]:
    """``(tower layers the image rows come from, leading CLS tokens)``.

    Gemma-3 reads the tower's last hidden state (every layer, no CLS). LLaVA reads
    ``hidden_states[vision_feature_layer]`` (``-2``: all layers but the last; a list: the deepest
    of them) and CLIP's sequence starts with a CLS token.
    """
    adapter = vision_adapter_of(model)
    tower = adapter.vision_tower(model.hf)
    n_tower = len(list(tower.get_submodule("encoder.layers").children()))
    feature_layer = getattr(model.hf.config, "vision_feature_layer", None)
    if feature_layer is None:
        n_layers = n_tower
    else:
        chosen = feature_layer if isinstance(feature_layer, list) else [feature_layer]
        n_layers = max(n_tower + 1 + f if f < 0 else f for f in chosen)
    embeddings = tower.get_submodule("embeddings")
    cls = 1 if hasattr(embeddings, "class_embedding") else 0
    return n_layers, cls


def image_rollout(
    model: LoadedModel, inputs: ModelInputs, params: RolloutParams | None = None
) -> Rollout:
    """Attention-rollout maps of the image soft tokens of ``inputs`` (the paper's recipe).

    The tower runs once more, with eager attention (switched on for this call if the model was
    loaded otherwise), on the prompt's pixels. ``params.cls_tokens`` is set from the tower.
    Maps are ``[n_image_tokens, grid, grid]`` float32 in soft-token order (token ``k`` is the
    ``k``-th image position, ``inputs.image_positions[k]``).
    """
    from atlas.attribution.rollout import RolloutParams, attention_rollout, vision_attentions

    if inputs.pixel_values is None:
        raise InputError("no image in the prompt: nothing to roll out")
    adapter = vision_adapter_of(model)
    n_layers, cls = rollout_layers(model)
    params = dataclasses.replace(params or RolloutParams(), cls_tokens=cls)
    tower: Any = adapter.vision_tower(model.hf)
    pixels = inputs.pixel_values.to(model.device, model.dtype)
    previous = tower.config._attn_implementation
    switch = previous != "eager" and hasattr(tower, "set_attn_implementation")
    try:
        if switch:
            tower.set_attn_implementation("eager")
        attentions = vision_attentions(tower, pixels, last_k=params.last_k, n_layers=n_layers)
    finally:
        if switch:
            tower.set_attn_implementation(previous)
    return attention_rollout(
        attentions, tokens_per_image=adapter.tokens_per_image(model.hf.config), params=params
    )


def image_from_pil(image: Image.Image) -> LoadedImage:
    """A :class:`LoadedImage` for an in-memory picture (tests, notebooks), hashed as PNG bytes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="PNG")
    return load_image(buf.getvalue(), name="<in-memory image>")
