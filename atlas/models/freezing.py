"""Freezing attention patterns and norm scales: the linearisation of the local replacement model.

Inside :func:`frozen`, the model computes exactly the same values as normally, but

* attention runs through :func:`frozen_attention` (registered with transformers'
  ``AttentionInterface`` as ``"atlas_frozen"``), which detaches the attention pattern: the output
  is linear in the values, queries and keys carry no gradient;
* every norm's scale (``rsqrt(mean x^2 + eps)``, or LayerNorm's ``rsqrt(var + eps)``) is detached;
  LayerNorm's mean subtraction stays (it is linear);
* all parameters stop requiring grad, so autograd only follows the residual stream.

MLP outputs are frozen by the attribution engine's own hooks (they depend on the transcoders).
Only the attributed base model is touched (a vision-language model's language model: its
attention, masks and norms); a vision tower and projector run as they are, their outputs are
the image rows that enter as embedding-node sources.

With Gemma-3's ``token_type_ids`` the mask (built by transformers for the registered attention
name) is causal plus bidirectional within each image block, and that pattern is what is frozen
and replayed: edges from later to earlier image positions follow.

:func:`replayed` is the other way to hold the same quantities fixed: a clean run *records* the
attention patterns and norm scales, later runs *replay* them as constants (values, not just
gradients, stay at the clean run's). The perturbation oracle checks the engine against it, and
interventions (circuit-tracer's semantics: act on the real model with the clean patterns) need
exactly this.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import types
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

if TYPE_CHECKING:
    from atlas.models.loading import LoadedModel

FROZEN_ATTN = "atlas_frozen"
REPLAY_ATTN = "atlas_replay"
_registered: set[str] = set()


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def frozen_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention whose pattern is detached (same values, gradient only through V)."""
    n_rep = query.shape[1] // key.shape[1]
    key = _repeat_kv(key, n_rep)
    value = _repeat_kv(value, n_rep)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attention_mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + attention_mask[..., : key.shape[-2]]
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(value.dtype).detach()
    out = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    return out, pattern


def _register_attention(name: str, fn: Any) -> None:
    """Register ``fn`` as attention implementation ``name`` (with the eager mask), once."""
    if name in _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, eager_mask)
    _registered.add(name)


def register_frozen_attention() -> None:
    """Register :func:`frozen_attention` (and the eager mask) with transformers, once."""
    _register_attention(FROZEN_ATTN, frozen_attention)


def _frozen_rms(self: Any, x: torch.Tensor) -> torch.Tensor:
    eps: float = self.variance_epsilon if hasattr(self, "variance_epsilon") else self.eps
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
    out = (xf * scale).to(x.dtype)
    weight = getattr(self, "weight", None)
    return out if weight is None else weight * out


def _frozen_gemma_rms(self: Any, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(self, "eps", 1e-6)
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps).detach()
    out = xf * scale * (1.0 + self.weight.float())
    return out.type_as(x)


def _frozen_layernorm(self: Any, x: torch.Tensor) -> torch.Tensor:
    xf = x.float()
    centred = xf - xf.mean(-1, keepdim=True)
    scale = torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + self.eps).detach()
    out = centred * scale
    if self.weight is not None:
        out = out * self.weight.float()
    if self.bias is not None:
        out = out + self.bias.float()
    return out.to(x.dtype)


def _frozen_norm_forward(mod: nn.Module, style: str) -> Any:
    if isinstance(mod, nn.LayerNorm):
        return _frozen_layernorm
    if "Gemma" in type(mod).__name__ or style == "gemma_rms":
        return _frozen_gemma_rms
    return _frozen_rms


def _attention_owner(model: LoadedModel) -> Any:
    """The model whose attention is swapped: the base model the adapter attributes.

    For a text model it shares the wrapper's config, so this is the whole model; for a
    vision-language model it is the language model only (masks included, since the multimodal
    base builds them from the text config): the vision tower keeps its eager attention.
    """
    return model.adapter.base(model.hf)


@contextlib.contextmanager
def frozen(model: LoadedModel) -> Iterator[None]:
    """Run the model with frozen attention patterns and norm scales (see the module docstring)."""
    register_frozen_attention()
    hf = model.hf
    adapter = model.adapter
    owner = _attention_owner(model)
    previous_impl = owner.config._attn_implementation
    grad_flags = [(p, p.requires_grad) for p in hf.parameters()]
    patched: list[nn.Module] = []
    try:
        owner.set_attn_implementation(FROZEN_ATTN)
        for p, _ in grad_flags:
            p.requires_grad_(False)
        for mod in adapter.norm_modules(hf):
            fn = _frozen_norm_forward(mod, adapter.norm_style)
            mod.forward = types.MethodType(fn, mod)
            patched.append(mod)
        yield
    finally:
        for mod in patched:
            with contextlib.suppress(AttributeError):
                del mod.forward
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        owner.set_attn_implementation(previous_impl)


# ---------------------------------------------------------------------- clean-pattern replay
@dataclass
class PatternReplay:
    """Attention patterns and norm scales of a clean run, recorded once and then replayed.

    ``mode`` is ``"record"`` (compute and keep them) or ``"replay"`` (use the kept ones).
    Patterns are keyed by layer index, scales by norm module.
    """

    mode: Literal["record", "replay"] = "record"
    patterns: dict[int, torch.Tensor] = field(default_factory=dict)
    scales: dict[int, torch.Tensor] = field(default_factory=dict)

    def record(self) -> None:
        """Forget what was kept; the next run records afresh."""
        self.mode = "record"
        self.patterns, self.scales = {}, {}

    def replay(self) -> None:
        """Later runs use the recorded patterns and scales as constants."""
        self.mode = "replay"


_ACTIVE_REPLAY: contextvars.ContextVar[PatternReplay] = contextvars.ContextVar("atlas_replay")


def replay_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that records its pattern, or replays the recorded one (see above)."""
    state = _ACTIVE_REPLAY.get()
    n_rep = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(n_rep, dim=1)
    value = value.repeat_interleave(n_rep, dim=1)
    layer = int(module.layer_idx)  # type: ignore[arg-type]
    if state.mode == "record":
        scores = query @ key.transpose(2, 3) * (scaling or query.shape[-1] ** -0.5)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        if attention_mask is not None:
            scores = scores + attention_mask[..., : key.shape[-2]]
        state.patterns[layer] = torch.softmax(scores, dim=-1)
    pattern = state.patterns[layer]
    return (pattern @ value).transpose(1, 2).contiguous(), pattern


def _replay_norm(state: PatternReplay, norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
    self: Any = norm  # a norm module of any family (weight, optional bias, eps)
    is_ln = isinstance(norm, nn.LayerNorm)
    if is_ln:
        x = x - x.mean(-1, keepdim=True)
    if state.mode == "record":
        eps = getattr(self, "variance_epsilon", None) or getattr(self, "eps", None) or 1e-6
        state.scales[id(self)] = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    y = x * state.scales[id(self)]
    if is_ln:
        return y * self.weight + self.bias
    if "Gemma" in type(self).__name__:
        return y * (1.0 + self.weight)
    return y * self.weight


def register_replay_attention() -> None:
    """Register :func:`replay_attention` (and the eager mask) with transformers, once."""
    _register_attention(REPLAY_ATTN, replay_attention)


@contextlib.contextmanager
def replayed(
    model: LoadedModel,
    state: PatternReplay,
    *,
    norms: bool = True,
    live: Collection[nn.Module] = (),
) -> Iterator[PatternReplay]:
    """Run the model with attention patterns and norm scales recorded into / replayed from
    ``state`` (see :class:`PatternReplay`); everything is restored on exit.

    ``norms=False`` leaves the norms live and replays attention patterns only (what an
    intervention with frozen attention but unconstrained layers needs); norms in ``live`` stay
    live either way."""
    register_replay_attention()
    hf = model.hf
    owner = _attention_owner(model)
    previous_impl = owner.config._attn_implementation
    patched: list[nn.Module] = []
    token = _ACTIVE_REPLAY.set(state)
    try:
        owner.set_attn_implementation(REPLAY_ATTN)
        for mod in model.adapter.norm_modules(hf) if norms else []:
            if any(mod is m for m in live):
                continue
            mod.forward = types.MethodType(functools.partial(_replay_norm, state), mod)
            patched.append(mod)
        yield state
    finally:
        for mod in patched:
            with contextlib.suppress(AttributeError):
                del mod.forward
        owner.set_attn_implementation(previous_impl)
        _ACTIVE_REPLAY.reset(token)
