"""Ingestion of attribution graphs into Neo4j.

One prompt is one write transaction (:func:`atlas.store.connection.write_tx`), so a prompt becomes
visible only once all of it is written; a crash or a killed ingester leaves nothing (the server
rolls the open transaction back). The first statement claims the prompt with ``MERGE`` on its
unique id and takes its write lock: a second ingester of the same prompt waits, then sees
``complete = true`` and writes nothing. Ingesting a prompt twice therefore changes nothing, and
the aggregated feature layer (``AGG``) is updated exactly once per prompt. Deadlocks between
concurrent ingesters (shared ``Feature`` nodes) are transient errors that ``execute_write``
retries; the unit of work is idempotent, so a retry is safe.

Rows are written in ``UNWIND $rows`` batches of ``settings.ingest_batch_size``.

Aggregates (``AGG``) are looked up by their integer ``pair_key`` (an index seek, then a check of
both endpoints), never by a relationship ``MERGE`` between two high-degree ``Feature`` nodes
(popular features gather thousands of ``AGG`` relationships, and a MERGE scans them, at a cost
that grows with the atlas); a pair that does not exist yet is created. That is race-free:
``CLAIM_PROMPT`` takes the write lock of every feature of the prompt (in ``fid`` order, so
concurrent claims cannot deadlock on them) and holds it until commit, and any transaction that
creates or deletes an ``AGG`` needs the locks of both of its features.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import neo4j

from atlas.errors import ConfigError, InputError, StoreError
from atlas.graph import Graph, NodeKind
from atlas.interchange import read_json
from atlas.store import queries as Q
from atlas.store.connection import write_tx
from atlas.store.read import normalise_token_text

log = logging.getLogger(__name__)

KIND_NAMES = {kind: kind.text for kind in NodeKind}
#: node kind -> its second label (a fixed map: labels are never built from user input)
NODE_LABELS = {kind.text: kind.label for kind in NodeKind}


def feature_ref(tset: str, layer: int, index: int) -> str:
    """Global key of a feature: ``<transcoder set hash>/<layer>/<index>``."""
    return f"{tset}/{layer}/{index}"


def token_ref(model: str, token_id: int) -> str:
    """Global key of a vocabulary entry: ``<model name>/<token id>``."""
    return f"{model}/{token_id}"


@dataclass
class PromptRows:
    """Everything one prompt writes, as parameter rows (pure data, built without a database)."""

    prompt_id: str
    props: dict[str, Any]
    model: dict[str, Any]
    tset: dict[str, Any]
    features: list[dict[str, Any]]
    tokens: list[dict[str, Any]]
    nodes: dict[str, list[dict[str, Any]]]
    edges: list[tuple[int, int, float]]
    """(source idx, target idx, weight) of the kept edges."""
    agg: list[dict[str, Any]]
    """One row per (source feature, target feature) pair: ``{s, t, k, w, n}`` (``k``: the
    :func:`agg_pair_key`)."""
    n_nodes: int = 0
    n_edges_total: int = 0
    dropped_edges: int = field(default=0)
    image: dict[str, Any] | None = None
    """An image prompt's ``{"image": {sha256, width, height, format}, "tags", "tokens"}``
    (:func:`image_rows`); ``None`` for text."""


#: A callback run at the end of a prompt's ingestion transaction: ``(tx, created)``.
InTransaction = Callable[[neo4j.ManagedTransaction, bool], None]


@dataclass(frozen=True)
class IngestResult:
    """What one ``ingest_graph`` call did."""

    prompt_id: str
    created: bool
    """False when the prompt was already in the atlas (nothing was written)."""
    n_nodes: int
    n_edges: int


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def graph_rows(
    graph: Graph,
    *,
    min_abs_weight: float = 0.0,
    max_edges: int | None = None,
    image_tags: Sequence[str] = (),
) -> PromptRows:
    """Turn a :class:`Graph` into the parameter rows of its ingestion (``image_tags``: tags of an
    image prompt's image, merged into its ``Image`` node).

    Raises :class:`InputError` for graphs that cannot be stored faithfully (duplicate node ids,
    non-finite weights, a logit or token without a vocabulary id).
    """
    meta = graph.metadata
    pid = graph.prompt_id
    tset = meta.transcoders.content_hash
    ids = graph.node_ids()
    if len(set(ids)) != len(ids):
        raise InputError(f"prompt {pid}: graph has duplicate node ids")
    nodes = _node_rows(graph, ids, tset, _token_texts(graph))
    edges = _kept_edges(graph, min_abs_weight=min_abs_weight, max_edges=max_edges)
    kinds = graph.kind.tolist()
    agg_rows = _aggregate_pairs(edges, kinds, nodes.refs, nodes.features)
    input_ids = graph.input_ids.tolist()
    props = {
        "text": meta.prompt,
        "tokens": list(meta.tokens),
        "input_ids": input_ids,
        "model": meta.model.name,
        "tset": tset,
        "image_sha256": meta.image_sha256,
        "n_nodes": graph.n_nodes,
        "n_edges": len(edges),
        "n_edges_total": graph.n_edges,
        "replacement_score": meta.replacement_score,
        "completeness_score": meta.completeness_score,
        "code_version": meta.code_version,
        "created_at": meta.created_at,
        "meta_json": meta.model_dump_json(),
    }
    return PromptRows(
        prompt_id=pid,
        props=props,
        model=meta.model.model_dump(mode="json"),
        tset={
            "hash": tset,
            "name": meta.transcoders.name,
            "kind": meta.transcoders.kind,
            "d_transcoder": meta.transcoders.d_transcoder,
        },
        features=sorted(nodes.features.values(), key=lambda r: r["fid"]),
        tokens=sorted(nodes.tokens.values(), key=lambda r: r["tid"]),
        nodes=nodes.by_kind,
        edges=edges,
        agg=agg_rows,
        n_nodes=graph.n_nodes,
        n_edges_total=graph.n_edges,
        dropped_edges=graph.n_edges - len(edges),
        image=image_rows(graph, image_tags),
    )


def _token_texts(graph: Graph) -> dict[int, str]:
    """Text of each vocabulary id the graph names: the prompt's tokens by position, then the
    logit texts the engine or the importer supplied (``extra["logit_tokens"]``), so that
    ``logit:TEXT`` finds logits whose token is not in the prompt."""
    meta = graph.metadata
    text_by_id: dict[int, str] = {}
    for tid, text in zip(graph.input_ids.tolist(), meta.tokens, strict=False):
        text_by_id.setdefault(int(tid), text)
    logit_texts = meta.extra.get("logit_tokens")
    kinds = graph.kind.tolist()
    tok_ids = graph.token_id.tolist()
    logit_pos = [i for i, k in enumerate(kinds) if k == NodeKind.LOGIT]
    if isinstance(logit_texts, list) and len(logit_texts) == len(logit_pos):
        for i, ltext in zip(logit_pos, logit_texts, strict=True):
            if isinstance(ltext, str):
                text_by_id[int(tok_ids[i])] = ltext
    return text_by_id


@dataclass
class _Nodes:
    """Per-node rows by kind, the global entities they are instances of, and each node's ref."""

    by_kind: dict[str, list[dict[str, Any]]]
    features: dict[str, dict[str, Any]]
    tokens: dict[str, dict[str, Any]]
    refs: list[str | None]


def _node_rows(graph: Graph, ids: list[str], tset: str, texts: dict[int, str]) -> _Nodes:
    """One row per node, plus its global ``Feature`` (max activation over the prompt's
    instances) or ``Token`` entity; error nodes have no entity."""
    pid = graph.prompt_id
    model_name = graph.metadata.model.name
    raw_labels = graph.metadata.extra.get("labels")
    labels: dict[str, Any] = raw_labels if isinstance(raw_labels, dict) else {}
    layers, poss = graph.layer.tolist(), graph.pos.tolist()
    feats, tok_ids = graph.feature.tolist(), graph.token_id.tolist()
    acts, infl, probs = (
        graph.activation.tolist(),
        graph.influence.tolist(),
        graph.logit_prob.tolist(),
    )
    out = _Nodes({k: [] for k in NODE_LABELS}, {}, {}, [])
    for i, k in enumerate(graph.kind.tolist()):
        kind = KIND_NAMES[NodeKind(k)]
        ref: str | None = None
        if kind == "feature":
            ref = feature_ref(tset, layers[i], feats[i])
            act = float(acts[i]) if math.isfinite(acts[i]) else 0.0
            row = out.features.get(ref)
            if row is None:
                label = labels.get(ids[i])
                out.features[ref] = {
                    "fid": ref,
                    "tset": tset,
                    "layer": layers[i],
                    "index": feats[i],
                    "act": act,
                    "label": label if isinstance(label, str) else None,
                }
            else:
                row["act"] = max(row["act"], act)
        elif kind in ("token", "logit", "image"):
            if tok_ids[i] < 0:
                raise InputError(f"prompt {pid}: {kind} node {ids[i]} has no vocabulary id")
            ref = token_ref(model_name, tok_ids[i])
            text = texts.get(int(tok_ids[i]))
            out.tokens.setdefault(
                ref,
                {
                    "tid": ref,
                    "model": model_name,
                    "token_id": tok_ids[i],
                    "text": text,
                    "text_norm": normalise_token_text(text) if text is not None else None,
                },
            )
        out.refs.append(ref)
        out.by_kind[kind].append(
            {
                "id": ids[i],
                "idx": i,
                "kind": kind,
                "ref": ref,
                "layer": layers[i],
                "pos": poss[i],
                "feature": feats[i],
                "token_id": tok_ids[i],
                "activation": _finite_or_none(acts[i]),
                "influence": _finite_or_none(infl[i]),
                "logit_prob": _finite_or_none(probs[i]),
            }
        )
    return out


#: Patches of each image token's rollout map kept on its node (the rest stay in the artifact).
ROLLOUT_TOP_PATCHES = 8


def image_rows(graph: Graph, tags: Sequence[str] = ()) -> dict[str, Any] | None:
    """The ``Image`` and the image-token fields of an image prompt (``None`` for text).

    Each soft token keeps its grid cell, ``k`` and a compact rollout summary: its
    :data:`ROLLOUT_TOP_PATCHES` strongest patches (flat ``row * patch_cols + col`` on the
    patch grid) and their weights, so a query can say which part of the picture a node shows.
    """
    meta = graph.metadata.image
    if meta is None or graph.image_positions is None or graph.image_grid is None:
        return None
    grid = graph.image_grid.tolist()
    tokens = []
    for k, pos in enumerate(graph.image_positions.tolist()):
        row = {"pos": pos, "row": grid[k][0], "col": grid[k][1], "k": k}
        row |= _rollout_summary(graph, k)
        tokens.append(row)
    image = {
        "sha256": meta.sha256,
        "width": meta.width,
        "height": meta.height,
        "format": meta.format,
    }
    return {"image": image, "tags": sorted(set(tags)), "tokens": tokens}


def _rollout_summary(graph: Graph, k: int) -> dict[str, Any]:
    """Top patches of image token ``k``'s rollout map (empty without maps)."""
    maps = graph.rollout
    if maps is None:
        return {"top_patches": None, "top_weights": None, "patch_cols": None}
    flat = maps[k].flatten()
    n = min(ROLLOUT_TOP_PATCHES, int(flat.numel()))
    values, index = flat.topk(n)
    return {
        "top_patches": [int(i) for i in index.tolist()],
        "top_weights": [float(v) for v in values.tolist()],
        "patch_cols": int(maps.shape[-1]),
    }


def _kept_edges(
    graph: Graph, *, min_abs_weight: float, max_edges: int | None
) -> list[tuple[int, int, float]]:
    """``(source, target, weight)`` of the edges kept by the weight and count filters, in the
    graph's order (the largest ``|weight|`` win when ``max_edges`` cuts)."""
    src = graph.edge_source.tolist()
    tgt = graph.edge_target.tolist()
    wts = graph.edge_weight.tolist()
    if not all(math.isfinite(w) for w in wts):
        raise InputError(f"prompt {graph.prompt_id}: non-finite edge weight")
    order = list(range(len(wts)))
    if min_abs_weight > 0:
        order = [j for j in order if abs(wts[j]) >= min_abs_weight]
    if max_edges is not None and len(order) > max_edges:
        order = sorted(order, key=lambda j: -abs(wts[j]))[:max_edges]
        order.sort()
    return [(src[j], tgt[j], float(wts[j])) for j in order]


def _aggregate_pairs(
    edges: list[tuple[int, int, float]],
    kinds: list[int],
    refs: list[str | None],
    features: dict[str, dict[str, Any]],
) -> list[dict[str, Any]]:
    """One ``{s, t, k, w, n}`` row per (source feature, target feature) pair of the prompt:
    weights summed over positions, in key order (the aggregate lookups then walk the
    ``pair_key`` index in order)."""
    agg: dict[tuple[str, str], list[float]] = {}
    for s, t, w in edges:
        rs, rt = refs[s], refs[t]
        if kinds[s] == NodeKind.FEATURE and kinds[t] == NodeKind.FEATURE and rs and rt:
            acc = agg.setdefault((rs, rt), [0.0, 0.0])
            acc[0] += w
            acc[1] += 1.0
    rows = (
        {
            "s": s,
            "t": t,
            "k": agg_pair_key(
                features[s]["layer"],
                features[s]["index"],
                features[t]["layer"],
                features[t]["index"],
            ),
            "w": acc[0],
            "n": int(acc[1]),
        }
        for (s, t), acc in agg.items()
    )
    return sorted(rows, key=lambda r: (r["k"], r["s"], r["t"]))


def _chunks(rows: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


#: bits of a feature's layer / index in :func:`agg_pair_key` (larger values wrap)
_LAYER_BITS = Q.PAIR_KEY_LAYER_BITS
_INDEX_BITS = Q.PAIR_KEY_INDEX_BITS


def agg_pair_key(src_layer: int, src_index: int, dst_layer: int, dst_index: int) -> int:
    """Index key of an aggregate ``AGG`` relationship (``queries.pair_key_expr`` and
    schema/0005 compute the same in Cypher).

    ``(src layer, src index, dst layer, dst index)`` packed into 54 bits, so keys sort by source
    feature. Not unique: transcoder sets of one shape share keys, and layers >= 128 or indices
    >= 2**20 wrap, so a lookup also checks both endpoints. Layers and indices are non-negative.
    """
    feature_bits = _LAYER_BITS + _INDEX_BITS

    def code(layer: int, index: int) -> int:
        return (layer % (1 << _LAYER_BITS)) << _INDEX_BITS | index % (1 << _INDEX_BITS)

    return code(src_layer, src_index) << feature_bits | code(dst_layer, dst_index)


def write_prompt(tx: neo4j.ManagedTransaction, rows: PromptRows, batch: int) -> bool:
    """The unit of work of one prompt inside ``tx`` (idempotent; rerun whole on transient
    errors); True when it wrote the prompt, False when the prompt was already stored. Public so
    that ``bench/store.py`` can time its statements one by one."""
    pid = rows.prompt_id
    claim = tx.run(
        Q.CLAIM_PROMPT,
        id=pid,
        model=rows.model,
        tset=rows.tset,
        props=rows.props,
        features=rows.features,
        tokens=rows.tokens,
    ).single()
    if claim is None or claim["complete"]:
        return False
    if claim["existed"]:  # leftovers of an incomplete prompt (cannot exist when atomic)
        while True:
            rec = tx.run(Q.DELETE_PROMPT_NODES, id=pid, batch=batch).single()
            if rec is None or rec["deleted"] == 0:
                break
    entity_eids: dict[str, str] = dict(claim["features"]) | dict(claim["tokens"])
    node_rows = sorted(
        (
            {
                **r,
                "label": NODE_LABELS[kind],
                "ent": entity_eids.get(r["ref"]) if r["ref"] else None,
            }
            for kind, rs in rows.nodes.items()
            for r in rs
        ),
        key=lambda r: r["idx"],
    )
    if [r["idx"] for r in node_rows] != list(range(rows.n_nodes)):
        raise StoreError(f"prompt {pid}: node rows are not indexed 0..{rows.n_nodes - 1}")
    edge_chunks = list(_chunks(rows.edges, batch)) or [[]]
    first = edge_chunks[0]
    rec = tx.run(
        Q.CREATE_NODES_AND_EDGES,
        rows=node_rows,
        prompt=pid,
        src=[e[0] for e in first],
        tgt=[e[1] for e in first],
        w=[e[2] for e in first],
    ).single()
    if rows.n_nodes and (rec is None or rec["n_nodes"] != rows.n_nodes):
        got = 0 if rec is None else rec["n_nodes"]
        raise StoreError(f"prompt {pid}: wrote {got} of {rows.n_nodes} nodes")
    for chunk in edge_chunks[1:]:
        tx.run(
            Q.CREATE_MORE_EDGES,
            prompt=pid,
            src=[e[0] for e in chunk],
            tgt=[e[1] for e in chunk],
            w=[e[2] for e in chunk],
        ).consume()
    agg_rows = [
        {
            "k": r["k"],
            "a": entity_eids[r["s"]],
            "b": entity_eids[r["t"]],
            "w": r["w"],
        }
        for r in rows.agg
    ]
    agg_chunks = list(_chunks(agg_rows, batch)) or [[]]
    for chunk in agg_chunks[:-1]:
        tx.run(Q.UPDATE_FEATURE_AGG, rows=chunk).consume()
    if rows.image is not None:
        tx.run(Q.WRITE_PROMPT_IMAGE, prompt=pid, **rows.image).consume()
    # the last batch, the supernode aggregate and the ``complete`` flag: one statement
    tx.run(Q.FINISH_PROMPT, id=pid, rows=agg_chunks[-1]).consume()
    return True


def _delete_prompt(tx: neo4j.ManagedTransaction, pid: str, batch: int) -> bool:
    exists = tx.run(Q.PROMPT_ANY_STATE, id=pid).single()
    if exists is None:
        return False
    names = [r["name"] for r in tx.run(Q.PROMPT_SUPERNODES, id=pid)]
    tx.run(Q.DELETE_PROMPT_AGG, id=pid).consume()
    tx.run(Q.DELETE_PROMPT_FEATURE_STATS, id=pid).consume()
    while True:
        rec = tx.run(Q.DELETE_PROMPT_NODES, id=pid, batch=batch).single()
        if rec is None or rec["deleted"] == 0:
            break
    tx.run(Q.DELETE_PROMPT_NODE, id=pid).consume()
    for name in names:  # supernode aggregates touched by the prompt: rebuilt without it
        tx.run(Q.CLEAR_SUPERNODE_AGG, name=name).consume()
        tx.run(Q.REBUILD_SUPERNODE_AGG_OUT, name=name).consume()
        tx.run(Q.REBUILD_SUPERNODE_AGG_IN, name=name).consume()
    return True


def delete_prompt(
    driver: neo4j.Driver, prompt_id: str, *, database: str | None = None, batch_size: int = 5000
) -> bool:
    """Remove a stored prompt and its contribution to every aggregate (one transaction).

    Returns False when no such prompt is stored. Used for forced re-ingestion.
    """
    return bool(
        write_tx(
            driver,
            lambda tx: _delete_prompt(tx, prompt_id, batch_size),
            database=database,
            what=f"deleting prompt {prompt_id}",
        )
    )


def ingest_graph(
    driver: neo4j.Driver,
    graph: Graph,
    *,
    database: str | None = None,
    batch_size: int = 5000,
    min_abs_weight: float = 0.0,
    max_edges: int | None = None,
) -> IngestResult:
    """Store one graph (one transaction). Idempotent: a prompt already stored is left as is."""
    rows = graph_rows(graph, min_abs_weight=min_abs_weight, max_edges=max_edges)
    return ingest_rows(driver, rows, database=database, batch_size=batch_size)


def ingest_rows(
    driver: neo4j.Driver,
    rows: PromptRows,
    *,
    database: str | None = None,
    batch_size: int = 5000,
) -> IngestResult:
    """Write prepared rows (see :func:`graph_rows`) as one transaction."""
    return ingest_many(driver, [(rows, None)], database=database, batch_size=batch_size)[0]


def ingest_many(
    driver: neo4j.Driver,
    prompts: Sequence[tuple[PromptRows, InTransaction | None]],
    *,
    database: str | None = None,
    batch_size: int = 5000,
) -> list[IngestResult]:
    """Write several prompts in ONE transaction (each prompt's ``in_transaction`` callback runs
    right after it, in the same transaction).

    All of them become visible together or none does, so each is still atomic; claims make it
    idempotent per prompt. Fewer, larger transactions cost less per prompt (one commit, fewer
    round trips): the ingest worker writes an attribute chunk this way.
    """
    if batch_size < 1:
        raise ConfigError("ingest batch size must be >= 1")
    if not prompts:
        return []

    def work(tx: neo4j.ManagedTransaction) -> list[bool]:
        created = []
        for rows, hook in prompts:
            done = write_prompt(tx, rows, batch_size)
            if hook is not None:
                hook(tx, done)
            created.append(done)
        return created

    what = (
        f"ingesting prompt {prompts[0][0].prompt_id}"
        if len(prompts) == 1
        else f"ingesting {len(prompts)} prompts ({prompts[0][0].prompt_id}, ...)"
    )
    created = write_tx(driver, work, database=database, what=what)
    results = []
    for (rows, _), was_created in zip(prompts, created, strict=True):
        if was_created:
            log.info(
                "ingested prompt %s: %d nodes, %d edges",
                rows.prompt_id,
                rows.n_nodes,
                len(rows.edges),
            )
        else:
            log.info("prompt %s already stored; nothing written", rows.prompt_id)
        results.append(
            IngestResult(rows.prompt_id, bool(was_created), rows.n_nodes, len(rows.edges))
        )
    return results


def load_graph_file(path: str | Path) -> Graph:
    """Read a graph from an artifact (``.safetensors``) or an interchange JSON file (``.json``)."""
    path = Path(path)
    if path.suffix == ".json":
        return read_json(path)
    if path.suffix == ".safetensors":
        return Graph.load(path)
    raise InputError(f"{path}: expected a .safetensors artifact or a .json interchange graph")


def ingest_path(
    driver: neo4j.Driver,
    path: str | Path,
    *,
    database: str | None = None,
    batch_size: int = 5000,
    min_abs_weight: float = 0.0,
    max_edges: int | None = None,
) -> IngestResult:
    """Load a graph file (artifact or interchange JSON) and ingest it."""
    graph = load_graph_file(path)
    return ingest_graph(
        driver,
        graph,
        database=database,
        batch_size=batch_size,
        min_abs_weight=min_abs_weight,
        max_edges=max_edges,
    )
