"""Global circuits over a prompt set (``atlas query global``): the pair statistics are summed in
Cypher (:data:`atlas.store.queries.GC_PAIR_STATS`), the pruning is
:func:`atlas.circuits.global_graph.global_circuit`.

Ends: ``feature:L/I``, ``supernode:NAME`` (its members collapsed into one node), ``token:TEXT``,
``logit:TEXT``, and as a source ``image`` / ``image:ROW,COL`` / ``image:R0-R1,C0-C1``. The set is
the prompts the filter selects that contain both ends. The whole question gets the query
timeout; a question that needs longer is refused with one line.
"""

from __future__ import annotations

import time
from typing import Any

import neo4j

from atlas.circuits.global_graph import FROM, TO, PairStat
from atlas.circuits.global_graph import global_circuit as prune
from atlas.errors import InputError, StoreError
from atlas.store import queries as Q
from atlas.store.connection import read_rows
from atlas.store.prompt_filter import select_prompts
from atlas.store.read import (
    _IMAGE_SPEC,
    DEFAULT_TIMEOUT_S,
    _Reader,
    _resolve_endpoint,
    parse_image_region,
)

#: prompts per statement
CHUNK = 50


def _end(reader: _Reader, spec: str, role: str) -> dict[str, Any]:
    """``{"keys", "box", "kind", "refs"}`` of one end; :class:`InputError` when it names nothing."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(f"empty --{role} end")
    if _IMAGE_SPEC.match(spec):
        if role == "to":
            raise InputError("an image end is a source only: use --from image")
        return {"keys": [], "box": list(parse_image_region(spec)), "kind": "image", "refs": []}
    ep = _resolve_endpoint(reader, spec)
    if not ep.refs:
        raise InputError(f"--{role} {spec!r} names nothing in the atlas")
    return {
        "keys": [f"{ep.kind}|{r}" for r in ep.refs],
        "box": None,
        "kind": ep.kind,
        "refs": ep.refs,
    }


def _timed_out(exc: StoreError) -> bool:
    text = str(exc)
    return "TransactionTimedOut" in text or "timed out" in text.lower() or "Timeout" in text


def global_circuit(
    driver: neo4j.Driver,
    settings: Any,
    from_: str,
    to: str,
    prompt_filter: str | None = None,
    *,
    node_threshold: float = 0.8,
    edge_threshold: float = 0.98,
    max_nodes: int = 40,
    max_edges: int = 200,
    database: str | None = None,
    timeout_s: float | None = None,
) -> dict[str, Any]:
    """The global circuit from ``from_`` to ``to`` over the prompts ``prompt_filter`` selects
    (``settings``: an :class:`atlas.settings.AtlasSettings` for the database and the query
    timeout, or ``None``). Returns ``from``, ``to``, ``filter``, ``n_prompts``, ``prompts``,
    ``nodes`` (``key``, ``name``, ``score``) and ``edges`` (``source``, ``target`` keys and
    names, ``n_prompts``, ``mean_w``, ``era``, ``twera``, ``score``)."""
    if settings is not None:
        database = database or settings.neo4j_database
        timeout_s = timeout_s or settings.query_timeout_s
    timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
    if not 0 < node_threshold <= 1 or not 0 < edge_threshold <= 1:
        raise InputError("node and edge thresholds must be in (0, 1]")
    if max_nodes < 1 or max_edges < 1:
        raise InputError("--max-nodes and --max-edges must be >= 1")
    t0 = time.monotonic()
    reader = _Reader(driver, database, timeout_s)
    src, dst = _end(reader, from_, "from"), _end(reader, to, "to")
    if src["keys"] and set(src["keys"]) == set(dst["keys"]):
        raise InputError("--from and --to name the same nodes")
    ids = set(select_prompts(driver, prompt_filter, database=database, timeout_s=timeout_s))
    for end in (src, dst):
        if end["box"] is not None:
            found = reader.rows(Q.GC_IMAGE_PROMPTS, {"box": end["box"]}, "prompts of an end")
        else:
            params = {"refs": end["refs"], "kind": end["kind"]}
            found = reader.rows(Q.GC_END_PROMPTS, params, "prompts of an end")
        ids &= {str(r["id"]) for r in found}
    if not ids:
        raise InputError(
            f"no prompt selected by {prompt_filter or 'all'!r} contains both {from_!r} and {to!r}"
        )
    prompts = sorted(ids)
    pairs: dict[tuple[str, str], list[float]] = {}
    nodes: dict[str, list[float]] = {}
    base = {"from_keys": src["keys"], "to_keys": dst["keys"], "from_box": src["box"]}
    try:
        for start in range(0, len(prompts), CHUNK):
            left = timeout_s - (time.monotonic() - t0)
            if left <= 0:
                raise StoreError("TransactionTimedOut")
            params = {**base, "ids": prompts[start : start + CHUNK]}
            for r in read_rows(
                driver,
                Q.GC_PAIR_STATS,
                params,
                database=database,
                what="global circuit",
                timeout_s=left,
            ):
                cols = (r["s"], r["t"], r["n"], r["sum_w"], r["sum_tw"], r["sum_abs"])
                for s, t, n, sum_w, sum_tw, sum_abs in zip(*cols, strict=True):
                    acc = pairs.setdefault((s, t), [0, 0.0, 0.0, 0.0])
                    acc[0] += n
                    acc[1] += sum_w
                    acc[2] += sum_tw
                    acc[3] += sum_abs
            left = timeout_s - (time.monotonic() - t0)
            for r in read_rows(
                driver,
                Q.GC_NODE_STATS,
                params,
                database=database,
                what="global circuit",
                timeout_s=max(left, 0.001),
            ):
                for key, n, sum_act in zip(r["key"], r["n"], r["sum_act"], strict=True):
                    acc = nodes.setdefault(key, [0, 0.0])
                    acc[0] += n
                    acc[1] += sum_act
    except StoreError as exc:
        if _timed_out(exc):
            raise StoreError(
                f"the global circuit over {len(prompts)} prompts did not finish within the query "
                f"timeout ({timeout_s:g} s): narrow --prompts or raise QUERY_TIMEOUT_S"
            ) from exc
        raise
    stats = [
        PairStat(s, t, int(a[0]), float(a[1]), float(a[2]), float(a[3]))
        for (s, t), a in sorted(pairs.items())
    ]
    circuit = prune(
        stats,
        {k: (int(v[0]), float(v[1])) for k, v in nodes.items()},
        len(prompts),
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        max_nodes=max_nodes,
        max_edges=max_edges,
    )
    names = key_names(reader, circuit.nodes, {FROM: from_, TO: to})
    return {
        "from": from_,
        "to": to,
        "filter": prompt_filter or "all",
        "n_prompts": len(prompts),
        "prompts": prompts,
        "nodes": [
            {"key": k, "name": names[k], "score": circuit.node_scores[k]} for k in circuit.nodes
        ],
        "edges": [
            {
                "source": e.source,
                "target": e.target,
                "source_name": names.get(e.source, e.source),
                "target_name": names.get(e.target, e.target),
                "n_prompts": e.n_prompts,
                "mean_w": e.mean_w,
                "era": e.era,
                "twera": e.twera,
                "score": e.score,
            }
            for e in circuit.edges
        ],
        "n_candidate_nodes": circuit.n_candidate_nodes,
        "n_candidate_edges": circuit.n_candidate_edges,
    }


def key_names(reader: _Reader, keys: list[str], fixed: dict[str, str]) -> dict[str, str]:
    """Display names of node keys: ``feature:L/I (label)``, ``token:'text'``, ``logit:'text'``,
    image cells as they are, ``fixed`` for the ends."""
    refs = sorted({k.split("|", 1)[1] for k in keys if "|" in k})
    info = {r["ref"]: r for r in reader.rows(Q.GC_REF_NAMES, {"refs": refs}, "naming nodes")}
    out = dict(fixed)
    for k in keys:
        if k in out:
            continue
        if "|" not in k:
            out[k] = k
            continue
        kind, ref = k.split("|", 1)
        r = info.get(ref) or {}
        if kind == "feature" and r.get("layer") is not None:
            name = f"feature:{r['layer']}/{r['index']}"
            out[k] = f"{name} ({r['label']})" if r.get("label") else name
        elif r.get("token") is not None:
            out[k] = f"{kind}:{r['token']!r}"
        else:
            out[k] = f"{kind}:{ref}"
    return out
