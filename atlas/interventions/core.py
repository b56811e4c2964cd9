"""Feature interventions on the real model, with circuit-tracer's semantics.

An :class:`Intervention` ``(layer, pos, feature, value)`` asks for feature ``feature`` of layer
``layer``'s transcoder to take the ABSOLUTE activation ``value`` at position ``pos`` (an index of
the model's token sequence, BOS included, negative allowed; or ``slice(p, None)``, open-ended, which
also covers every generated token). It is applied on the real model as
``(value - current) * W_dec[feature]`` added to the MLP output of that layer (a cross-layer
feature writes into every later layer); the transcoder only encodes the current activations (read
at its input) and supplies decoder rows. Error terms are never added.

Two ways of running, as circuit-tracer's ``feature_intervention``:

* iterative (``constrained=None``): ``current`` is the live activation, re-encoded in the
  intervened pass, so the feature stays clamped at ``value`` while the real MLPs downstream react;
* constrained (``constrained=range(a, b)``): inside the range every MLP output is frozen to its
  clean value plus the deltas, which are computed against the CLEAN activations; decoder writes to
  layers outside the range are dropped (so is the intervention itself when its layer lies outside);
  skip transcoders add ``skip(live input) - skip(clean input)`` inside the range. Norm scales are
  frozen only when the range covers every layer (what circuit-tracer's code does; its docstring
  says otherwise), which makes the run the linear local replacement model: direct effects.

Attention patterns come from a clean pass (:func:`atlas.models.freezing.replayed`) when
``freeze_attention`` is set (default) and always under constraints, as in circuit-tracer. Features
at the leading zeroed positions (BOS; gemma-3-it: 4) read as 0, so an intervention there adds
``value * W_dec``.

Norm scales frozen under a full constraint are those outside attention; q/k norms inside it
(Qwen3's) stay live, which only matters to the kv cache (Gemma-3's are frozen too, as circuit-
tracer's mapping does). Generation (:func:`generate`) is greedy with the kv cache: the prompt pass is the intervention
above (freezing and constraints apply to it only); every generated token gets the open-ended
interventions at its own position, iteratively, with live attention.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from atlas.attribution.context import zero_positions
from atlas.errors import InputError
from atlas.models.freezing import PatternReplay, replayed
from atlas.models.hooks import HookPoint, layer_hooks
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel
from atlas.transcoders.loading import TranscoderSet

Position = int | slice
Mode = Literal["set", "scale", "add", "ablate"]


@dataclass(frozen=True)
class Intervention:
    """Feature ``feature`` of layer ``layer`` takes activation ``value`` at ``pos``.

    ``value`` is a float, or for a slice position a tensor broadcast over the covered positions
    (what ``scale`` resolves to); a tensor value applies to the prompt's positions only.
    """

    layer: int
    pos: Position
    feature: int
    value: float | Tensor


@dataclass(frozen=True)
class FeatureEdit:
    """An intervention asked for by mode; :func:`resolve` turns it into an :class:`Intervention`.

    ``set``: value = amount; ``scale``: amount * clean activation; ``add``: clean + amount;
    ``ablate``: 0 (amount ignored).
    """

    layer: int
    pos: Position
    feature: int
    mode: Mode = "set"
    amount: float = 0.0


@dataclass
class CleanRun:
    """The unintervened prompt pass, and what later passes need from it (``P`` positions).

    inputs       list of (P, d_model)  transcoder inputs per layer
    outputs      list of (P, d_model)  MLP outputs (the hooked feature outputs) per layer
    activations  (L, P, d_tc)          activations (leading zeroed positions 0)
    logits       (P, vocab)            the model's logits (softcap applied)
    final_hidden (P, d_model)          the unembedding's input (after the final norm)
    replay       PatternReplay         the recorded attention patterns and norm scales
    """

    inputs: list[Tensor]
    outputs: list[Tensor]
    activations: Tensor
    logits: Tensor
    final_hidden: Tensor
    replay: PatternReplay


@dataclass
class InterventionResult:
    """One intervention run on one prompt.

    logits             (P, vocab)        steered logits (softcap applied)
    base_logits        (P, vocab)        clean logits
    activations        (L, P, d_tc)      steered activations read at the encoder input (an
                                         intervened feature's value is NOT the one set); pre-
                                         activations when ``apply_activation_function=False``
    clean_activations  (L, P, d_tc)      clean activations (activated)
    final_hidden       (P, d_model)      steered unembedding input (for demeaned logits)
    base_final_hidden  (P, d_model)      clean unembedding input
    generated_ids      (n,) int64        greedily generated tokens (empty unless asked)
    generated_logits   (n, vocab)        their logits; row 0 = the prompt's last position
    generated_text     str               decoded generated tokens
    """

    logits: Tensor
    base_logits: Tensor
    activations: Tensor
    clean_activations: Tensor
    final_hidden: Tensor
    base_final_hidden: Tensor
    interventions: list[Intervention]
    generated_ids: Tensor | None = None
    generated_logits: Tensor | None = None
    generated_text: str = ""
    clean_pre_activations: Tensor | None = None
    """Clean pre-activations ``(L, P, d_tc)`` when ``activations`` holds pre-activations."""

    @property
    def last_logits(self) -> Tensor:
        return self.logits[-1]

    @property
    def base_last_logits(self) -> Tensor:
        return self.base_logits[-1]

    def kl(self) -> float:
        """KL(steered || clean) of the next-token distributions at the last position."""
        log_s = torch.log_softmax(self.last_logits.double(), -1)
        log_c = torch.log_softmax(self.base_last_logits.double(), -1)
        return float((log_s.exp() * (log_s - log_c)).sum())

    def top(self, k: int = 10) -> list[tuple[int, float, float]]:
        """``(token id, clean probability, steered probability)`` of the tokens most probable in
        either run, by steered probability then clean."""
        p_c = torch.softmax(self.base_last_logits.double(), -1)
        p_s = torch.softmax(self.last_logits.double(), -1)
        ids = torch.cat([p_s.topk(k).indices, p_c.topk(k).indices]).unique()
        ranked = sorted(ids.tolist(), key=lambda i: (-float(p_s[i]), -float(p_c[i])))[:k]
        return [(int(i), float(p_c[i]), float(p_s[i])) for i in ranked]


# ---------------------------------------------------------------------- validation
def _check_position(pos: Position, n_pos: int, what: str) -> None:
    if isinstance(pos, slice):
        if pos.stop is not None or pos.step not in (None, 1):
            raise InputError(f"{what}: a slice position must be open-ended, slice(p, None)")
        start = pos.start or 0
        if not -n_pos <= start < n_pos:
            raise InputError(f"{what}: position {start} outside the prompt's {n_pos} positions")
        return
    if isinstance(pos, bool) or not isinstance(pos, int):
        raise InputError(f"{what}: position must be an int or slice(p, None), not {pos!r}")
    if not -n_pos <= pos < n_pos:
        raise InputError(f"{what}: position {pos} outside the prompt's {n_pos} positions")


def check_feature(
    tset: TranscoderSet, layer: int, pos: Position, feature: int, n_pos: int, what: str
) -> None:
    """One-line :class:`InputError` for a layer, feature or position out of range."""
    if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < tset.n_layers:
        raise InputError(f"{what}: layer {layer!r} outside 0..{tset.n_layers - 1}")
    if (
        isinstance(feature, bool)
        or not isinstance(feature, int)
        or not 0 <= feature < tset.d_transcoder
    ):
        raise InputError(f"{what}: feature {feature!r} outside 0..{tset.d_transcoder - 1}")
    _check_position(pos, n_pos, what)


def _check_value(value: float | Tensor, what: str) -> None:
    finite = (
        bool(torch.isfinite(value).all()) if isinstance(value, Tensor) else math.isfinite(value)
    )
    if not finite:
        raise InputError(f"{what}: value must be finite, got {value!r}")


def validate(tset: TranscoderSet, interventions: Sequence[Intervention], n_pos: int) -> None:
    """Every intervention names an existing layer, feature and position with a finite value."""
    for iv in interventions:
        what = f"intervention {iv.layer}:{iv.pos}:{iv.feature}"
        check_feature(tset, iv.layer, iv.pos, iv.feature, n_pos, what)
        _check_value(iv.value, what)


def resolve(edits: Sequence[FeatureEdit | Intervention], clean: Tensor) -> list[Intervention]:
    """Interventions with absolute values, from edits by mode and the clean activations
    ``(L, P, d_tc)`` (already-absolute :class:`Intervention` entries pass through)."""
    out = []
    for e in edits:
        if isinstance(e, Intervention):
            out.append(e)
            continue
        what = f"{e.mode} {e.layer}:{e.pos}:{e.feature}"
        if e.mode not in ("set", "scale", "add", "ablate"):
            raise InputError(f"{what}: unknown mode (set, scale, add, ablate)")
        _check_value(e.amount, what)
        n_layers, n_pos, d_tc = clean.shape
        if isinstance(e.layer, bool) or not isinstance(e.layer, int) or not 0 <= e.layer < n_layers:
            raise InputError(f"{what}: layer {e.layer!r} outside 0..{n_layers - 1}")
        if (
            isinstance(e.feature, bool)
            or not isinstance(e.feature, int)
            or not 0 <= e.feature < d_tc
        ):
            raise InputError(f"{what}: feature {e.feature!r} outside 0..{d_tc - 1}")
        _check_position(e.pos, n_pos, what)
        a = clean[e.layer, e.pos, e.feature]
        value: float | Tensor
        if e.mode == "set":
            value = float(e.amount)
        elif e.mode == "ablate":
            value = 0.0
        elif e.mode == "scale":
            value = e.amount * a
        else:
            value = a + e.amount
        if isinstance(value, Tensor) and value.ndim == 0:
            value = float(value)
        out.append(Intervention(e.layer, e.pos, e.feature, value))
    return out


# ---------------------------------------------------------------------- hooked passes
@contextmanager
def _hooks(handles: list[RemovableHandle]) -> Iterator[None]:
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _unembed_point(model: LoadedModel) -> HookPoint:
    return HookPoint(model.hf.get_output_embeddings(), "input")


@torch.no_grad()
def clean_run(model: LoadedModel, tset: TranscoderSet, inputs: ModelInputs) -> CleanRun:
    """The clean prompt pass, recording attention patterns and norm scales for replay."""
    n_layers = model.n_layers
    ins: dict[int, Tensor] = {}
    outs: dict[int, Tensor] = {}
    final: list[Tensor] = []
    handles = [_unembed_point(model).capture(lambda v: final.append(v[0]))]
    for layer, hk in enumerate(layer_hooks(model, tset)):

        def keep_in(v: Tensor, layer: int = layer, f: Callable = hk.to_input) -> None:
            ins[layer] = f(v[0])

        def keep_out(v: Tensor, layer: int = layer) -> None:
            outs[layer] = v[0].clone()

        handles += [hk.feature_input.capture(keep_in), hk.feature_output.capture(keep_out)]
    replay = PatternReplay()
    with _hooks(handles), replayed(model, replay):
        logits = model.hf(**inputs.forward_kwargs(model.device), use_cache=False).logits[0]
    replay.replay()
    zero = zero_positions(model, inputs)
    acts = torch.stack([tset.encode(i, ins[i]) for i in range(n_layers)])
    acts[:, :zero] = 0
    return CleanRun(
        inputs=[ins[i] for i in range(n_layers)],
        outputs=[outs[i] for i in range(n_layers)],
        activations=acts,
        logits=logits.float(),
        final_hidden=final[-1].float(),
        replay=replay,
    )


class _Patcher:
    """The hooks of one intervened pass: reads live activations, writes the deltas.

    ``deltas[l]`` (P, d_model) accumulates what is added to layer ``l``'s MLP output; in
    iterative mode a layer's deltas are computed when its input is read (before its MLP runs).
    """

    def __init__(
        self,
        tset: TranscoderSet,
        interventions: Sequence[Intervention],
        n_pos: int,
        constrained: range | None,
        clean: CleanRun | None,
        zero: int,
        activate: bool,
    ) -> None:
        self.tset, self.constrained, self.clean = tset, constrained, clean
        self.zero, self.activate = zero, activate
        self.by_layer: dict[int, list[Intervention]] = defaultdict(list)
        for iv in interventions:
            self.by_layer[iv.layer].append(iv)
        ref = tset.w_enc[0]
        self.deltas = torch.zeros(tset.n_layers, n_pos, tset.d_model, dtype=ref.dtype)
        self.deltas = self.deltas.to(ref.device)
        self.inputs: dict[int, Tensor] = {}
        self.acts: dict[int, Tensor] = {}
        if constrained is not None:
            assert clean is not None
            for layer in self.by_layer:
                self._add_deltas(layer, clean.activations[layer])

    def _add_deltas(self, layer: int, current: Tensor) -> None:
        """``(value - current) * W_dec`` of this layer's interventions into ``deltas``."""
        delta = torch.zeros_like(current)
        for iv in self.by_layer[layer]:
            delta[iv.pos, iv.feature] = iv.value - current[iv.pos, iv.feature]
        pos, feat = delta.nonzero(as_tuple=True)
        if pos.numel() == 0:
            return
        amount = delta[pos, feat]
        w = self.tset.w_dec[layer][feat]
        if w.ndim == 2:
            self.deltas[layer].index_add_(0, pos, w * amount[:, None])
        else:  # CLT: (n, n_layers - layer, d_model) into layers layer, layer + 1, ...
            self.deltas[layer:].index_add_(1, pos, (w * amount[:, None, None]).transpose(0, 1))

    def on_input(self, layer: int, x: Tensor) -> None:
        self.inputs[layer] = x
        pre = self.tset.pre_activations(layer, x)
        acts = self.tset.activate(layer, pre)
        acts[: self.zero] = 0
        shown = acts if self.activate else pre.clone()
        shown[: self.zero] = 0
        self.acts[layer] = shown
        if self.constrained is None and self.by_layer.get(layer):
            self._add_deltas(layer, acts)

    def on_output(self, layer: int, value: Tensor) -> Tensor:
        if self.constrained is None:
            return value + self.deltas[layer].to(value.dtype)
        if layer not in self.constrained:
            return value
        assert self.clean is not None
        new = self.clean.outputs[layer].to(value.dtype)
        if self.tset.has_skip:
            x, x0 = self.inputs[layer], self.clean.inputs[layer]
            new = new + self.tset.skip(layer, x) - self.tset.skip(layer, x0)
        return (new + self.deltas[layer].to(new.dtype)).to(value.dtype)[None]


def _patch_handles(model: LoadedModel, tset: TranscoderSet, patcher: _Patcher) -> list[Any]:
    handles = []
    for layer, hk in enumerate(layer_hooks(model, tset)):

        def read(v: Tensor, layer: int = layer, f: Callable = hk.to_input) -> None:
            patcher.on_input(layer, f(v[0]))

        def write(v: Tensor, layer: int = layer) -> Tensor:
            return patcher.on_output(layer, v)

        handles += [hk.feature_input.capture(read), hk.feature_output.replace(write)]
    return handles


def _freezes(model: LoadedModel, constrained: range | None, freeze_attention: bool) -> bool:
    return freeze_attention or constrained is not None


def _covers_all(model: LoadedModel, constrained: range | None) -> bool:
    return constrained is not None and set(range(model.n_layers)) <= set(constrained)


def _check_range(model: LoadedModel, constrained: range | None) -> None:
    if constrained is None:
        return
    if len(constrained) == 0 or constrained.step != 1:
        raise InputError(f"constrained layers {constrained} must be a non-empty range of step 1")
    if constrained.start < 0 or constrained.stop > model.n_layers:
        raise InputError(f"constrained layers {constrained} outside 0..{model.n_layers - 1}")


def attention_norms(model: LoadedModel) -> list[torch.nn.Module]:
    """The norms inside attention modules (Qwen3's q/k norms) that an intervention leaves live.

    With attention patterns frozen they only reach the kv cache, which later generated tokens
    read: circuit-tracer freezes Gemma-3's and leaves the others' live, and so does this.
    """
    if model.adapter.family.startswith("gemma3"):
        return []
    out = []
    for layer in model.adapter.layers(model.hf):
        attn = getattr(layer, "self_attn", None) or getattr(layer, "attn", None)
        if attn is None:
            continue
        out += [m for m in attn.modules() if m is not attn and type(m).__name__.endswith("Norm")]
    return out


@dataclass
class _Pass:
    """An intervened prompt pass: its clean run, resolved interventions, logits, patcher (with
    the activations), final hidden states and past key values (None without the cache)."""

    clean: CleanRun
    interventions: list[Intervention]
    logits: Tensor
    patcher: _Patcher
    final: Tensor
    past: Any


def _prompt_pass(
    model: LoadedModel,
    tset: TranscoderSet,
    inputs: ModelInputs,
    edits: Sequence[FeatureEdit | Intervention],
    clean: CleanRun | None,
    constrained: range | None,
    freeze_attention: bool,
    activate: bool,
    use_cache: bool,
) -> _Pass:
    """The intervened prompt pass (with ``clean`` run first when it is None)."""
    _check_range(model, constrained)
    clean = clean if clean is not None else clean_run(model, tset, inputs)
    interventions = resolve(edits, clean.activations)
    validate(tset, interventions, inputs.n_pos)
    patcher = _Patcher(
        tset,
        interventions,
        inputs.n_pos,
        constrained,
        clean,
        zero_positions(model, inputs),
        activate,
    )
    final: list[Tensor] = []
    handles = [_unembed_point(model).capture(lambda v: final.append(v[0]))]
    handles += _patch_handles(model, tset, patcher)
    with ExitStack() as stack, torch.no_grad():
        stack.enter_context(_hooks(handles))
        if _freezes(model, constrained, freeze_attention) and interventions:
            stack.enter_context(
                replayed(
                    model,
                    clean.replay,
                    norms=_covers_all(model, constrained),
                    live=attention_norms(model),
                )
            )
        out = model.hf(**inputs.forward_kwargs(model.device), use_cache=use_cache)
    past = _past_of(out) if use_cache else None
    return _Pass(clean, interventions, out.logits[0].float(), patcher, final[-1].float(), past)


def _result(model: LoadedModel, p: _Pass, **extra: Any) -> InterventionResult:
    """The :class:`InterventionResult` of an intervened prompt pass, with ``extra`` fields."""
    return InterventionResult(
        logits=p.logits,
        base_logits=p.clean.logits,
        activations=_stack_acts(p.patcher, model.n_layers),
        clean_activations=p.clean.activations,
        final_hidden=p.final,
        base_final_hidden=p.clean.final_hidden,
        interventions=p.interventions,
        **extra,
    )


def _stack_acts(patcher: _Patcher, n_layers: int) -> Tensor:
    return torch.stack([patcher.acts[i] for i in range(n_layers)])


def feature_intervention(
    model: LoadedModel,
    tset: TranscoderSet,
    inputs: ModelInputs,
    edits: Sequence[FeatureEdit | Intervention],
    *,
    constrained: range | None = None,
    freeze_attention: bool = True,
    apply_activation_function: bool = True,
    clean: CleanRun | None = None,
) -> InterventionResult:
    """Run ``edits`` on ``inputs`` (see the module docstring for the semantics).

    ``clean`` (from :func:`clean_run` on the same inputs) saves the clean pass when several
    interventions share a prompt.
    """
    p = _prompt_pass(
        model,
        tset,
        inputs,
        edits,
        clean,
        constrained,
        freeze_attention,
        apply_activation_function,
        use_cache=False,
    )
    return _result(
        model,
        p,
        clean_pre_activations=None
        if apply_activation_function
        else _clean_pre(tset, p.clean, zero_positions(model, inputs)),
    )


def _clean_pre(tset: TranscoderSet, clean: CleanRun, zero: int) -> Tensor:
    pre = torch.stack([tset.pre_activations(i, x) for i, x in enumerate(clean.inputs)])
    pre[:, :zero] = 0
    return pre


def open_ended(interventions: Sequence[Intervention]) -> list[Intervention]:
    """The interventions that also apply to generated tokens (``slice(p, None)``), at position 0
    of a one-token step (a tensor value covers prompt positions only and is left out)."""
    out = []
    for iv in interventions:
        if isinstance(iv.pos, slice) and iv.pos.stop is None and not isinstance(iv.value, Tensor):
            out.append(Intervention(iv.layer, 0, iv.feature, iv.value))
    return out


def _eos_ids(model: LoadedModel) -> set[int]:
    eos = getattr(getattr(model.hf, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, list) else [eos])}


def _past_kwarg(hf: Any) -> str:
    """The forward's name for the kv cache (``cache`` in newer transformers)."""
    params = inspect.signature(hf.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _past_of(out: Any) -> Any:
    past = getattr(out, "past_key_values", None)
    return past if past is not None else getattr(out, "cache", None)


@torch.no_grad()
def _step(
    model: LoadedModel, tset: TranscoderSet, token: int, past: Any, steps: list[Intervention]
) -> tuple[Tensor, Any]:
    """One generated token: open-ended interventions, iterative, live attention."""
    patcher = _Patcher(tset, steps, 1, None, None, 0, True)
    with _hooks(_patch_handles(model, tset, patcher)):
        ids = torch.tensor([[token]], device=model.device)
        out = model.hf(input_ids=ids, use_cache=True, **{_past_kwarg(model.hf): past})
    return out.logits[0, -1].float(), _past_of(out)


def generate(
    model: LoadedModel,
    tset: TranscoderSet,
    inputs: ModelInputs,
    edits: Sequence[FeatureEdit | Intervention],
    n_tokens: int,
    *,
    constrained: range | None = None,
    freeze_attention: bool = True,
    clean: CleanRun | None = None,
) -> InterventionResult:
    """:func:`feature_intervention` on the prompt, then ``n_tokens`` greedy tokens (stopping
    after an end-of-sequence token) with the open-ended interventions applied to each."""
    if n_tokens < 1:
        raise InputError(f"generate needs at least one token, got {n_tokens}")
    p = _prompt_pass(model, tset, inputs, edits, clean, constrained, freeze_attention, True, True)
    rows, tokens, past = [p.logits[-1]], [int(p.logits[-1].argmax())], p.past
    steps, eos = open_ended(p.interventions), _eos_ids(model)
    while len(tokens) < n_tokens and tokens[-1] not in eos:
        row, past = _step(model, tset, tokens[-1], past, steps)
        rows.append(row)
        tokens.append(int(row.argmax()))
    ids = torch.tensor(tokens, dtype=torch.long)
    return _result(
        model,
        p,
        generated_ids=ids,
        generated_logits=torch.stack(rows),
        generated_text=model.tokenizer.decode(tokens),
    )
