"""Contrastive statistics between two prompt sets (pure numpy and scipy; no database).

For each item (a feature, an edge, a path) and each prompt of sets A and B, a value: the
feature's largest activation, the edge's weight summed over positions, a path's presence
(1.0), or 0 where the item is absent. Per item:

* ``k_a / n_a``, ``k_b / n_b``: prompts where it is present; ``rate_diff`` the difference of
  the two rates; ``log2_odds``: log2 odds ratio of presence (0.5 added to each cell);
* ``p_presence``: Fisher's exact test of presence (two-sided, :func:`scipy.stats.fisher_exact`);
* ``mean_a``, ``mean_b``, ``effect``: the rank-biserial correlation of the values in A against
  B (``2 U / (n_a n_b) - 1``; +1: every A prompt above every B prompt) and ``p_value`` its
  two-sided Mann-Whitney U test (:func:`scipy.stats.mannwhitneyu`, zeros included, so presence
  and strength both count);
* ``q_value``: Benjamini-Hochberg adjusted ``p_value`` over every item of the family
  (:func:`scipy.stats.false_discovery_control`).

Items are ranked by ``q_value``, then by ``|effect|``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from scipy import stats


def contrast_items(
    values: Mapping[str, Mapping[str, float]],
    set_a: Sequence[str],
    set_b: Sequence[str],
    *,
    min_prompts: int = 1,
    limit: int | None = None,
    chunk: int = 20_000,
) -> list[dict[str, Any]]:
    """One row per item (``values[item][prompt]``: the item's value in a prompt where it is
    present) seen in at least ``min_prompts`` prompts of A and B together; best first, the
    ``limit`` best (all with ``None``). The rank tests run vectorised over ``chunk`` items at a
    time; Fisher's test only for the rows returned."""
    n_a, n_b = len(set_a), len(set_b)
    if n_a == 0 or n_b == 0:
        return []
    col = {p: i for i, p in enumerate(list(set_a) + list(set_b))}
    items = [it for it, by in values.items() if sum(1 for p in by if p in col) >= min_prompts]
    rows: list[dict[str, Any]] = []
    for start in range(0, len(items), chunk):
        part = items[start : start + chunk]
        mat = np.zeros((len(part), n_a + n_b))
        seen = np.zeros((len(part), n_a + n_b), dtype=bool)
        for j, it in enumerate(part):
            for p, v in values[it].items():
                c = col.get(p)
                if c is not None:
                    mat[j, c] = v
                    seen[j, c] = True
        va, vb = mat[:, :n_a], mat[:, n_a:]
        with np.errstate(all="ignore"):
            res = stats.mannwhitneyu(va, vb, axis=1, alternative="two-sided")
        u = np.asarray(res.statistic, dtype=np.float64)
        pv = np.asarray(res.pvalue, dtype=np.float64)
        same = np.all(mat == mat[:, :1], axis=1)
        u = np.where(same, n_a * n_b / 2.0, u)
        pv = np.where(same | np.isnan(pv), 1.0, pv)
        k_a = seen[:, :n_a].sum(axis=1)
        k_b = seen[:, n_a:].sum(axis=1)
        for j, it in enumerate(part):
            ka, kb = int(k_a[j]), int(k_b[j])
            odds = ((ka + 0.5) * (n_b - kb + 0.5)) / ((n_a - ka + 0.5) * (kb + 0.5))
            rows.append(
                {
                    "item": it,
                    "k_a": ka,
                    "n_a": n_a,
                    "k_b": kb,
                    "n_b": n_b,
                    "rate_diff": ka / n_a - kb / n_b,
                    "log2_odds": math.log2(odds),
                    "mean_a": float(va[j].mean()),
                    "mean_b": float(vb[j].mean()),
                    "effect": 2.0 * float(u[j]) / (n_a * n_b) - 1.0,
                    "p_value": float(pv[j]),
                }
            )
    if rows:
        q = stats.false_discovery_control([r["p_value"] for r in rows], method="bh")
        for r, qv in zip(rows, np.atleast_1d(q).tolist(), strict=True):
            r["q_value"] = float(qv)
    rows.sort(key=lambda r: (r["q_value"], -abs(r["effect"]), r["item"]))
    rows = rows if limit is None else rows[:limit]
    for r in rows:
        table = [[r["k_a"], n_a - r["k_a"]], [r["k_b"], n_b - r["k_b"]]]
        r["p_presence"] = float(stats.fisher_exact(table).pvalue)
    return rows
