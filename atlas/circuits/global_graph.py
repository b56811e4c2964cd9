"""Global circuits: the aggregated graph between two ends over a prompt set, pruned by influence
(pure numpy and scipy; no database).

Inputs are per node pair statistics summed over the ``n`` prompts of the set (each prompt's
edges between two nodes summed over positions first; the ends collapsed into the nodes
``@from`` and ``@to``):

* ``n_prompts``: prompts with an edge between the two (both are active there);
* ``mean_w = sum_w / n_prompts``: the mean weight where both are active;
* ``era = sum_w / n``: the expected weight over the whole set (zero where they are not both
  active), the ERA of ``../shared/INTERVENTIONS.md`` with the stored edge weight
  ``a_s * V_st`` in place of ``a_s`` times a virtual weight (so attention-mediated paths
  count, and no decoder is needed);
* ``twera = sum_p a_t w_p / sum_p a_t``: the target-activation-weighted mean weight (TWERA),
  ``a_t`` the target's largest activation in a prompt (1 for logits), the denominator over
  every prompt of the set where the target is active.

Pruning follows a prompt graph's: edge magnitudes ``|era|`` normalised per target (its incoming
total is 1); a node's influence on ``@to`` is the sum over paths of the products of normalised
weights, and its share of ``@from``'s flow the same sum from ``@from`` to it; nodes are ranked by
the product and kept until ``node_threshold`` of the total (at most ``max_nodes``), then edges
among the kept nodes by ``normalised weight x target influence x source flow`` until
``edge_threshold`` (at most ``max_edges``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import sparse

FROM = "@from"
TO = "@to"


@dataclass(frozen=True)
class PairStat:
    """Statistics of the edges from ``source`` to ``target`` over a prompt set."""

    source: str
    target: str
    n_prompts: int
    sum_w: float
    sum_tw: float = 0.0
    sum_abs: float = 0.0


@dataclass
class GlobalEdge:
    source: str
    target: str
    n_prompts: int
    mean_w: float
    era: float
    twera: float
    score: float


@dataclass
class GlobalCircuit:
    """Kept nodes (``@from`` first, ``@to`` last) with their scores, and kept edges."""

    n_prompts: int
    nodes: list[str]
    node_scores: dict[str, float]
    edges: list[GlobalEdge] = field(default_factory=list)
    n_candidate_nodes: int = 0
    n_candidate_edges: int = 0


def _series(mat: sparse.csr_matrix, start: np.ndarray, steps: int, left: bool) -> np.ndarray:
    """``sum_{k>=1} start M^k`` (``left``) or ``sum_{k>=1} M^k start``, until it vanishes."""
    total = np.zeros_like(start)
    v = start
    for _ in range(steps):
        v = mat.T @ v if left else mat @ v
        if not np.any(v):
            break
        total += v
    return total


def global_circuit(
    pairs: Sequence[PairStat],
    node_activation: dict[str, tuple[int, float]],
    n_prompts: int,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_nodes: int = 40,
    max_edges: int = 200,
    steps: int = 256,
) -> GlobalCircuit:
    """The pruned global circuit from ``@from`` to ``@to`` (see the module docstring).

    ``node_activation`` maps a node key to ``(prompts where present, sum of its per-prompt
    largest activation)``; ``n_prompts`` is the size of the prompt set.
    """
    keys = sorted({p.source for p in pairs} | {p.target for p in pairs} | {FROM, TO})
    index = {k: i for i, k in enumerate(keys)}
    n = len(keys)
    f, t = index[FROM], index[TO]
    rows, cols, vals = [], [], []
    for p in pairs:
        if p.target == FROM or p.source == TO:  # nothing flows back into the source end
            continue
        rows.append(index[p.target])
        cols.append(index[p.source])
        vals.append(abs(p.sum_w) / max(n_prompts, 1))
    mag = sparse.csr_matrix((vals, (rows, cols)), shape=(n, n))
    incoming = np.asarray(mag.sum(axis=1)).ravel()
    scale = np.divide(1.0, incoming, out=np.zeros(n), where=incoming > 0)
    norm = sparse.csr_matrix(sparse.diags(scale) @ mag)
    e_to = np.zeros(n)
    e_to[t] = 1.0
    e_from = np.zeros(n)
    e_from[f] = 1.0
    to_influence = _series(norm, e_to, steps, left=True)  # influence of each node on @to
    to_influence[t] = 1.0
    from_flow = _series(norm, e_from, steps, left=False)  # share of each node's input from @from
    from_flow[f] = 1.0
    score = to_influence * from_flow
    inner = [i for i in range(n) if i not in (f, t) and score[i] > 0]
    inner.sort(key=lambda i: -score[i])
    total = sum(score[i] for i in inner)
    kept: list[int] = []
    acc = 0.0
    for i in inner:
        if len(kept) >= max_nodes or (total > 0 and acc >= node_threshold * total):
            break
        kept.append(i)
        acc += score[i]
    keep = set(kept) | {f, t}
    by_pair = {(index[p.source], index[p.target]): p for p in pairs}
    cand = []
    coo = norm.tocoo()
    for r, c, v in zip(coo.row.tolist(), coo.col.tolist(), coo.data.tolist(), strict=True):
        if r in keep and c in keep:
            cand.append((v * to_influence[r] * from_flow[c], c, r))
    cand.sort(key=lambda x: -x[0])
    etotal = sum(x[0] for x in cand)
    edges: list[GlobalEdge] = []
    acc = 0.0
    for sc, c, r in cand:
        if len(edges) >= max_edges or (etotal > 0 and acc >= edge_threshold * etotal) or sc <= 0:
            break
        acc += sc
        p = by_pair[(c, r)]
        denom = node_activation.get(p.target, (0, 0.0))[1]
        edges.append(
            GlobalEdge(
                source=p.source,
                target=p.target,
                n_prompts=p.n_prompts,
                mean_w=p.sum_w / p.n_prompts if p.n_prompts else 0.0,
                era=p.sum_w / max(n_prompts, 1),
                twera=p.sum_tw / denom if denom else 0.0,
                score=float(sc),
            )
        )
    used = {e.source for e in edges} | {e.target for e in edges} | {FROM, TO}
    nodes = [FROM] + [keys[i] for i in kept if keys[i] in used] + [TO]
    return GlobalCircuit(
        n_prompts=n_prompts,
        nodes=nodes,
        node_scores={k: float(score[index[k]]) for k in nodes},
        edges=edges,
        n_candidate_nodes=n,
        n_candidate_edges=len(pairs),
    )
