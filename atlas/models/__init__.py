"""Model loading and family adapters (Gemma-2, Gemma-3 text, Llama 3, Qwen2, Qwen3, GPT-2).

Public API::

    load_model(name_or_path, *, device="cpu", dtype=torch.float32, revision=None) -> LoadedModel
    LoadedModel.to_input_ids(prompt) -> 1-D ids with a leading special token
    frozen(loaded)      context manager: attention patterns and norm scales detached
    SUPPORTED_FAMILIES
"""

from atlas.models.adapters import ADAPTERS, SUPPORTED_FAMILIES, FamilyAdapter, adapter_for_config
from atlas.models.freezing import frozen
from atlas.models.loading import LoadedModel, load_model

__all__ = [
    "ADAPTERS",
    "SUPPORTED_FAMILIES",
    "FamilyAdapter",
    "LoadedModel",
    "adapter_for_config",
    "frozen",
    "load_model",
]
