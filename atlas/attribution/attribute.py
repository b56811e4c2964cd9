"""``attribute()``: the attribution graph of one prompt (circuit-tracer's semantics, our code).

Phases: (0) model inputs (an image prompt: the processor), one real forward pass, active
features / errors / token vectors, and an image's attention rollout; (1) logit targets; (2) one
frozen forward pass (batch 1; each backward carries ``batch`` cotangents); (3) logit rows; (4)
feature rows: all features in (layer, pos, feature) order (:func:`_full_rows`), or with
``max_feature_nodes`` the most influential ones, re-ranked every ``update_interval`` batches from
the rows computed so far (:func:`_ranked_rows`); (5) packaging into the dense reference layout
(:class:`AttributionResult`). Phase times are logged at debug level and kept in
``AttributionResult.stats``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from atlas.attribution.context import (
    Precomputed,
    ReplacementContext,
    build_blocks,
    precompute,
)
from atlas.attribution.pruning import DEFAULT_BLOCK_ROWS
from atlas.attribution.result import AttributionResult, ImageAttribution
from atlas.attribution.rollout import RolloutParams
from atlas.errors import AttributionError, InputError, OutOfMemory
from atlas.graph import AttributionSettings
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel
from atlas.models.vision import ImageSource, image_label, image_rollout, image_settings
from atlas.transcoders.loading import TranscoderSet

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, int], None]
"""``progress(rows_done, rows_total)``, called after every backward batch."""


def select_logits(
    logits: torch.Tensor,
    unembed: torch.Tensor,
    *,
    max_n_logits: int,
    desired_logit_prob: float,
    explicit: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(token_ids, probabilities, demeaned unembedding rows)`` of the logit targets.

    Without ``explicit``: the smallest top-probability prefix whose mass reaches
    ``desired_logit_prob``, at most ``max_n_logits`` long. ``unembed`` is ``(vocab, d_model)``.
    """
    probs = torch.softmax(logits.float(), dim=-1)
    vocab = probs.shape[0]
    if explicit:
        ids = torch.tensor(explicit, dtype=torch.long, device=probs.device)
        if int(ids.min()) < 0 or int(ids.max()) >= vocab:
            raise InputError(f"explicit logit tokens must lie in [0, {vocab})")
    else:
        if max_n_logits < 1:
            raise InputError("max_n_logits must be at least 1")
        top_p, top_i = torch.topk(probs, min(max_n_logits, vocab))
        cutoff = int(torch.searchsorted(torch.cumsum(top_p, 0), desired_logit_prob)) + 1
        ids = top_i[:cutoff]
    rows = unembed[ids] - unembed.mean(dim=0, keepdim=True)
    return ids, probs[ids], rows


def _batch_cap(
    model: LoadedModel, n_pos: int, n_nodes: int, batch_size: int, memory_limit: int | None
) -> int:
    """Largest batch that keeps the estimated peak under ``memory_limit`` bytes."""
    if memory_limit is None:
        return batch_size
    cfg = model.text_config
    d = model.d_model
    d_mlp = int(getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or 4 * d)
    heads = int(getattr(cfg, "num_attention_heads", None) or cfg.n_head)
    elem = torch.finfo(model.dtype).bits // 8
    per_example = model.n_layers * n_pos * (24 * d + 4 * d_mlp + 3 * heads * n_pos) * elem
    fixed = 4 * n_nodes * n_nodes + 12 * DEFAULT_BLOCK_ROWS * n_nodes
    room = memory_limit - fixed
    if room < per_example:
        raise AttributionError(
            f"memory limit {memory_limit / 2**20:.0f} MiB is below the estimated minimum "
            f"{(fixed + per_example) / 2**20:.0f} MiB for {n_nodes} nodes"
        )
    return max(1, min(batch_size, room // per_example))


@dataclass
class _Plan:
    """Everything the row computation needs, fixed before the first backward pass."""

    model: LoadedModel
    transcoders: TranscoderSet
    pre: Precomputed
    logit_ids: torch.Tensor
    logit_probs: torch.Tensor
    logit_vecs: torch.Tensor
    n_select: int
    batch: int
    update_interval: int
    progress: ProgressFn | None
    done: int = 0

    @property
    def n_active(self) -> int:
        return int(self.pre.active.shape[0])

    @property
    def n_logits(self) -> int:
        return int(self.logit_ids.shape[0])

    @property
    def n_pos(self) -> int:
        return self.pre.inputs.n_pos

    @property
    def n_cols(self) -> int:
        """Source columns: features, errors, tokens (logits are never sources)."""
        return self.n_active + (self.model.n_layers + 1) * self.n_pos

    @property
    def n_nodes(self) -> int:
        return self.n_select + (self.model.n_layers + 1) * self.n_pos + self.n_logits

    def tick(self, n: int) -> None:
        self.done += n
        if self.progress is not None:
            self.progress(self.done, self.n_logits + self.n_select)


@contextlib.contextmanager
def _phase(name: str, stats: dict[str, float]) -> Iterator[None]:
    """Time one phase of the computation: logged at debug level and kept in ``stats``."""
    t0 = time.perf_counter()
    yield
    stats[f"{name}_s"] = elapsed = time.perf_counter() - t0
    log.debug("%s: %.2f s", name, elapsed)


def attribute(
    prompt: str | torch.Tensor | list[int] | ModelInputs,
    model: LoadedModel,
    transcoders: TranscoderSet,
    *,
    image: ImageSource | None = None,
    rollout: RolloutParams | bool = True,
    settings: AttributionSettings | None = None,
    max_n_logits: int | None = None,
    desired_logit_prob: float | None = None,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    explicit_logit_tokens: list[int] | None = None,
    max_seq_len: int | None = None,
    progress: ProgressFn | None = None,
    memory_limit_bytes: int | None = None,
    update_interval: int = 4,
) -> AttributionResult:
    """Compute the attribution graph of ``prompt`` (see :class:`AttributionResult` for layout).

    The knobs that change the graph come from ``settings`` (default:
    :class:`~atlas.graph.AttributionSettings`'s defaults); ``max_n_logits``,
    ``desired_logit_prob``, ``max_feature_nodes`` and ``explicit_logit_tokens`` replace the
    field of the same name when given (``None``: not given). The result records the settings,
    thresholds included, so :meth:`AttributionResult.to_graph` prunes with them by default.

    ``batch_size`` targets share one backward pass; ``memory_limit_bytes`` caps it so that the
    estimated peak (adjacency + frozen activations) stays below the limit. ``max_seq_len``
    (default: the model's maximum positions) bounds the prompt length, image tokens included.
    Device and dtype are the model's (see :func:`atlas.models.load_model`); transcoders must
    match them.

    ``image`` (a path, the file's bytes or a :class:`~atlas.images.LoadedImage`; vision-language
    models only) joins the prompt as the processor places it (the prompt's own placeholder, else
    before the text). Its soft tokens are positions like any other: an embedding node each (the
    projector's output row, read at the first layer's input), features and error nodes; on
    Gemma-3 the image block's bidirectional attention is frozen too. The result's
    :attr:`~AttributionResult.image` then holds the image's provenance, positions and grid, and,
    unless ``rollout`` is ``False``, the attention-rollout maps of its soft tokens (``rollout``:
    ``True`` for the paper's settings, or :class:`RolloutParams`).
    """
    knobs = AttributionSettings.merged(
        settings,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        max_feature_nodes=max_feature_nodes,
        explicit_logit_tokens=explicit_logit_tokens,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    # Denormal floats (tiny attention probabilities times gradients) slow CPU matmuls ~5x;
    # flushing them to zero changes nothing at the precision graphs are stored in.
    flush_was_set = model.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        return _attribute(
            prompt,
            model,
            transcoders,
            knobs,
            image=image,
            rollout=rollout,
            batch_size=batch_size,
            max_seq_len=max_seq_len,
            progress=progress,
            memory_limit_bytes=memory_limit_bytes,
            update_interval=update_interval,
        )
    finally:
        if flush_was_set:
            torch.set_flush_denormal(False)


def _model_inputs(
    prompt: str | torch.Tensor | list[int] | ModelInputs,
    model: LoadedModel,
    transcoders: TranscoderSet,
    max_seq_len: int | None,
    image: ImageSource | None = None,
) -> ModelInputs:
    """The prompt as model inputs, refused early when it cannot be attributed."""
    if transcoders.n_layers != model.n_layers or transcoders.d_model != model.d_model:
        raise InputError("transcoders do not match the model (layers or d_model)")
    inputs = model.inputs(prompt, image)
    limit = max_seq_len or model.max_positions
    if limit is not None and inputs.n_pos > limit:
        n_image = inputs.n_image_tokens
        with_image = f" ({n_image} of them image tokens)" if n_image else ""
        named = f"{image_label(image)}: " if image is not None else ""
        raise InputError(
            f"{named}prompt has {inputs.n_pos} tokens{with_image}, more than the limit of {limit}"
        )
    return inputs


def _image_part(
    model: LoadedModel, inputs: ModelInputs, rollout: RolloutParams | bool
) -> ImageAttribution | None:
    """The image's provenance, positions, grid and (optionally) rollout maps."""
    if inputs.image_positions is None or inputs.image_grid is None:
        return None
    maps = None
    if rollout is not False:
        maps = image_rollout(model, inputs, None if rollout is True else rollout)
    return ImageAttribution(
        info=inputs.image,
        positions=inputs.image_positions.cpu(),
        grid=inputs.image_grid.cpu(),
        settings=image_settings(model),
        rollout=maps,
    )


def _attribute(
    prompt: str | torch.Tensor | list[int] | ModelInputs,
    model: LoadedModel,
    transcoders: TranscoderSet,
    knobs: AttributionSettings,
    *,
    image: ImageSource | None,
    rollout: RolloutParams | bool,
    batch_size: int,
    max_seq_len: int | None,
    progress: ProgressFn | None,
    memory_limit_bytes: int | None,
    update_interval: int,
) -> AttributionResult:
    t0 = time.perf_counter()
    stats: dict[str, float] = {}
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    max_feature_nodes = knobs.max_feature_nodes
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise InputError("max_feature_nodes must be non-negative")
    inputs = _model_inputs(prompt, model, transcoders, max_seq_len, image)

    with _phase("precompute", stats):
        pre: Precomputed = precompute(model, transcoders, inputs)
    image_part = None
    if inputs.n_image_tokens:
        with _phase("rollout", stats):
            image_part = _image_part(model, inputs, rollout)
    n_active = int(pre.active.shape[0])
    unembed = model.adapter.unembed_weight(model.hf).detach()
    logit_ids, logit_probs, logit_vecs = select_logits(
        pre.logits,
        unembed,
        max_n_logits=knobs.max_n_logits,
        desired_logit_prob=knobs.desired_logit_prob,
        explicit=knobs.explicit_logit_tokens,
    )
    n_select = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    n_nodes = n_select + (model.n_layers + 1) * inputs.n_pos + int(logit_ids.shape[0])
    batch = _batch_cap(model, inputs.n_pos, n_nodes, batch_size, memory_limit_bytes)
    plan = _Plan(
        model,
        transcoders,
        pre,
        logit_ids,
        logit_probs,
        logit_vecs,
        n_select,
        batch,
        update_interval,
        progress,
    )
    log.info(
        "%d tokens, %d active features, %d selected, %d logits, batch %d",
        inputs.n_pos,
        n_active,
        n_select,
        plan.n_logits,
        batch,
    )
    t_setup = time.perf_counter() - t0
    try:
        if n_select == n_active:
            with _phase("feature_rows", stats):
                adjacency = _full_rows(plan)
            selected = torch.arange(n_active)
        else:
            with _phase("ranked_rows", stats):
                adjacency, selected = _ranked_rows(plan)
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(f"out of memory during attribution: {exc}") from exc

    tok = model.tokenizer
    input_ids = inputs.input_ids
    tokens = [tok.decode([int(t)]) for t in input_ids.tolist()]
    prompt_text = prompt if isinstance(prompt, str) else tok.decode(input_ids.tolist())
    stats.update(setup_s=t_setup, batch=float(batch), n_active=float(n_active))
    return AttributionResult(
        prompt=prompt_text,
        tokens=tokens,
        input_ids=input_ids.cpu(),
        active_features=pre.active.cpu(),
        activation_values=pre.values.float().cpu(),
        selected_features=selected,
        logit_tokens=logit_ids.cpu(),
        logit_probabilities=logit_probs.float().cpu(),
        adjacency=adjacency,
        model=model.info,
        transcoders=transcoders.info,
        settings=knobs,
        elapsed_s=time.perf_counter() - t0,
        stats=stats,
        image=image_part,
    )


def _full_rows(plan: _Plan) -> torch.Tensor:
    """Every feature and logit row, written straight into the final ``(N, N)`` adjacency.

    No second N x N buffer: each target knows its destination row. Targets are bucketed by the
    prefix of positions they depend on, so each bucket's frozen pass is as short as it can be.
    """
    pre, k, n_layers = plan.pre, plan.n_logits, plan.model.n_layers
    n_active, n_nodes, n_pos = plan.n_active, plan.n_nodes, plan.n_pos
    dev = plan.model.device
    adjacency = torch.zeros(n_nodes, n_nodes, dtype=torch.float32, device=dev)
    w_enc_rows = _encoder_rows(plan.transcoders, pre.active)
    blocks = build_blocks(plan.model, plan.transcoders, pre)
    # every target as (layer, pos, vector, destination row); logits at the last position
    t_layer = torch.cat([pre.active[:, 0].cpu(), torch.full((k,), n_layers)])
    t_pos = torch.cat([pre.active[:, 1].cpu(), torch.full((k,), n_pos - 1)])
    t_dest = torch.arange(n_active + k)
    t_dest[n_active:] = n_nodes - k + torch.arange(k)
    t_vec = torch.cat([w_enc_rows, plan.logit_vecs.to(w_enc_rows.dtype)])
    for prefix, order in _position_buckets(t_pos, t_layer, plan.batch, pre.inputs):
        with ReplacementContext(
            plan.model, plan.transcoders, pre, batch=plan.batch, prefix=prefix, blocks=blocks
        ) as ctx:
            for s in range(0, order.shape[0], plan.batch):
                idx = order[s : s + plan.batch]
                rows = ctx.rows(t_layer[idx], t_pos[idx], t_vec[idx])
                adjacency[t_dest[idx].to(dev), : plan.n_cols] = rows
                plan.tick(int(idx.shape[0]))
    return adjacency


@dataclass
class _RowChunk:
    """One backward batch of ranked rows, kept only as wide as it can be non-zero.

    Active features are sorted by layer, and a row whose target sits at layer ``l`` has no source
    at layer ``>= l``: its feature columns past the first layer-``l`` feature are exact zeros and
    are not stored. ``tail`` holds the error and token columns.
    """

    feat: torch.Tensor
    tail: torch.Tensor
    first_row: int
    norm: torch.Tensor
    filled: int = 0
    """Visited-feature columns of the ranking matrix already written from this chunk."""

    @property
    def n_rows(self) -> int:
        return int(self.feat.shape[0])


class _RankedRows:
    """The rows computed so far, streamed: per-batch chunks, no ``(rows, n_cols)`` copies.

    Row ``r`` is logit ``r`` for ``r < k``, else the ``r - k``-th visited feature. The reference's
    influence ranking, ``sum_t prod_t @ A_norm`` with ``prod_{t+1} = prod_t[rows] @ A_norm``, only
    ever reads ``A_norm`` at the visited features' columns between iterations, so the iterations
    run on that ``(rows, visited)`` block (at most ``(k + n_select) x n_select``) and the full rows
    are read once per re-ranking, one chunk at a time.
    """

    def __init__(self, plan: _Plan) -> None:
        self.plan = plan
        k, n_select = plan.n_logits, plan.n_select
        dev = plan.model.device
        self.chunks: list[_RowChunk] = []
        self.n_rows = 0
        self.visit_order: list[torch.Tensor] = []
        self.block = torch.zeros(k + n_select, n_select, dtype=torch.float32, device=dev)
        self.tail_width = plan.n_cols - plan.n_active
        layers = plan.pre.active[:, 0].cpu().contiguous()
        self.layer_start = torch.searchsorted(layers, torch.arange(plan.model.n_layers + 1))

    @property
    def n_visited(self) -> int:
        return self.n_rows - self.plan.n_logits

    def add(self, rows: torch.Tensor, top_layer: int, features: torch.Tensor | None) -> None:
        """Keep one batch of rows (targets at layers ``<= top_layer``; ``features`` for feature
        rows, in row order, ``None`` for logit rows)."""
        width = int(self.layer_start[top_layer])
        n_active = self.plan.n_active
        norm = rows.abs().sum(dim=1).clamp(min=1e-8)
        chunk = _RowChunk(rows[:, :width].clone(), rows[:, n_active:].clone(), self.n_rows, norm)
        self.chunks.append(chunk)
        self.n_rows += chunk.n_rows
        if features is not None:
            self.visit_order.append(features)

    def influence(self) -> torch.Tensor:
        """``(n_active,)`` influence of every active feature given the rows so far."""
        plan = self.plan
        k, dev = plan.n_logits, plan.model.device
        visited = torch.cat(self.visit_order).to(dev) if self.visit_order else None
        nv = self.n_visited
        for c in self.chunks:
            if visited is not None and c.filled < nv:
                cols = visited[c.filled : nv]
                width = int(c.feat.shape[1])
                inside = cols < width
                vals = c.feat[:, cols.clamp(max=max(width - 1, 0))].abs() if width else None
                part = torch.zeros(c.n_rows, cols.shape[0], device=dev)
                if vals is not None:
                    part = torch.where(inside, vals, part)
                rows = slice(c.first_row, c.first_row + c.n_rows)
                self.block[rows, c.filled : nv] = part / c.norm[:, None]
                c.filled = nv
        q = torch.zeros(self.n_rows, device=dev)
        q[:k] = plan.logit_probs.to(dev).float()
        weight = q.clone()
        block = self.block[: self.n_rows, :nv]
        for _ in range(128):
            nxt = torch.zeros_like(q)
            nxt[k:] = q @ block
            q = nxt
            if not bool(q.any()):
                break
            weight += q
        else:
            raise AttributionError("feature influence ranking did not converge")
        infl = torch.zeros(plan.n_active, device=dev)
        for c in self.chunks:
            width = int(c.feat.shape[1])
            if width:
                w = weight[c.first_row : c.first_row + c.n_rows]
                infl[:width] += w @ (c.feat.abs() / c.norm[:, None])
        return infl

    def adjacency(self, selected: torch.Tensor) -> torch.Tensor:
        """The ``(N, N)`` adjacency: selected features' rows in node order, their columns kept,
        unselected features' columns dropped; each chunk is freed once written."""
        plan = self.plan
        k, n_select, n_nodes = plan.n_logits, plan.n_select, plan.n_nodes
        dev = plan.model.device
        adjacency = torch.empty(n_nodes, n_nodes, dtype=torch.float32, device=dev)
        slot = torch.full((plan.n_active,), -1, dtype=torch.long)
        slot[selected] = torch.arange(n_select)
        order = (
            torch.cat(self.visit_order) if self.visit_order else torch.zeros(0, dtype=torch.long)
        )
        dest_of_row = torch.cat([n_nodes - k + torch.arange(k), slot[order]]).to(dev)
        sel_dev = selected.to(dev)
        tail_end = n_select + self.tail_width
        while self.chunks:
            c = self.chunks.pop(0)
            dest = dest_of_row[c.first_row : c.first_row + c.n_rows]
            m = int(torch.searchsorted(selected, int(c.feat.shape[1])))
            out = torch.zeros(c.n_rows, n_nodes, dtype=torch.float32, device=dev)
            out[:, :m] = c.feat[:, sel_dev[:m]]
            out[:, n_select:tail_end] = c.tail
            adjacency[dest] = out
            del c, out
        adjacency[n_select : n_nodes - k] = 0
        return adjacency


def _ranked_rows(plan: _Plan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(adjacency, selected)`` with only the ``n_select`` most influential features as rows.

    Logit rows first; then features in order of their influence estimated from the rows so
    far, re-ranked every ``update_interval`` batches (the reference's ranking). The rows are
    kept in per-batch chunks (:class:`_RankedRows`); peak memory is those rows plus one batch.
    """
    pre, k, n_layers = plan.pre, plan.n_logits, plan.model.n_layers
    n_active, n_select, batch = plan.n_active, plan.n_select, plan.batch
    feat_layers = pre.active[:, 0].cpu()
    feat_pos = pre.active[:, 1].cpu()
    w_enc_rows = _encoder_rows(plan.transcoders, pre.active)
    kept = _RankedRows(plan)
    visited = torch.zeros(n_active, dtype=torch.bool)
    with ReplacementContext(plan.model, plan.transcoders, pre, batch=batch) as ctx:
        for i in range(0, k, batch):
            j = min(i + batch, k)
            rows = ctx.rows(
                torch.full((j - i,), n_layers),
                torch.full((j - i,), plan.n_pos - 1),
                plan.logit_vecs[i:j],
            )
            kept.add(rows, n_layers, None)
            del rows
            plan.tick(j - i)
        while kept.n_visited < n_select:
            infl = kept.influence()
            rank = torch.argsort(infl.cpu(), descending=True)
            queue = min(plan.update_interval * batch, n_select - kept.n_visited)
            pending = rank[~visited[rank]][:queue]
            # same set of rows, shallower backward passes: visit by layer
            pending = pending[torch.argsort(feat_layers[pending], stable=True)]
            for s in range(0, pending.shape[0], batch):
                idx = pending[s : s + batch]
                rows = ctx.rows(feat_layers[idx], feat_pos[idx], w_enc_rows[idx])
                kept.add(rows, int(feat_layers[idx].max()), idx)
                del rows
                visited[idx] = True
                plan.tick(int(idx.shape[0]))
    selected = torch.nonzero(visited).flatten()
    return kept.adjacency(selected), selected


def _encoder_rows(tset: TranscoderSet, active: torch.Tensor) -> torch.Tensor:
    """``(n_active, d_model)`` encoder row (target vector) of every active feature."""
    out = torch.empty(active.shape[0], tset.d_model, dtype=tset.w_enc[0].dtype)
    layers = active[:, 0].cpu()
    for layer in range(tset.n_layers):
        sel = torch.nonzero(layers == layer).flatten()
        if sel.numel():
            out[sel] = tset.w_enc[layer][active[sel, 2].to(tset.w_enc[layer].device)].cpu()
    return out


def _position_buckets(
    pos: torch.Tensor,
    layer: torch.Tensor,
    batch: int,
    inputs: ModelInputs,
    min_batches: int = 12,
) -> list[tuple[int, torch.Tensor]]:
    """Targets grouped into prefix buckets: ``[(prefix_len, target indices), ...]``.

    A target at position ``p`` only needs the first ``inputs.prefix_for(p)`` positions (``<= p``
    under causal attention), so each bucket runs on the shortest prefix covering it. Buckets are
    consecutive position ranges holding at least
    ``min_batches`` batches (fewer frozen forward passes); inside, targets are ordered by
    (layer, position) so a batch's backward stops at the lowest possible layer.
    """
    order = torch.argsort(pos * 1_000_003 + layer, stable=True)
    sorted_pos = pos[order]
    buckets: list[tuple[int, torch.Tensor]] = []
    start = 0
    n = int(order.shape[0])
    while start < n:
        end = min(start + min_batches * batch, n)
        # extend to the end of the position run so a position is never split
        last = int(sorted_pos[end - 1])
        while end < n and int(sorted_pos[end]) == last:
            end += 1
        idx = order[start:end]
        sub = torch.argsort(layer[idx] * 1_000_003 + pos[idx], stable=True)
        buckets.append((inputs.prefix_for(last), idx[sub]))
        start = end
    return buckets
