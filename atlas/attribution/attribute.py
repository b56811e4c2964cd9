"""``attribute()``: the attribution graph of one prompt (circuit-tracer's semantics, our code).

Phases: (0) tokenize, one real forward pass, active features / errors / token vectors;
(1) logit targets; (2) one frozen forward pass on ``batch`` copies; (3) logit rows; (4) feature
rows, all features in (layer, pos, feature) order, or with ``max_feature_nodes`` the most
influential ones, re-ranked every ``update_interval`` batches from the rows computed so far;
(5) packaging into the dense reference layout (:class:`AttributionResult`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from atlas.attribution.context import (
    Precomputed,
    ReplacementContext,
    build_blocks,
    precompute,
)
from atlas.attribution.pruning import DEFAULT_BLOCK_ROWS
from atlas.attribution.result import AttributionResult
from atlas.errors import AttributionError, InputError, OutOfMemory
from atlas.graph import AttributionSettings
from atlas.models.loading import LoadedModel
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
    cfg = model.hf.config
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


def attribute(
    prompt: str | torch.Tensor | list[int],
    model: LoadedModel,
    transcoders: TranscoderSet,
    *,
    max_n_logits: int = 10,
    desired_logit_prob: float = 0.95,
    max_feature_nodes: int | None = None,
    batch_size: int = 64,
    explicit_logit_tokens: list[int] | None = None,
    max_seq_len: int | None = None,
    progress: ProgressFn | None = None,
    memory_limit_bytes: int | None = None,
    update_interval: int = 4,
) -> AttributionResult:
    """Compute the attribution graph of ``prompt`` (see :class:`AttributionResult` for layout).

    ``batch_size`` targets share one backward pass; ``memory_limit_bytes`` caps it so that the
    estimated peak (adjacency + frozen activations) stays below the limit. ``max_seq_len``
    (default: the model's maximum positions) bounds the prompt length. Device and dtype are the
    model's (see :func:`atlas.models.load_model`); transcoders must match them.
    """
    # Denormal floats (tiny attention probabilities times gradients) slow CPU matmuls ~5x;
    # flushing them to zero changes nothing at the precision graphs are stored in.
    flush_was_set = model.device.type == "cpu" and torch.set_flush_denormal(True)
    try:
        return _attribute(
            prompt,
            model,
            transcoders,
            max_n_logits=max_n_logits,
            desired_logit_prob=desired_logit_prob,
            max_feature_nodes=max_feature_nodes,
            batch_size=batch_size,
            explicit_logit_tokens=explicit_logit_tokens,
            max_seq_len=max_seq_len,
            progress=progress,
            memory_limit_bytes=memory_limit_bytes,
            update_interval=update_interval,
        )
    finally:
        if flush_was_set:
            torch.set_flush_denormal(False)


def _attribute(
    prompt: str | torch.Tensor | list[int],
    model: LoadedModel,
    transcoders: TranscoderSet,
    *,
    max_n_logits: int,
    desired_logit_prob: float,
    max_feature_nodes: int | None,
    batch_size: int,
    explicit_logit_tokens: list[int] | None,
    max_seq_len: int | None,
    progress: ProgressFn | None,
    memory_limit_bytes: int | None,
    update_interval: int,
) -> AttributionResult:
    t0 = time.perf_counter()
    if batch_size < 1:
        raise InputError("batch_size must be at least 1")
    if max_feature_nodes is not None and max_feature_nodes < 0:
        raise InputError("max_feature_nodes must be non-negative")
    if transcoders.n_layers != model.n_layers or transcoders.d_model != model.d_model:
        raise InputError("transcoders do not match the model (layers or d_model)")
    input_ids = model.to_input_ids(prompt)
    limit = max_seq_len or model.max_positions
    if limit is not None and input_ids.shape[0] > limit:
        raise InputError(f"prompt has {input_ids.shape[0]} tokens, more than the limit of {limit}")
    n_layers, n_pos = model.n_layers, int(input_ids.shape[0])

    pre: Precomputed = precompute(model, transcoders, input_ids)
    n_active = int(pre.active.shape[0])
    unembed = model.adapter.unembed_weight(model.hf).detach()
    logit_ids, logit_probs, logit_vecs = select_logits(
        pre.logits,
        unembed,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        explicit=explicit_logit_tokens,
    )
    k = int(logit_ids.shape[0])
    n_select = n_active if max_feature_nodes is None else min(max_feature_nodes, n_active)
    n_nonfeat = (n_layers + 1) * n_pos
    n_nodes = n_select + n_nonfeat + k
    batch = _batch_cap(model, n_pos, n_nodes, batch_size, memory_limit_bytes)
    log.info(
        "%d tokens, %d active features, %d selected, %d logits, batch %d",
        n_pos,
        n_active,
        n_select,
        k,
        batch,
    )
    dev = model.device
    total_rows = k + n_select
    done = 0
    t_setup = time.perf_counter() - t0

    def tick(n: int) -> None:
        nonlocal done
        done += n
        if progress is not None:
            progress(done, total_rows)

    feat_layers = pre.active[:, 0].cpu()
    feat_pos = pre.active[:, 1].cpu()
    w_enc_rows = _encoder_rows(transcoders, pre.active)
    blocks = build_blocks(model, transcoders, pre)
    full = n_select == n_active
    n_cols = n_active + n_nonfeat
    visited = torch.zeros(n_active, dtype=torch.bool)
    try:
        if full:
            # rows go straight into the final adjacency: no second N x N buffer
            adjacency = torch.zeros(n_nodes, n_nodes, dtype=torch.float32, device=dev)
            # every target as (layer, pos, vector, destination row); logits at the last position
            t_layer = torch.cat([feat_layers, torch.full((k,), n_layers)])
            t_pos = torch.cat([feat_pos, torch.full((k,), n_pos - 1)])
            t_dest = torch.arange(n_active + k)
            t_dest[n_active:] = n_nodes - k + torch.arange(k)
            t_vec = torch.cat([w_enc_rows, logit_vecs.to(w_enc_rows.dtype)])
            for prefix, order in _position_buckets(t_pos, t_layer, batch):
                with ReplacementContext(
                    model, transcoders, pre, batch=batch, prefix=prefix, blocks=blocks
                ) as ctx:
                    for s in range(0, order.shape[0], batch):
                        idx = order[s : s + batch]
                        rows = ctx.rows(t_layer[idx], t_pos[idx], t_vec[idx])
                        adjacency[t_dest[idx].to(dev), :n_cols] = rows
                        tick(int(idx.shape[0]))
            visited[:] = True
        else:
            work = torch.zeros(k + n_select, n_cols, dtype=torch.float32, device=dev)
            row_node = torch.zeros(k + n_select, dtype=torch.long)
            with ReplacementContext(model, transcoders, pre, batch=batch, blocks=blocks) as ctx:
                for i in range(0, k, batch):
                    j = min(i + batch, k)
                    work[i:j] = ctx.rows(
                        torch.full((j - i,), n_layers),
                        torch.full((j - i,), n_pos - 1),
                        logit_vecs[i:j],
                    )
                    row_node[i:j] = n_cols + torch.arange(i, j)
                    tick(j - i)
                n_visited, st = 0, k
                while n_visited < n_select:
                    infl = _partial_influence(work[:st], logit_probs, row_node[:st], n_cols + k)
                    rank = torch.argsort(infl[:n_active].cpu(), descending=True)
                    queue = min(update_interval * batch, n_select - n_visited)
                    pending = rank[~visited[rank]][:queue]
                    # same set of rows, shallower backward passes: visit by layer
                    pending = pending[torch.argsort(feat_layers[pending], stable=True)]
                    for s in range(0, pending.shape[0], batch):
                        idx = pending[s : s + batch]
                        rows = ctx.rows(feat_layers[idx], feat_pos[idx], w_enc_rows[idx])
                        work[st : st + idx.shape[0]] = rows
                        row_node[st : st + idx.shape[0]] = idx
                        st += idx.shape[0]
                        visited[idx] = True
                        n_visited += int(idx.shape[0])
                        tick(int(idx.shape[0]))
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(f"out of memory during attribution: {exc}") from exc

    selected = torch.nonzero(visited).flatten()
    if not full:
        adjacency = torch.zeros(n_nodes, n_nodes, dtype=torch.float32, device=dev)
        col_read = torch.cat([selected, torch.arange(n_active, n_cols)]).to(dev)
        # feature rows: row of node r sits at work position where row_node == r
        where = torch.full((n_active,), -1, dtype=torch.long)
        feat_rows = torch.arange(k, k + n_select)
        where[row_node[k : k + n_select]] = feat_rows
        src_rows = where[selected].to(dev)
        for i in range(0, n_select, DEFAULT_BLOCK_ROWS):
            blk = src_rows[i : i + DEFAULT_BLOCK_ROWS]
            adjacency[i : i + blk.shape[0], : col_read.shape[0]] = work[blk][:, col_read]
        adjacency[n_nodes - k :, : col_read.shape[0]] = work[:k][:, col_read]
        del work

    tok = model.tokenizer
    tokens = [tok.decode([int(t)]) for t in input_ids.tolist()]
    prompt_text = prompt if isinstance(prompt, str) else tok.decode(input_ids.tolist())
    settings = AttributionSettings(
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        max_feature_nodes=max_feature_nodes,
        explicit_logit_tokens=explicit_logit_tokens,
        dtype=str(model.dtype).removeprefix("torch."),
    )
    elapsed = time.perf_counter() - t0
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
        settings=settings,
        elapsed_s=elapsed,
        stats={"setup_s": t_setup, "batch": float(batch), "n_active": float(n_active)},
    )


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
    pos: torch.Tensor, layer: torch.Tensor, batch: int, min_batches: int = 12
) -> list[tuple[int, torch.Tensor]]:
    """Targets grouped into causal-prefix buckets: ``[(prefix_len, target indices), ...]``.

    A target at position ``p`` only needs positions ``<= p``, so each bucket runs on the
    shortest prefix covering it. Buckets are consecutive position ranges holding at least
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
        buckets.append((last + 1, idx[sub]))
        start = end
    return buckets


def _partial_influence(
    rows: torch.Tensor, logit_p: torch.Tensor, row_node: torch.Tensor, n_total: int
) -> torch.Tensor:
    """Influence of every column node given the rows computed so far (reference's ranking)."""
    a = rows.abs()
    a /= a.sum(dim=1, keepdim=True).clamp(min=1e-8)
    influence = torch.zeros(n_total, device=rows.device)
    prod = torch.zeros(n_total, device=rows.device)
    prod[n_total - logit_p.shape[0] :] = logit_p.to(rows.device)
    for _ in range(128):
        nxt = torch.zeros(n_total, device=rows.device)
        nxt[: a.shape[1]] = prod[row_node.to(rows.device)] @ a
        prod = nxt
        if not bool(prod.any()):
            return influence
        influence += prod
    raise AttributionError("feature influence ranking did not converge")
