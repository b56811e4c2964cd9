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

Items are ranked by ``q_value``, then by ``|effect|``. :func:`summarise` counts a family: the
items tested, those significant (``q_value`` below ``alpha``) and those *shared*, present in
nearly every prompt of both sets (what the two sets have in common rather than what tells them
apart).
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
    return top_rows(rank_items(values, set_a, set_b, min_prompts=min_prompts, chunk=chunk), limit)


def rank_items(
    values: Mapping[str, Mapping[str, float]],
    set_a: Sequence[str],
    set_b: Sequence[str],
    *,
    min_prompts: int = 1,
    chunk: int = 20_000,
) -> list[dict[str, Any]]:
    """Every row of :func:`contrast_items`, ranked, without Fisher's test (:func:`top_rows`
    adds it)."""
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
    return rows


def top_rows(ranked: Sequence[dict[str, Any]], limit: int | None) -> list[dict[str, Any]]:
    """The ``limit`` best of :func:`rank_items`' rows (all with ``None``), with Fisher's exact
    test of presence (``p_presence``)."""
    rows = list(ranked if limit is None else ranked[:limit])
    for r in rows:
        table = [[r["k_a"], r["n_a"] - r["k_a"]], [r["k_b"], r["n_b"] - r["k_b"]]]
        r["p_presence"] = float(stats.fisher_exact(table).pvalue)
    return rows


def summarise(
    ranked: Sequence[Mapping[str, Any]],
    *,
    alpha: float = 0.05,
    shared: float = 0.9,
    max_shared: int = 100,
) -> dict[str, Any]:
    """``n_tested``, ``n_significant`` (``q_value < alpha``), ``min_q`` (None with no item),
    ``n_shared``: the items present in at least ``shared`` of the prompts of each set, and
    ``shared``: the first ``max_shared`` of them in rank order."""
    common = [
        str(r["item"])
        for r in ranked
        if r["k_a"] >= shared * r["n_a"] and r["k_b"] >= shared * r["n_b"]
    ]
    return {
        "n_tested": len(ranked),
        "n_significant": sum(1 for r in ranked if r["q_value"] < alpha),
        "alpha": alpha,
        "min_q": min((float(r["q_value"]) for r in ranked), default=None),
        "shared_at": shared,
        "n_shared": len(common),
        "shared": common[:max_shared],
    }


def contrast_reading(result: Mapping[str, Any], family: str) -> str:
    """One line for a family of a contrast's ``summary``: ``"412 tested, 0 with q < 0.05
    (smallest q 0.56), 37 in >= 90% of both sets"``."""
    s = result["summary"][family]
    smallest = f" (smallest q {s['min_q']:.2g})" if s["min_q"] is not None else ""
    return (
        f"{s['n_tested']} tested, {s['n_significant']} with q < {s['alpha']:g}{smallest}, "
        f"{s['n_shared']} in >= {s['shared_at']:.0%} of both sets"
    )
