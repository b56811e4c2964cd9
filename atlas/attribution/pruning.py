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
is ``O(B·N)`` floats for the block's ``|A|`` (plus its bins, ``~3 x 4·B·N`` bytes), ``O(N)``
vectors, and the kept edges' index list (``16 bytes x n_kept_edges``) plus the scores inside one
histogram bin of the edge threshold search (a tiny fraction of the edges). So:

    peak ≈ 4·N² (the adjacency itself) + 12·B·N + 16·E_kept + O(N)   bytes.

After the node threshold only the ``k`` kept nodes' rows and columns carry edge scores: when
``k² <= 3·B·N`` (within the ``12·B·N`` bytes above) the kept block ``A[K][:, K]`` is gathered
once and the pruned graph's influence and both edge passes read it instead of the whole
adjacency (at 32 tokens ``k`` is ~1,800 of ~8,900 nodes, 1/25 of the entries).

Influence in one pass: with ``n_features`` given, the nodes are in the reference layout, where a
feature row only has feature sources of lower layers, hence of lower index, and error and token
rows are empty. Visiting the logit rows and then the feature rows from the last block to the
first is then a topological order: a block's influence is final once the blocks after it are
done, up to the edges inside the block, which form a strictly lower-triangular system solved
exactly. So ``|A|`` is read once instead of once per path length (the graph's depth). A matrix
that breaks the layout falls back to the series iteration.

The edge threshold (the score at which cumulative sorted score first reaches the threshold) is
found exactly without sorting all N² scores: one streamed pass builds a score-weighted histogram
over the scores' float32 bit patterns (sign-free floats sort like their bits; 2^15 bins, each
spanning a factor of at most 2^(1/128)), and the next pass collects the edges of the bins above
the one where the cumulative sum crosses the threshold together with the few scores inside it,
which alone are sorted.
"""

from __future__ import annotations

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
    n_features: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(influence, inv_row_sums)`` for ``I = w Â + w Â² + ...`` (see the module docstring).

    With ``col_mask`` (bool/float over nodes), ``Â`` is computed on the graph restricted to masked
    rows and columns (rows outside the mask must carry zero weight, which holds as ``x`` is
    masked after every step and ``w`` is only non-zero on always-kept logits). ``n_features``
    (the adjacency is in the reference layout with that many feature nodes first) allows the
    one-pass computation.
    """
    cm = col_mask.float() if col_mask is not None else None
    if n_features is not None:
        out = _influence_one_pass(adj, logit_weights.float(), cm, n_features, block)
        if out is not None:
            return out
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


def _normalised_block(
    adj: torch.Tensor, i: int, j: int, cm: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Â[i:j], inv_row_sums[i:j])`` of one row block (masked rows and columns zeroed)."""
    a = adj[i:j].abs().float()
    if cm is not None:
        a *= cm
    rs = a.sum(1)
    inv = torch.where(rs > 0, 1.0 / rs.clamp_min(1e-30), torch.zeros_like(rs))
    if cm is not None:
        inv *= cm[i:j]
    a *= inv[:, None]
    return a, inv


def _influence_one_pass(
    adj: torch.Tensor,
    w: torch.Tensor,
    cm: torch.Tensor | None,
    n_features: int,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Influence by one backward sweep over the row blocks (module docstring); ``None`` when
    the matrix is not in the layout that makes the sweep exact."""
    n = adj.shape[0]
    incoming = torch.zeros(n, dtype=torch.float32, device=adj.device)
    inv_rs = torch.zeros(n, dtype=torch.float32, device=adj.device)
    # rows after the features (errors, tokens, logits): only logits have inputs, and none of
    # them is a source of another
    used_as_source = torch.zeros(n, dtype=torch.bool, device=adj.device)
    for i in _blocks(n - n_features, block):
        lo, hi = n_features + i, min(n_features + i + block, n)
        a, inv_rs[lo:hi] = _normalised_block(adj, lo, hi, cm)
        used_as_source |= a.any(0)
        incoming += w[lo:hi] @ a
    has_inputs = inv_rs > 0
    if bool((used_as_source[n_features:] & has_inputs[n_features:]).any()):
        return None
    influence = torch.zeros_like(incoming)
    starts = list(_blocks(n_features, block))
    for i in reversed(starts):
        j = min(i + block, n_features)
        a, inv_rs[i:j] = _normalised_block(adj, i, j, cm)
        inner = a[:, i:j]
        if bool(torch.triu(inner).any()):
            return None
        # v = I + w on the block solves v (1 - L) = incoming + w with L strictly lower
        rhs = (incoming[i:j] + w[i:j])[:, None]
        v = torch.linalg.solve_triangular(-inner.T, rhs, upper=True, unitriangular=True)[:, 0]
        # one read of the block: its column sums (the layout check) and its contributions
        col_sums, contrib = torch.stack([torch.ones_like(v), v]) @ a
        if bool(col_sums[j:n_features].any()):
            return None
        influence[i:j] = v - w[i:j]
        contrib[i:j] = 0.0
        incoming += contrib
    influence[n_features:] = incoming[n_features:]
    if cm is not None:
        influence *= cm
    return influence, inv_rs


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
    s = adj[i : i + block].abs().float()
    s *= row_w[i : i + block, None]
    s *= col_mask
    return s


_BIN_SHIFT = 16  # float32 bits >> 16: sign, 8 exponent bits, 7 mantissa bits
_N_BINS = 1 << (31 - _BIN_SHIFT)


def _score_bins(s: torch.Tensor) -> torch.Tensor:
    """Histogram bin of every non-negative float32 score (monotone in the score)."""
    return torch.bitwise_right_shift(s.view(torch.int32), _BIN_SHIFT)


class _EdgeCut(NamedTuple):
    """Where the cumulative edge score crosses the threshold: bin ``k``, and the score mass of
    the bins above it."""

    k: int
    above: float
    total: float


def _edge_cut(
    adj: torch.Tensor, row_w: torch.Tensor, col_mask: torch.Tensor, threshold: float, block: int
) -> _EdgeCut | None:
    """The crossing bin from one streamed histogram pass; ``None`` when no edge has a score."""
    hist = torch.zeros(_N_BINS, dtype=torch.float64, device=adj.device)
    for i in _blocks(adj.shape[0], block):
        if not bool(row_w[i : i + block].any()):
            continue
        s = _edge_scores_block(adj, i, block, row_w, col_mask).flatten()
        hist += torch.bincount(_score_bins(s), weights=s.double(), minlength=_N_BINS)
    hist[0] = 0.0  # zeros (and denormals below 2^-126, which no kept edge is)
    total = float(hist.sum())
    if total <= 0:
        return None
    cum = torch.flip(torch.cumsum(torch.flip(hist, [0]), 0), [0]) / total  # share >= bin k
    crossing = torch.nonzero(cum >= threshold - 1e-12).flatten()
    k = max(int(crossing.max()) if crossing.numel() else 1, 1)
    above = float(cum[k + 1]) * total if k + 1 < _N_BINS else 0.0
    return _EdgeCut(k, above, total)


def _tau_in_bin(inside: torch.Tensor, cut: _EdgeCut, threshold: float) -> float:
    """The exact threshold score among the scores of the crossing bin."""
    if inside.numel() == 0:
        return 0.0
    vals = torch.sort(inside.double(), descending=True).values
    cum_in = (cut.above + torch.cumsum(vals, 0)) / cut.total
    idx = int(torch.searchsorted(cum_in, torch.tensor(threshold, dtype=cum_in.dtype)))
    return float(vals[min(idx, vals.numel() - 1)])


def _edge_threshold(
    adj: torch.Tensor, row_w: torch.Tensor, col_mask: torch.Tensor, threshold: float, block: int
) -> float:
    """Exact :func:`find_threshold` over all edge scores, streamed (see the module docstring)."""
    cut = _edge_cut(adj, row_w, col_mask, threshold, block)
    if cut is None:
        return 0.0
    inside = []
    for i in _blocks(adj.shape[0], block):
        if bool(row_w[i : i + block].any()):
            s = _edge_scores_block(adj, i, block, row_w, col_mask)
            inside.append(s[_score_bins(s) == cut.k])
    return _tau_in_bin(torch.cat(inside), cut, threshold)


def _kept_edges(
    adj: torch.Tensor, row_w: torch.Tensor, col_mask: torch.Tensor, threshold: float, block: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(targets, sources)`` of the edges within the top ``threshold`` of cumulative edge score,
    in row-major order: one histogram pass, then one pass that collects the edges of the bins
    above the crossing one with the crossing bin's candidates, whose exact cut is found last."""
    empty = torch.zeros(0, dtype=torch.long, device=adj.device)
    cut = _edge_cut(adj, row_w, col_mask, threshold, block)
    if cut is None:
        return empty, empty
    tgt, src, val, cand = [], [], [], []
    for i in _blocks(adj.shape[0], block):
        if not bool(row_w[i : i + block].any()):
            continue
        s = _edge_scores_block(adj, i, block, row_w, col_mask)
        bins = _score_bins(s)
        t, c = torch.nonzero(bins >= cut.k, as_tuple=True)
        v = s[t, c]
        tgt.append(t + i)
        src.append(c)
        val.append(v)
        cand.append(v[bins[t, c] == cut.k])
    if not tgt:
        return empty, empty
    tau = _tau_in_bin(torch.cat(cand), cut, threshold)
    edge_t, edge_s, scores = torch.cat(tgt), torch.cat(src), torch.cat(val)
    keep = (scores >= tau) & (scores > 0)
    return edge_t[keep], edge_s[keep]


def _kept_edges_of_mask(
    adj: torch.Tensor,
    w: torch.Tensor,
    node_mask: torch.Tensor,
    n_features: int,
    threshold: float,
    block: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The edge cut on the graph restricted to ``node_mask``: influence ``I'``, the edge scores
    and the edges within the top ``threshold``, as ``(targets, sources)`` in row-major order.

    Only kept rows and columns carry a score, so when the kept block ``A[K][:, K]`` is no larger
    than the streamed passes' own working memory (``k² <= 3·block·N``) it is gathered once and
    every pass reads it instead of the whole adjacency (at 32 tokens ~1,800 of ~8,900 nodes
    survive the node threshold: 1/25 of the entries); otherwise the passes stream the whole
    adjacency under the mask. Both read the same entries, so the kept edges are the same.
    """
    n = adj.shape[0]
    kept = torch.nonzero(node_mask).flatten()
    k = int(kept.numel())
    if k * k > 3 * block * n:
        pruned_infl, inv_rs = compute_influence(
            adj, w, col_mask=node_mask, block=block, n_features=n_features
        )
        row_w = (pruned_infl + w) * inv_rs  # inv_rs already masked by the node mask
        return _kept_edges(adj, row_w, node_mask.float(), threshold, block)
    sub = torch.empty((k, k), dtype=adj.dtype, device=adj.device)
    for i in _blocks(k, block):
        sub[i : i + block] = adj[kept[i : i + block]][:, kept]
    w_sub = w[kept]
    k_features = int((kept < n_features).sum())
    pruned_infl, inv_rs = compute_influence(sub, w_sub, block=block, n_features=k_features)
    row_w = (pruned_infl + w_sub) * inv_rs
    ones = torch.ones(k, dtype=torch.float32, device=adj.device)
    t, s = _kept_edges(sub, row_w, ones, threshold, block)
    return kept[t], kept[s]


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
    influence: torch.Tensor | None = None,
) -> PruneResult:
    """Prune a dense adjacency in the reference layout (see the module docstring).

    ``influence``: the unpruned graph's node influence when the caller already has it (as
    :func:`compute_influence` gives it), so it is not computed twice.
    """
    if not 0.0 <= node_threshold <= 1.0 or not 0.0 <= edge_threshold <= 1.0:
        raise ValueError("node_threshold and edge_threshold must lie in [0, 1]")
    n = adj.shape[0]
    w = logit_weights.float().to(adj.device)
    if influence is None:
        influence, _ = compute_influence(adj, w, block=block, n_features=n_features)
    node_mask = influence >= find_threshold(influence, node_threshold)
    node_mask[n - n_logits - n_tokens :] = True

    edge_t, edge_s = _kept_edges_of_mask(adj, w, node_mask, n_features, edge_threshold, block)

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

    cumulative = cumulative_influence(influence)
    return PruneResult(node_mask, torch.stack([edge_t, edge_s]), cumulative, influence)


def cumulative_influence(influence: torch.Tensor) -> torch.Tensor:
    """Each node's cumulative share of the total influence in rank order (the graph's
    ``influence`` column; circuit-tracer's cumulative scores)."""
    sorted_scores, order = torch.sort(influence, descending=True)
    total = sorted_scores.sum()
    cumulative = torch.zeros_like(influence)
    if total > 0:
        cumulative[order] = torch.cumsum(sorted_scores, 0) / total
    return cumulative


def graph_scores(
    adj: torch.Tensor,
    logit_weights: torch.Tensor,
    n_features: int,
    n_errors: int,
    n_tokens: int,
    *,
    block: int = DEFAULT_BLOCK_ROWS,
    influence: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[float, float]:
    """``(replacement_score, completeness_score)`` (see the module docstring).

    ``influence``: :func:`compute_influence`'s ``(influence, inv_row_sums)`` of the unpruned
    graph when the caller already has them.
    """
    w = logit_weights.float().to(adj.device)
    if influence is None:
        influence = compute_influence(adj, w, block=block, n_features=n_features)
    node_infl, inv_rs = influence
    e0, e1 = n_features, n_features + n_errors
    token_infl = node_infl[e1 : e1 + n_tokens].sum()
    error_infl = node_infl[e0:e1].sum()
    denom = token_infl + error_infl
    replacement = float(token_infl / denom) if denom > 0 else 0.0
    err_share = adj[:, e0:e1].abs().float().sum(1) * inv_rs
    out_infl = node_infl + w
    completeness = float(((1 - err_share) * out_infl).sum() / out_infl.sum())
    return replacement, completeness
