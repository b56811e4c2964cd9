"""Model loading and family adapters (Gemma-2, Gemma-3 text, Llama 3, Qwen2, Qwen3, GPT-2; and the
vision-language Gemma-3 and LLaVA through their language model's adapter).

Public API::

    load_model(name_or_path, *, device="cpu", dtype=torch.float32, revision=None) -> LoadedModel
    LoadedModel.inputs(prompt, image=None) -> ModelInputs (ids with a leading special token;
        with an image: pixels, token types, image positions and grid)
    image_rollout(loaded, inputs, params=None) -> Rollout (attention rollout per image token)
    LoadedModel.to_input_ids(prompt) -> 1-D ids with a leading special token
    frozen(loaded)      context manager: attention patterns and norm scales detached
    replayed(loaded, PatternReplay())   clean attention patterns and norm scales replayed
    layer_hooks(loaded, tset), embedding_point(loaded), HookPoint: where values are read
    SUPPORTED_FAMILIES
"""

from atlas.models.adapters import (
    ADAPTERS,
    SUPPORTED_FAMILIES,
    VISION_FAMILIES,
    FamilyAdapter,
    VisionLanguageAdapter,
    adapter_for_config,
    vision_adapter,
)
from atlas.models.freezing import PatternReplay, frozen, replayed
from atlas.models.hooks import HookPoint, LayerHooks, embedding_point, layer_hooks
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel, load_model
from atlas.models.vision import image_inputs, image_rollout

__all__ = [
    "ADAPTERS",
    "SUPPORTED_FAMILIES",
    "VISION_FAMILIES",
    "FamilyAdapter",
    "HookPoint",
    "LayerHooks",
    "LoadedModel",
    "ModelInputs",
    "PatternReplay",
    "VisionLanguageAdapter",
    "adapter_for_config",
    "embedding_point",
    "frozen",
    "image_inputs",
    "image_rollout",
    "layer_hooks",
    "load_model",
    "replayed",
    "vision_adapter",
]
