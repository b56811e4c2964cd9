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
) -> list[dict[str, Any]]:
    """One row per item (``values[item][prompt]``: the item's value in a prompt where it is
    present) seen in at least ``min_prompts`` prompts of A and B together; best first."""
    n_a, n_b = len(set_a), len(set_b)
    if n_a == 0 or n_b == 0:
        return []
    rows: list[dict[str, Any]] = []
    for item, by_prompt in values.items():
        va = np.array([by_prompt.get(p, 0.0) for p in set_a], dtype=np.float64)
        vb = np.array([by_prompt.get(p, 0.0) for p in set_b], dtype=np.float64)
        k_a = sum(1 for p in set_a if p in by_prompt)
        k_b = sum(1 for p in set_b if p in by_prompt)
        if k_a + k_b < min_prompts:
            continue
        table = [[k_a, n_a - k_a], [k_b, n_b - k_b]]
        p_presence = float(stats.fisher_exact(table).pvalue)
        odds = ((k_a + 0.5) * (n_b - k_b + 0.5)) / ((n_a - k_a + 0.5) * (k_b + 0.5))
        if np.all(va == va[0]) and np.all(vb == va[0]):
            u, p_value = n_a * n_b / 2.0, 1.0
        else:
            res = stats.mannwhitneyu(va, vb, alternative="two-sided")
            u, p_value = float(res.statistic), float(res.pvalue)
        rows.append(
            {
                "item": item,
                "k_a": k_a,
                "n_a": n_a,
                "k_b": k_b,
                "n_b": n_b,
                "rate_diff": k_a / n_a - k_b / n_b,
                "log2_odds": math.log2(odds),
                "p_presence": p_presence,
                "mean_a": float(va.mean()),
                "mean_b": float(vb.mean()),
                "effect": 2.0 * u / (n_a * n_b) - 1.0,
                "p_value": p_value,
            }
        )
    if rows:
        q = stats.false_discovery_control([r["p_value"] for r in rows], method="bh")
        for r, qv in zip(rows, np.atleast_1d(q).tolist(), strict=True):
            r["q_value"] = float(qv)
    rows.sort(key=lambda r: (r["q_value"], -abs(r["effect"]), r["item"]))
    return rows
