"""Contrastive questions (``atlas query contrast --a FILTER --b FILTER``): features, edges and
two-hop paths (feature -> feature -> logit) enriched in one prompt set against another, with the
statistics of :mod:`atlas.circuits.contrast`.

Prompts in both sets are refused (the tests assume independent samples). Each prompt's
features (largest activation), edges (summed over positions, ``|w| >= min_weight``) and its
``paths_per_prompt`` strongest two-hop paths to a logit (by ``|w1 w2|``) are read in chunks;
the whole question gets the query timeout.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import neo4j

from atlas.circuits.contrast import rank_items, summarise, top_rows
from atlas.errors import InputError, StoreError
from atlas.store import queries as Q
from atlas.store.connection import read_rows
from atlas.store.global_circuit import _timed_out, key_names
from atlas.store.prompt_filter import select_prompts
from atlas.store.read import DEFAULT_TIMEOUT_S, _Reader

CHUNK = 50


def contrast(
    driver: neo4j.Driver,
    settings: Any,
    a: str,
    b: str,
    *,
    limit: int = 20,
    min_prompts: int = 2,
    min_weight: float = 0.0,
    paths_per_prompt: int = 200,
    database: str | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """Features, edges and paths of prompt set ``a`` against ``b`` (filters of
    :mod:`atlas.store.prompt_filter`). Returns ``a``, ``b``, ``n_a``, ``n_b`` and, for each of
    ``features``, ``edges``, ``paths``, the ``limit`` best rows (``name``, the statistics), and
    ``summary``: per family, :func:`atlas.circuits.contrast.summarise` (items tested,
    significant, shared by both sets)."""
    if settings is not None:
        database = database or settings.neo4j_database
        timeout_s = timeout_s or settings.query_timeout_s
    timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
    if min_prompts < 1 or limit < 1 or paths_per_prompt < 0 or min_weight < 0:
        raise InputError("--min-prompts and --limit must be >= 1, --min-weight >= 0")
    t0 = time.monotonic()
    ids_a = select_prompts(driver, a, database=database, timeout_s=timeout_s)
    ids_b = select_prompts(driver, b, database=database, timeout_s=timeout_s)
    both = set(ids_a) & set(ids_b)
    if both:
        raise InputError(
            f"{len(both)} prompt(s) are in both sets (--a {a!r}, --b {b!r}): make them disjoint"
        )
    feats: dict[str, dict[str, float]] = defaultdict(dict)
    edges: dict[str, dict[str, float]] = defaultdict(dict)
    paths: dict[str, dict[str, float]] = defaultdict(dict)
    prompts = ids_a + ids_b
    try:
        for start in range(0, len(prompts), CHUNK):
            chunk = prompts[start : start + CHUNK]
            for query, params in (
                (Q.CT_FEATURES, {"ids": chunk}),
                (Q.CT_EDGES, {"ids": chunk, "min_weight": float(min_weight)}),
            ):
                left = timeout_s - (time.monotonic() - t0)
                if left <= 0:
                    raise StoreError("TransactionTimedOut")
                rows = read_rows(
                    driver, query, params, database=database, what="contrast", timeout_s=left
                )
                if query is Q.CT_FEATURES:
                    for r in rows:
                        feats[f"feature|{r['ref']}"][r["prompt"]] = float(r["act"] or 0.0)
                else:
                    _edges_and_paths(rows, edges, paths, paths_per_prompt)
    except StoreError as exc:
        if _timed_out(exc):
            raise StoreError(
                f"the contrast of {len(ids_a)} against {len(ids_b)} prompts did not finish within "
                f"the query timeout ({timeout_s:g} s): narrow the sets or raise QUERY_TIMEOUT_S"
            ) from exc
        raise
    reader = _Reader(driver, database, timeout_s)
    out: dict[str, Any] = {"a": a, "b": b, "n_a": len(ids_a), "n_b": len(ids_b)}
    families = {"features": feats, "edges": edges, "paths": paths}
    ranked = {
        name: rank_items(values, ids_a, ids_b, min_prompts=min_prompts)
        for name, values in families.items()
    }
    out["summary"] = {name: summarise(rows) for name, rows in ranked.items()}
    tables = {name: top_rows(rows, limit) for name, rows in ranked.items()}
    keys = sorted({k for rows in tables.values() for r in rows for k in r["item"].split(" -> ")})
    names = key_names(reader, keys, {})
    for name, rows in tables.items():
        for r in rows:
            r["name"] = " -> ".join(names.get(k, k) for k in r["item"].split(" -> "))
        out[name] = rows
    return out


def _edges_and_paths(
    rows: list[dict[str, Any]],
    edges: dict[str, dict[str, float]],
    paths: dict[str, dict[str, float]],
    per_prompt: int,
) -> None:
    by_prompt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        edges[f"{r['s']} -> {r['t']}"][r["prompt"]] = float(r["w"])
        by_prompt[r["prompt"]].append(r)
    if per_prompt == 0:
        return
    for prompt, es in by_prompt.items():
        into: dict[str, list[tuple[str, float]]] = defaultdict(list)
        for e in es:
            into[e["t"]].append((e["s"], float(e["w"])))
        found = []
        for e in es:
            if not e["t"].startswith("logit|"):
                continue
            for s, w1 in into.get(e["s"], []):
                found.append(
                    (abs(w1 * float(e["w"])), f"{s} -> {e['s']} -> {e['t']}", w1 * float(e["w"]))
                )
        found.sort(key=lambda x: -x[0])
        for _, key, w in found[:per_prompt]:
            paths[key][prompt] = w
