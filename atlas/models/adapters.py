"""One small adapter per model family, all sharing one mechanism.

An adapter answers, for one Hugging Face architecture, the handful of questions the attribution
engine asks: where the decoder layers are, which module's output is the MLP input (after the
pre-MLP norm), which module's output is the MLP's contribution to the residual stream (Gemma:
after the post-feed-forward norm), where the embedding nodes' vectors enter the residual stream,
where the unembedding lives and which norm style the family uses (so norm scales can be frozen).

Vision-language models (Gemma-3, LLaVA) use the same mechanism: a
:class:`VisionLanguageAdapter` is its language model's text adapter (Gemma-3 text, Llama, Qwen2,
...) with the base model moved to the language model inside the multimodal wrapper
(``model.language_model``), the embedding read point moved to the first decoder layer's input
(where image rows have replaced the placeholders' embeddings) and the frozen pass run through the
multimodal base (so the image is encoded and scattered as in the real forward). Everything the
engine asks per layer (transcoder hooks, MLPs, norms to freeze) is answered by the text adapter's
fields unchanged; the vision tower and the projector lie outside the base, so they are never
frozen, hooked or attributed through.

Transcoder hook names follow circuit-tracer's (TransformerLens) convention:

    feature_input_hook   ``ln2.hook_normalized`` | ``mlp.hook_in``  -> output of the pre-MLP norm
                         ``hook_resid_mid``                          -> input of the pre-MLP norm
    feature_output_hook  ``hook_mlp_out``   -> the MLP's residual contribution (Gemma: post-FF norm)
                         ``mlp.hook_out``   -> the MLP module's own output
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor, nn

from atlas.errors import ConfigError, TranscoderError

NormStyle = Literal["gemma_rms", "rms", "layernorm"]
Where = Literal["input", "output"]
"""Which side of a module a hook point reads: its first input or its output."""

INPUT_HOOKS_NORM_OUT = ("ln2.hook_normalized", "mlp.hook_in")
INPUT_HOOKS_NORM_IN = ("hook_resid_mid",)
OUTPUT_HOOKS = ("hook_mlp_out", "mlp.hook_out")


@dataclass(frozen=True)
class FamilyAdapter:
    """Where things are in one model family (see the module docstring)."""

    family: str
    """Short family name: gemma2, gemma3, llama, qwen2, qwen3, gpt2."""
    model_types: tuple[str, ...]
    """``config.model_type`` values this adapter serves."""
    base_attr: str
    """Path (dotted) in the wrapper to the base model whose layers are attributed (``model``,
    ``transformer``; ``model.language_model`` in a vision-language model)."""
    layers_attr: str
    """Attribute of the base model holding the decoder layers."""
    embed_attr: str
    """Attribute of the base model holding the token embedding."""
    mlp_in_norm_attr: str
    """Attribute of a layer: the norm whose output is the MLP input."""
    mlp_attr: str
    """Attribute of a layer: the MLP module."""
    mlp_out_attr: str
    """Attribute of a layer: the module whose output is the MLP's residual contribution."""
    norm_style: NormStyle
    """How the family's norms compute (for freezing their scale)."""
    default_input_hook: str
    default_output_hook: str

    # ------------------------------------------------------------------ access
    def base(self, hf: nn.Module) -> nn.Module:
        return hf.get_submodule(self.base_attr)

    def final_hidden(self, hf: nn.Module, kwargs: dict[str, Tensor]) -> Tensor:
        """The final residual stream (after the final norm), ``(1, P, D)``, for the forward
        keyword arguments ``kwargs`` (:meth:`ModelInputs.forward_kwargs`).

        Text models: the base model itself on the token ids.
        """
        out: Tensor = self.base(hf)(**kwargs, use_cache=False).last_hidden_state
        return out

    def layers(self, hf: nn.Module) -> list[nn.Module]:
        return list(getattr(self.base(hf), self.layers_attr))

    def embed(self, hf: nn.Module) -> nn.Module:
        mod = getattr(self.base(hf), self.embed_attr)
        assert isinstance(mod, nn.Module)
        return mod

    def residual_input_point(self, hf: nn.Module) -> tuple[nn.Module, Where]:
        """``(module, "input"|"output")`` where the embedding nodes' vectors are read and perturbed.

        For text models this is the embedding module's output (the residual stream's first
        value, already scaled where the family scales it). A vision-language adapter points at
        the first decoder layer's input instead, where the image rows have replaced the
        placeholder tokens' embeddings.
        """
        return self.embed(hf), "output"

    def unembed_weight(self, hf: Any) -> Any:
        """``(vocab, d_model)`` unembedding matrix."""
        return hf.get_output_embeddings().weight

    def norm_modules(self, hf: nn.Module) -> list[nn.Module]:
        """Every norm in the base model whose scale must be frozen."""
        out = []
        for mod in self.base(hf).modules():
            name = type(mod).__name__
            if isinstance(mod, nn.LayerNorm) or name.endswith("RMSNorm"):
                out.append(mod)
        return out

    def feature_input_module(self, layer: nn.Module, hook: str) -> tuple[nn.Module, Where]:
        """``(module, "input"|"output")`` where a transcoder with ``hook`` reads its input."""
        norm = getattr(layer, self.mlp_in_norm_attr)
        if hook in INPUT_HOOKS_NORM_OUT:
            return norm, "output"
        if hook in INPUT_HOOKS_NORM_IN:
            return norm, "input"
        raise TranscoderError(
            f"unsupported feature_input_hook {hook!r} for {self.family}; supported: "
            f"{', '.join(INPUT_HOOKS_NORM_OUT + INPUT_HOOKS_NORM_IN)}"
        )

    def feature_input_value(self, layer: nn.Module, hook: str, value: Tensor) -> Tensor:
        """The transcoder input, given the value captured at :meth:`feature_input_module`.

        TransformerLens's ``ln2.hook_normalized`` (circuit-tracer's convention, used by GemmaScope
        transcoders) is the norm's normalised value *before* its learned scale and bias, whereas
        the Hugging Face module returns the scaled value; undo the scale (and bias) here. With the
        norm frozen this is an affine map, so gradients injected into the result are exact.
        """
        if hook != "ln2.hook_normalized":
            return value
        norm = getattr(layer, self.mlp_in_norm_attr)
        weight = norm.weight.to(value.dtype)
        if self.norm_style == "gemma_rms":
            return value / (1.0 + weight)
        bias = getattr(norm, "bias", None)
        if bias is not None:
            value = value - bias.to(value.dtype)
        return value / weight

    def feature_output_module(self, layer: nn.Module, hook: str) -> nn.Module:
        """The module whose output a transcoder with ``hook`` reconstructs."""
        if hook == "hook_mlp_out":
            mod = getattr(layer, self.mlp_out_attr)
        elif hook == "mlp.hook_out":
            mod = getattr(layer, self.mlp_attr)
        else:
            raise TranscoderError(
                f"unsupported feature_output_hook {hook!r} for {self.family}; supported: "
                f"{', '.join(OUTPUT_HOOKS)}"
            )
        assert isinstance(mod, nn.Module)
        return mod


def _llama_like(family: str, model_types: tuple[str, ...]) -> FamilyAdapter:
    return FamilyAdapter(
        family=family,
        model_types=model_types,
        base_attr="model",
        layers_attr="layers",
        embed_attr="embed_tokens",
        mlp_in_norm_attr="post_attention_layernorm",
        mlp_attr="mlp",
        mlp_out_attr="mlp",
        norm_style="rms",
        default_input_hook="mlp.hook_in",
        default_output_hook="mlp.hook_out",
    )


def _gemma(family: str, model_types: tuple[str, ...]) -> FamilyAdapter:
    return dataclasses.replace(
        _llama_like(family, model_types),
        mlp_in_norm_attr="pre_feedforward_layernorm",
        mlp_out_attr="post_feedforward_layernorm",
        norm_style="gemma_rms",
        default_input_hook="ln2.hook_normalized",
        default_output_hook="hook_mlp_out",
    )


ADAPTERS: dict[str, FamilyAdapter] = {
    "gemma2": _gemma("gemma2", ("gemma2",)),
    "gemma3": _gemma("gemma3", ("gemma3_text",)),
    "llama": _llama_like("llama", ("llama",)),
    "qwen2": _llama_like("qwen2", ("qwen2",)),
    "qwen3": _llama_like("qwen3", ("qwen3",)),
    "gpt2": FamilyAdapter(
        family="gpt2",
        model_types=("gpt2",),
        base_attr="transformer",
        layers_attr="h",
        embed_attr="wte",
        mlp_in_norm_attr="ln_2",
        mlp_attr="mlp",
        mlp_out_attr="mlp",
        norm_style="layernorm",
        default_input_hook="ln2.hook_normalized",
        default_output_hook="hook_mlp_out",
    ),
}

SUPPORTED_FAMILIES = tuple(ADAPTERS)


@dataclass(frozen=True)
class VisionLanguageAdapter(FamilyAdapter):
    """A vision-language model seen through its language model's text adapter.

    Built by :func:`vision_adapter` from the text adapter (:attr:`text`): every per-layer field is
    the text family's; what differs is where the base model sits, where embedding nodes are read
    and how the frozen pass runs (see the module docstring).

    Embedding nodes are read at the input of the first decoder layer: a text row there is the
    scaled token embedding (as at the embedding output), an image row is the projector's output
    row, which replaced the placeholder's embedding (not scaled by ``sqrt(d_model)``, as in
    transformers). Gradients therefore stop at the projector output: the tower and the projector
    stay outside the graph.

    The model runs as transformers runs it, which is where the VLM paper's code (a
    TransformerLens fork) departs in two places on real Gemma-3: it gives every layer the last
    layer's rotary tables, so Gemma-3's global layers run with the local RoPE base (on
    Gemma-3-4B the logits move by about 1), and with an image present it replaces the
    sliding-window mask by its own (different only past the window, 1024 positions on 4B).
    Here each layer gets its own layer type's rotary table and transformers' masks (causal,
    sliding window, bidirectional inside each image block from ``token_type_ids``); graphs equal
    the paper's where those coincide.
    """

    text: FamilyAdapter
    """The language model's text family adapter."""
    multimodal_attr: str
    """Path to the multimodal base (tower + projector + language model): ``model``."""
    vision_attr: str
    """Path to the vision tower: ``model.vision_tower``."""
    image_placeholder: str
    """The text that marks where the image goes (``<start_of_image>`` / ``<image>``)."""
    image_prefix: str
    """Put before a prompt that has no placeholder (where the processor's chat template puts
    the image: before the user's text)."""
    bidirectional_images: bool
    """Whether attention is bidirectional inside an image's run of soft tokens (Gemma-3)."""
    tokens_per_image_attr: str
    """Config attribute holding the soft tokens per image (``mm_tokens_per_image`` /
    ``image_seq_length``)."""

    def residual_input_point(self, hf: nn.Module) -> tuple[nn.Module, Where]:
        return self.layers(hf)[0], "input"

    def final_hidden(self, hf: nn.Module, kwargs: dict[str, Tensor]) -> Tensor:
        """The multimodal base runs the tower, the projector and the scatter of image rows, then
        the language model (with Gemma-3's bidirectional image mask from ``token_type_ids``)."""
        base = hf.get_submodule(self.multimodal_attr)
        out: Tensor = base(**kwargs, use_cache=False).last_hidden_state
        return out

    def vision_tower(self, hf: nn.Module) -> nn.Module:
        return hf.get_submodule(self.vision_attr)

    def tokens_per_image(self, config: Any) -> int:
        return int(getattr(config, self.tokens_per_image_attr))


VISION_FAMILIES = ("gemma3_vlm", "llava")
"""Vision-language families: Gemma-3 (``gemma3``) and LLaVA (``llava``, any text family's LM)."""


def vision_adapter(config: Any) -> VisionLanguageAdapter | None:
    """The vision-language adapter for a multimodal config, ``None`` for a text model.

    Gemma-3 wraps the Gemma-3 text adapter; LLaVA wraps the adapter of its ``text_config``
    (Llama, Qwen2, ...), its family named ``llava_<text family>``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3":
        text, family = ADAPTERS["gemma3"], "gemma3_vlm"
        placeholder, prefix, bidirectional, count = (
            "<start_of_image>",
            "<start_of_image>",
            True,
            "mm_tokens_per_image",
        )
    elif model_type == "llava":
        text = adapter_for_config(config.get_text_config())
        family = f"llava_{text.family}"
        placeholder, prefix, bidirectional, count = (
            "<image>",
            "<image>\n",
            False,
            "image_seq_length",
        )
    else:
        return None
    fields = {f.name: getattr(text, f.name) for f in dataclasses.fields(FamilyAdapter)}
    fields |= {
        "family": family,
        "model_types": (model_type,),
        "base_attr": "model.language_model",
    }
    return VisionLanguageAdapter(
        **fields,
        text=text,
        multimodal_attr="model",
        vision_attr="model.vision_tower",
        image_placeholder=placeholder,
        image_prefix=prefix,
        bidirectional_images=bidirectional,
        tokens_per_image_attr=count,
    )


def adapter_for_config(config: Any) -> FamilyAdapter:
    """The adapter for a transformers config (text or vision-language); :class:`ConfigError`
    for unknown architectures."""
    model_type = getattr(config, "model_type", None)
    for adapter in ADAPTERS.values():
        if model_type in adapter.model_types:
            return adapter
    vision = vision_adapter(config)
    if vision is not None:
        return vision
    raise ConfigError(
        f"unsupported model architecture {model_type!r}; supported families: "
        f"{', '.join(SUPPORTED_FAMILIES + VISION_FAMILIES)}"
    )
