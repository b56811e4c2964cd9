"""Influence, pruning and graph scores on a dense adjacency, without copying it.

Definitions (circuit-tracer's): ``Â = |A|`` with each row normalised to sum 1 (rows with no
input stay 0); ``w`` = logit probabilities on the logit rows, 0 elsewhere; node influence
``I = w Â + w Â² + ...`` (the graph is a DAG, so the series ends after at most depth terms and is
computed by iterating ``x <- x Â`` until ``x`` is exactly zero).

Pruning: keep feature/error nodes whose influence is within the top ``node_threshold`` (0.8) of
cumulative influence; tokens and logits are always kept. On the graph restricted to kept nodes,
recompute influence ``I'`` and the edge scores ``S[t, s] = Â'[t, s] (I'[t] + w[t])``; keep the edges
within the top ``edge_threshold`` (0.98) of cumulative edge score; then repeatedly drop
feature/error nodes without a kept outgoing edge and features without a kept incoming edge.

Scores: replacement = token influence / (token + error influence); completeness = the
``(I + w)``-weighted mean over rows of ``1 - (share of the row's normalised input from errors)``.

Memory: the adjacency ``A`` (``N x N`` float32, ``4 N²`` bytes) is never copied, normalised in
place or sorted. Every pass streams row blocks of ``B = block_rows`` rows, so the peak extra memory
is ``O(B·N)`` floats for the block's ``|A|`` (plus its mask / bins, ``~3 x 4·B·N`` bytes), ``O(N)``
vectors, and the kept edges' index list (``16 bytes x n_kept_edges``) plus the scores inside one
histogram bin of the edge threshold search (a tiny fraction of the edges). So:

    peak ≈ 4·N² (the adjacency itself) + 12·B·N + 16·E_kept + O(N)   bytes.

The edge threshold (the score at which cumulative sorted score first reaches the threshold) is
found exactly without sorting all N² scores: one streamed pass builds a score-weighted histogram
over ``log2(score)`` bins, a second pass collects only the scores falling into the bin where the
cumulative sum crosses the threshold, and those few are sorted.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

DEFAULT_BLOCK_ROWS = 1024
_N_BINS = 1 << 14


class PruneResult(NamedTuple):
    """Result of :func:`prune`.

    node_mask        (N,) bool    nodes kept
    edge_index       (2, E) int64 kept edges as (target, source) rows, both ends kept, A != 0
    cumulative_scores (N,) float32 cumulative influence share of each node (rank order)
    node_influence   (N,) float32 influence of each node on the logits (unpruned graph)
    """

    node_mask: torch.Tensor
    edge_index: torch.Tensor
    cumulative_scores: torch.Tensor
    node_influence: torch.Tensor


def _blocks(n: int, block: int) -> range:
    return range(0, n, block)


def row_sums(
    adj: torch.Tensor, col_mask: torch.Tensor | None = None, block: int = DEFAULT_BLOCK_ROWS
) -> torch.Tensor:
    """``sum_s |A[t, s]|`` (optionally over masked columns only), streamed."""
    n = adj.shape[0]
    out = torch.empty(n, dtype=torch.float32, device=adj.device)
    for i in _blocks(n, block):
        a = adj[i : i + block].abs()
        if col_mask is not None:
            a *= col_mask
        out[i : i + block] = a.sum(1, dtype=torch.float32)
    return out


def _vec_times_norm(
    x: torch.Tensor,
    adj: torch.Tensor,
    inv_rs: torch.Tensor,
    col_mask: torch.Tensor | None,
    block: int,
) -> torch.Tensor:
    """``x @ Â`` with ``Â = diag(inv_rs) |A| (col_mask)``, streaming row blocks."""
    y = torch.zeros(adj.shape[1], dtype=torch.float32, device=adj.device)
    xw = x * inv_rs
    nz_blocks = [i for i in _blocks(adj.shape[0], block) if bool(xw[i : i + block].any())]
    for i in nz_blocks:
        y += xw[i : i + block] @ adj[i : i + block].abs().float()
    if col_mask is not None:
        y *= col_mask
    return y


def compute_influence(
    adj: torch.Tensor,
    logit_weights: torch.Tensor,
    *,
    col_mask: torch.Tensor | None = None,
    block: int = DEFAULT_BLOCK_ROWS,
    max_iter: int = 1000,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(influence, inv_row_sums)`` for ``I = w Â + w Â² + ...`` (see the module docstring).

    With ``col_mask`` (bool/float over nodes), ``Â`` is computed on the graph restricted to masked
    rows and columns (rows outside the mask must carry zero weight, which holds as ``x`` is
    masked after every step and ``w`` is only non-zero on always-kept logits).
    """
    cm = col_mask.float() if col_mask is not None else None
    rs = row_sums(adj, cm, block)
    inv_rs = torch.where(rs > 0, 1.0 / rs.clamp_min(1e-30), torch.zeros_like(rs))
    if cm is not None:
        inv_rs = inv_rs * cm
    x = _vec_times_norm(logit_weights.float(), adj, inv_rs, cm, block)
    influence = x.clone()
    for _ in range(max_iter):
        if not bool(x.any()):
            return influence, inv_rs
        x = _vec_times_norm(x, adj, inv_rs, cm, block)
        influence += x
    raise RuntimeError(f"influence did not converge in {max_iter} iterations (graph has a cycle?)")


def find_threshold(scores: torch.Tensor, threshold: float) -> float:
    """Score at which the descending cumulative sum first reaches ``threshold`` of the total."""
    sorted_scores = torch.sort(scores.flatten().float(), descending=True).values
    total = sorted_scores.sum()
    if total <= 0:
        return 0.0
    cum = torch.cumsum(sorted_scores, 0) / total
    idx = min(int(torch.searchsorted(cum, torch.tensor(threshold, dtype=cum.dtype))), len(cum) - 1)
    return float(sorted_scores[idx])


def _edge_scores_block(
    adj: torch.Tensor, i: int, block: int, row_w: torch.Tensor, col_mask: torch.Tensor
) -> torch.Tensor:
    return adj[i : i + block].abs().float() * row_w[i : i + block, None] * col_mask


def _edge_threshold(
    adj: torch.Tensor, row_w: torch.Tensor, col_mask: torch.Tensor, threshold: float, block: int
) -> float:
    """Exact :func:`find_threshold` over all edge scores, streamed (see the module docstring)."""
    n = adj.shape[0]
    total = 0.0
    s_max = 0.0
    s_min = math.inf
    for i in _blocks(n, block):
        if not bool(row_w[i : i + block].any()):
            continue
        s = _edge_scores_block(adj, i, block, row_w, col_mask)
        total += float(s.sum(dtype=torch.float64))
        pos = s[s > 0]
        if pos.numel():
            s_max = max(s_max, float(pos.max()))
            s_min = min(s_min, float(pos.min()))
    if total <= 0 or s_max <= 0:
        return 0.0
    lo, hi = math.log2(s_min), math.log2(s_max)
    width = max(hi - lo, 1e-6) / _N_BINS
    hist = torch.zeros(_N_BINS, dtype=torch.float64, device=adj.device)
    for i in _blocks(n, block):
        if not bool(row_w[i : i + block].any()):
            continue
        s = _edge_scores_block(adj, i, block, row_w, col_mask)
        pos = s[s > 0]
        b = ((torch.log2(pos) - lo) / width).long().clamp_(0, _N_BINS - 1)
        hist += torch.bincount(b, weights=pos.double(), minlength=_N_BINS)
    # descending bins: cumulative from the top
    cum = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) / total  # cum[k] = share >= bin k
    target = threshold - 1e-12
    crossing = torch.nonzero(cum >= target).flatten()
    k = int(crossing.max()) if crossing.numel() else 0
    above = float(cum[k + 1]) * total if k + 1 < _N_BINS else 0.0
    inside = []
    for i in _blocks(n, block):
        if not bool(row_w[i : i + block].any()):
            continue
        s = _edge_scores_block(adj, i, block, row_w, col_mask)
        pos = s[s > 0]
        b = ((torch.log2(pos) - lo) / width).long().clamp_(0, _N_BINS - 1)
        inside.append(pos[b == k])
    vals = torch.sort(torch.cat(inside).double(), descending=True).values
    cum_in = (above + torch.cumsum(vals, 0)) / total
    idx = int(torch.searchsorted(cum_in, torch.tensor(threshold, dtype=cum_in.dtype)))
    idx = min(idx, vals.numel() - 1)
    return float(vals[idx])


def prune(
    adj: torch.Tensor,
    logit_weights: torch.Tensor,
    n_tokens: int,
    n_logits: int,
    n_features: int,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    block: int = DEFAULT_BLOCK_ROWS,
) -> PruneResult:
    """Prune a dense adjacency in the reference layout (see the module docstring)."""
    if not 0.0 <= node_threshold <= 1.0 or not 0.0 <= edge_threshold <= 1.0:
        raise ValueError("node_threshold and edge_threshold must lie in [0, 1]")
    n = adj.shape[0]
    w = logit_weights.float().to(adj.device)
    influence, _ = compute_influence(adj, w, block=block)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[n - n_logits - n_tokens :] = True

    cm = node_mask.float()
    pruned_infl, inv_rs = compute_influence(adj, w, col_mask=node_mask, block=block)
    row_w = (pruned_infl + w) * inv_rs  # inv_rs already masked by the node mask
    tau = _edge_threshold(adj, row_w, cm, edge_threshold, block)

    tgt, src = [], []
    for i in _blocks(n, block):
        if not bool(row_w[i : i + block].any()):
            continue
        s = _edge_scores_block(adj, i, block, row_w, cm)
        keep = (s >= tau) & (s > 0)
        t, c = torch.nonzero(keep, as_tuple=True)
        tgt.append(t + i)
        src.append(c)
    edge_t = torch.cat(tgt) if tgt else torch.zeros(0, dtype=torch.long, device=adj.device)
    edge_s = torch.cat(src) if src else torch.zeros(0, dtype=torch.long, device=adj.device)

    fe_end = n - n_logits - n_tokens
    while True:
        alive = node_mask[edge_t] & node_mask[edge_s]
        edge_t, edge_s = edge_t[alive], edge_s[alive]
        has_out = torch.bincount(edge_s, minlength=n) > 0
        has_in = torch.bincount(edge_t, minlength=n) > 0
        new_mask = node_mask.clone()
        new_mask[:fe_end] &= has_out[:fe_end]
        new_mask[:n_features] &= has_in[:n_features]
        if bool((new_mask == node_mask).all()):
            break
        node_mask = new_mask

    sorted_scores, order = torch.sort(influence, descending=True)
    total = sorted_scores.sum()
    cumulative = torch.zeros_like(influence)
    if total > 0:
        cumulative[order] = torch.cumsum(sorted_scores, 0) / total
    return PruneResult(node_mask, torch.stack([edge_t, edge_s]), cumulative, influence)


def graph_scores(
    adj: torch.Tensor,
    logit_weights: torch.Tensor,
    n_features: int,
    n_errors: int,
    n_tokens: int,
    *,
    block: int = DEFAULT_BLOCK_ROWS,
) -> tuple[float, float]:
    """``(replacement_score, completeness_score)`` (see the module docstring)."""
    w = logit_weights.float().to(adj.device)
    influence, inv_rs = compute_influence(adj, w, block=block)
    e0, e1 = n_features, n_features + n_errors
    token_infl = influence[e1 : e1 + n_tokens].sum()
    error_infl = influence[e0:e1].sum()
    denom = token_infl + error_infl
    replacement = float(token_infl / denom) if denom > 0 else 0.0
    err_share = adj[:, e0:e1].abs().float().sum(1) * inv_rs
    out_infl = influence + w
    completeness = float(((1 - err_share) * out_infl).sum() / out_infl.sum())
    return replacement, completeness
