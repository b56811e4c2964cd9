"""Steering vectors: concept directions in the residual stream, built from two prompt sets.

The residual stream at layer ``l`` is the input of decoder layer ``l`` (``resid_pre``; for a
vision-language model, of its language model). A vector is the mean difference of residual
activations between a positive and a negative prompt set (contrastive activation addition), each
prompt reduced by a token rule: ``last`` (its last position) or ``mean`` (mean over positions 1..,
leaving out the BOS position, whose norm dwarfs the rest).

Applying it adds ``alpha * v`` to the residual at layer ``l`` over a span of positions (an int,
a list of ints, or ``slice(p, None)``: open-ended, also every generated token); ``alpha < 0``
reverses it; directional ablation removes the component along ``v``: ``h - (h . v_hat) v_hat``.
Steering acts on the live model (no frozen attention): the model reacts everywhere downstream.

:func:`decoder_cosines` links a vector to transcoder features: the cosine of ``v`` with each
feature's decoder row of a transcoder layer (for a cross-layer transcoder, the row it writes into
its own layer). A layer-``k`` decoder writes into the residual stream that layer ``k + 1`` reads.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from atlas.errors import InputError
from atlas.interventions.core import _hooks, _past_kwarg, _past_of
from atlas.models.hooks import HookPoint
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel
from atlas.transcoders.loading import TranscoderSet

TokenRule = Literal["last", "mean"]
Span = int | Sequence[int] | slice


@dataclass(frozen=True)
class SteeringVector:
    """A residual-stream direction at ``layer`` (``(d_model,)`` float32) and how it was made."""

    vector: Tensor
    layer: int
    token_rule: TokenRule
    n_positive: int
    n_negative: int

    @property
    def unit(self) -> Tensor:
        return self.vector / self.vector.norm().clamp_min(1e-12)


@dataclass
class SteeringResult:
    """One steered run.

    logits / base_logits   (P, vocab)       steered and clean logits
    residual               (L, P, d_model)  steered residual stream at every layer's input
    base_residual          (L, P, d_model)  clean residual stream
    generated_ids          (n,) int64       greedy tokens (empty unless asked)
    """

    logits: Tensor
    base_logits: Tensor
    residual: Tensor
    base_residual: Tensor
    generated_ids: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    generated_text: str = ""

    def kl(self) -> float:
        """KL(steered || clean) at the last position."""
        log_s = torch.log_softmax(self.logits[-1].double(), -1)
        log_c = torch.log_softmax(self.base_logits[-1].double(), -1)
        return float((log_s.exp() * (log_s - log_c)).sum())

    def projection(self, vector: SteeringVector, layer: int, pos: int = -1) -> tuple[float, float]:
        """``(clean, steered)`` projection of the residual at ``layer``, ``pos`` on ``v_hat``."""
        u = vector.unit.to(self.residual.dtype)
        return float(self.base_residual[layer, pos] @ u), float(self.residual[layer, pos] @ u)


def _layer_point(model: LoadedModel, layer: int) -> HookPoint:
    layers = model.adapter.layers(model.hf)
    if not 0 <= layer < len(layers):
        raise InputError(f"layer {layer} outside 0..{len(layers) - 1}")
    return HookPoint(layers[layer], "input")


@torch.no_grad()
def residuals(model: LoadedModel, inputs: ModelInputs) -> Tensor:
    """The residual stream at every layer's input, ``(L, P, d_model)`` float32."""
    seen: dict[int, Tensor] = {}
    handles = []
    for layer in range(model.n_layers):

        def keep(v: Tensor, layer: int = layer) -> None:
            seen[layer] = v[0].float().clone()

        handles.append(_layer_point(model, layer).capture(keep))
    with _hooks(handles):
        model.hf(**inputs.forward_kwargs(model.device), use_cache=False)
    return torch.stack([seen[i] for i in range(model.n_layers)])


def _reduce(resid: Tensor, rule: TokenRule) -> Tensor:
    if rule == "last":
        return resid[-1]
    if rule == "mean":
        return resid[1:].mean(0) if resid.shape[0] > 1 else resid[0]
    raise InputError(f"unknown token rule {rule!r} (last, mean)")


def build_vector(
    model: LoadedModel,
    positive: Sequence[ModelInputs],
    negative: Sequence[ModelInputs],
    layer: int,
    token_rule: TokenRule = "last",
) -> SteeringVector:
    """Mean over ``positive`` minus mean over ``negative`` of the reduced residual at ``layer``."""
    if not positive or not negative:
        raise InputError("a steering vector needs prompts in both sets")
    _layer_point(model, layer)

    def mean(prompts: Sequence[ModelInputs]) -> Tensor:
        return torch.stack([_reduce(residuals(model, p)[layer], token_rule) for p in prompts]).mean(
            0
        )

    vector = mean(positive) - mean(negative)
    if not bool(torch.isfinite(vector).all()) or float(vector.norm()) == 0:
        raise InputError("the two prompt sets give no direction (zero or non-finite difference)")
    return SteeringVector(vector, layer, token_rule, len(positive), len(negative))


def decoder_cosines(vector: SteeringVector | Tensor, tset: TranscoderSet, layer: int) -> Tensor:
    """Cosine of the vector with every feature's decoder row of transcoder ``layer``, ``(d_tc,)``."""
    if not 0 <= layer < tset.n_layers:
        raise InputError(f"layer {layer} outside 0..{tset.n_layers - 1}")
    v = vector.vector if isinstance(vector, SteeringVector) else vector
    w = tset.w_dec[layer]
    rows = w[:, 0] if w.ndim == 3 else w
    return torch.nn.functional.cosine_similarity(rows.float(), v.float().to(rows.device)[None], -1)


def _positions(span: Span, n_pos: int) -> list[int] | slice:
    if isinstance(span, slice):
        if span.stop is not None or span.step not in (None, 1):
            raise InputError("a slice span must be open-ended, slice(p, None)")
        start = span.start or 0
        if not -n_pos <= start < n_pos:
            raise InputError(f"span start {start} outside the prompt's {n_pos} positions")
        return span
    pos = [span] if isinstance(span, int) else list(span)
    for p in pos:
        if not -n_pos <= p < n_pos:
            raise InputError(f"span position {p} outside the prompt's {n_pos} positions")
    return pos


def _steer_fn(vector: SteeringVector, alpha: float, mode: str, where: list[int] | slice) -> Any:
    def steer(h: Tensor) -> Tensor:
        h = h.clone()
        v = vector.vector.to(h.device, h.dtype)
        if mode == "add":
            h[0, where] = h[0, where] + alpha * v
        else:
            u = v / v.norm().clamp_min(1e-12)
            part = h[0, where]
            h[0, where] = part - (part @ u)[..., None] * u
        return h

    return steer


def _capture_all(model: LoadedModel, seen: dict[int, Tensor]) -> list[Any]:
    handles = []
    for layer in range(model.n_layers):

        def keep(v: Tensor, layer: int = layer) -> None:
            seen.setdefault(layer, v[0].float().clone())

        handles.append(_layer_point(model, layer).capture(keep))
    return handles


@torch.no_grad()
def steer(
    model: LoadedModel,
    inputs: ModelInputs,
    vector: SteeringVector,
    alpha: float = 1.0,
    *,
    span: Span = slice(1, None),
    mode: Literal["add", "ablate"] = "add",
    generate: int = 0,
    base: tuple[Tensor, Tensor] | None = None,
) -> SteeringResult:
    """Add ``alpha * v`` (or ablate the direction) at ``vector.layer`` over ``span``, optionally
    generating ``generate`` greedy tokens (an open-ended span also steers them).

    ``base`` = ``(logits, residuals)`` of the clean run saves it in a sweep."""
    if mode not in ("add", "ablate"):
        raise InputError(f"unknown steering mode {mode!r} (add, ablate)")
    if not torch.isfinite(torch.tensor(float(alpha))):
        raise InputError(f"alpha must be finite, got {alpha!r}")
    where = _positions(span, inputs.n_pos)
    if base is None:
        base = (
            model.hf(**inputs.forward_kwargs(model.device), use_cache=False).logits[0].float(),
            residuals(model, inputs),
        )
    point = _layer_point(model, vector.layer)
    seen: dict[int, Tensor] = {}
    with ExitStack() as stack:
        stack.enter_context(_hooks([point.replace(_steer_fn(vector, alpha, mode, where))]))
        stack.enter_context(_hooks(_capture_all(model, seen)))
        out = model.hf(**inputs.forward_kwargs(model.device), use_cache=generate > 0)
    result = SteeringResult(
        logits=out.logits[0].float(),
        base_logits=base[0],
        residual=torch.stack([seen[i] for i in range(model.n_layers)]),
        base_residual=base[1],
    )
    if generate > 0:
        _generate(model, result, out, vector, alpha, mode, span, generate)
    return result


def _generate(
    model: LoadedModel,
    result: SteeringResult,
    out: Any,
    vector: SteeringVector,
    alpha: float,
    mode: str,
    span: Span,
    n: int,
) -> None:
    """Greedy continuation; an open-ended span steers every generated token too."""
    past, tokens = _past_of(out), [int(out.logits[0, -1].argmax())]
    point = _layer_point(model, vector.layer)
    open_ended = isinstance(span, slice)
    while len(tokens) < n:
        handles = [point.replace(_steer_fn(vector, alpha, mode, [0]))] if open_ended else []
        with _hooks(handles):
            ids = torch.tensor([[tokens[-1]]], device=model.device)
            step = model.hf(input_ids=ids, use_cache=True, **{_past_kwarg(model.hf): past})
        past = _past_of(step)
        tokens.append(int(step.logits[0, -1].argmax()))
    result.generated_ids = torch.tensor(tokens, dtype=torch.long)
    result.generated_text = model.tokenizer.decode(tokens)


def alpha_sweep(
    model: LoadedModel,
    inputs: ModelInputs,
    vector: SteeringVector,
    alphas: Sequence[float],
    *,
    span: Span = slice(1, None),
    tokens: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Per alpha: KL(steered || clean), the last position's probability of each of ``tokens``
    and the projection of the next layer's (or the same, at the top) residual on ``v_hat``."""
    with torch.no_grad():
        base = (
            model.hf(**inputs.forward_kwargs(model.device), use_cache=False).logits[0].float(),
            residuals(model, inputs),
        )
    probe = min(vector.layer + 1, model.n_layers - 1)
    rows = []
    for alpha in alphas:
        res = steer(model, inputs, vector, alpha, span=span, base=base)
        probs = torch.softmax(res.logits[-1].double(), -1)
        rows.append(
            {
                "alpha": float(alpha),
                "kl": res.kl(),
                "probabilities": {int(t): float(probs[t]) for t in tokens},
                "projection": res.projection(vector, probe)[1],
            }
        )
    return rows
