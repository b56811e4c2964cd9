"""Named read queries over the atlas (the Cypher itself lives in :mod:`atlas.store.queries`).

Every function takes the driver (never a global), runs in a READ transaction with a server-side
timeout and returns plain dicts/lists ready for tables or JSON.

Endpoint specs (``atlas query paths --from X --to Y``):

    supernode:NAME      every instance of the supernode's member features
    feature:LAYER/INDEX every instance of that feature (any transcoder set)
    token:TEXT          input-token nodes whose text, whitespace-stripped, equals TEXT
    logit:TEXT          logit nodes whose token text, whitespace-stripped, equals TEXT
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import neo4j
import neo4j.exceptions
import torch

from atlas.errors import InputError
from atlas.graph import Graph, GraphMetadata, NodeKind
from atlas.store import queries as Q
from atlas.store.ingest import normalise_token_text, translate_neo4j_error

DEFAULT_TIMEOUT_S = 30.0


def run_read(
    driver: neo4j.Driver,
    text: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    what: str = "query",
) -> list[dict[str, Any]]:
    """Run one read query in a READ transaction and return its records as dicts."""

    @neo4j.unit_of_work(timeout=timeout_s)
    def work(tx: neo4j.ManagedTransaction) -> list[dict[str, Any]]:
        return [rec.data() for rec in tx.run(text, params or {})]

    try:
        with driver.session(database=database) as session:
            return session.execute_read(work)
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError) as exc:
        raise translate_neo4j_error(exc, what) from exc


# --------------------------------------------------------------------------- endpoints
@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint: node kind plus the global refs its instances carry."""

    spec: str
    kind: str
    refs: list[str]


_SPEC = re.compile(r"^(supernode|feature|token|logit):(.*)$", re.DOTALL)
_FEATURE = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def resolve_endpoint(
    driver: neo4j.Driver, spec: str, *, database: str | None = None, timeout_s: float = 30.0
) -> Endpoint:
    """Resolve ``supernode:NAME`` / ``feature:L/I`` / ``token:TEXT`` / ``logit:TEXT``."""
    m = _SPEC.match(spec)
    if m is None:
        raise InputError(
            f"bad endpoint {spec!r}: use supernode:NAME, feature:LAYER/INDEX, token:TEXT or logit:TEXT"
        )
    kind, arg = m.group(1), m.group(2)
    kw: dict[str, Any] = {"database": database, "timeout_s": timeout_s, "what": f"resolving {spec}"}
    if kind == "feature":
        fm = _FEATURE.match(arg)
        if fm is None:
            raise InputError(f"bad feature {arg!r}: use feature:LAYER/INDEX, e.g. feature:3/1024")
        rows = run_read(
            driver,
            Q.FEATURES_BY_LAYER_INDEX,
            {"layer": int(fm.group(1)), "index": int(fm.group(2))},
            **kw,
        )
        return Endpoint(spec, "feature", [r["ref"] for r in rows])
    if kind == "supernode":
        from atlas.store.supernodes import validate_name

        name = validate_name(arg)
        if not run_read(driver, Q.SUPERNODE_EXISTS, {"name": name}, **kw):
            raise InputError(f"no supernode named {name!r}")
        rows = run_read(driver, Q.SUPERNODE_MEMBERS, {"name": name}, **kw)
        return Endpoint(spec, "feature", [r["ref"] for r in rows])
    text = normalise_token_text(arg)
    if not text:
        raise InputError(f"empty token text in {spec!r}")
    rows = run_read(driver, Q.TOKENS_BY_TEXT, {"text": text}, **kw)
    return Endpoint(spec, kind, [r["ref"] for r in rows])


def _ref_texts(
    driver: neo4j.Driver, refs: set[str], database: str | None, timeout_s: float
) -> dict[str, str]:
    """Display names of global refs: ``feature:L/I (label)`` or the token's text (quoted)."""
    if not refs:
        return {}
    rows = run_read(
        driver,
        Q.REF_TEXTS,
        {"refs": sorted(refs)},
        database=database,
        timeout_s=timeout_s,
        what="naming nodes",
    )
    names: dict[str, str] = {}
    for r in rows:
        if r["is_token"]:
            names[r["ref"]] = repr(r["text"]) if r["text"] is not None else r["ref"]
        elif r["layer"] is not None:
            name = f"feature:{r['layer']}/{r['index']}"
            names[r["ref"]] = f"{name} ({r['text']})" if r["text"] else name
    return names


def describe_ref(ref: str, names: dict[str, str]) -> str:
    """Human name of a global ref (see :func:`_ref_texts`); ``error:L`` and unknowns as is."""
    return names.get(ref, ref)


# --------------------------------------------------------------------------- paths
def paths(
    driver: neo4j.Driver,
    source: str,
    target: str,
    *,
    max_hops: int = 4,
    min_weight: float = 0.0,
    limit: int = 50,
    cap: int = 10_000,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Every directed path of 1..max_hops edges within one prompt from ``source`` to ``target``.

    Returns ``{"paths": [{"prompt", "nodes", "weights", "score"}], "aggregate": [...],
    "truncated": bool}``. ``score`` is the product of the path's edge weights (its signed
    direct-effect product); paths are sorted by ``|score|``. ``aggregate`` groups paths by the
    sequence of global entities they visit (feature, error layer, token/logit text) across
    prompts: ``{"route", "n_prompts", "n_paths", "sum_score"}``. At most ``cap`` paths are
    enumerated (``truncated`` says when the cap was hit).
    """
    if not 1 <= max_hops <= Q.PATHS_MAX_HOPS:
        raise InputError(f"max hops must be between 1 and {Q.PATHS_MAX_HOPS}")
    if not math.isfinite(min_weight) or min_weight < 0:
        raise InputError("min weight must be a finite number >= 0")
    if limit < 1:
        raise InputError("limit must be >= 1")
    src = resolve_endpoint(driver, source, database=database, timeout_s=timeout_s)
    dst = resolve_endpoint(driver, target, database=database, timeout_s=timeout_s)
    if not src.refs or not dst.refs:
        return {"paths": [], "aggregate": [], "truncated": False}
    rows = run_read(
        driver,
        Q.PATHS[max_hops],
        {
            "from_refs": src.refs,
            "from_kind": src.kind,
            "to_refs": dst.refs,
            "to_kind": dst.kind,
            "min_weight": float(min_weight),
            "cap": cap + 1,
        },
        database=database,
        timeout_s=timeout_s,
        what="paths query",
    )
    truncated = len(rows) > cap
    rows = rows[:cap]
    found = []
    for r in rows:
        score = math.prod(r["weights"])
        found.append(
            {
                "prompt": r["prompt"],
                "nodes": r["nodes"],
                "weights": r["weights"],
                "score": score,
                "_refs": r["refs"],
            }
        )
    found.sort(key=lambda p: (-abs(p["score"]), p["prompt"], p["nodes"]))
    refs = {ref for p in found for ref in p["_refs"] if not ref.startswith("error:")}
    texts = _ref_texts(driver, refs, database, timeout_s)
    groups: dict[tuple[str, ...], dict[str, Any]] = {}
    for p in found:
        route = tuple(describe_ref(ref, texts) for ref in p.pop("_refs"))
        g = groups.setdefault(
            route, {"route": list(route), "prompts": set(), "n_paths": 0, "sum_score": 0.0}
        )
        g["prompts"].add(p["prompt"])
        g["n_paths"] += 1
        g["sum_score"] += p["score"]
    aggregate = [
        {
            "route": g["route"],
            "n_prompts": len(g["prompts"]),
            "n_paths": g["n_paths"],
            "sum_score": g["sum_score"],
        }
        for g in groups.values()
    ]
    aggregate.sort(key=lambda g: (-abs(g["sum_score"]), g["route"]))
    return {"paths": found[:limit], "aggregate": aggregate, "truncated": truncated}


# --------------------------------------------------------------------------- other named queries
def active_prompts(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 50,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Prompts where a feature (``feature:L/I``) or supernode (``supernode:NAME``) is active."""
    ep = resolve_endpoint(driver, spec, database=database, timeout_s=timeout_s)
    if ep.kind != "feature":
        raise InputError("active prompts take feature:L/I or supernode:NAME")
    return run_read(
        driver,
        Q.ACTIVE_PROMPTS,
        {"refs": ep.refs, "limit": limit},
        database=database,
        timeout_s=timeout_s,
        what="active prompts",
    )


def top_contributors(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 20,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Sources with the largest summed |direct effect| on a logit (``logit:TEXT``) across prompts."""
    if not spec.startswith("logit:"):
        spec = "logit:" + spec
    ep = resolve_endpoint(driver, spec, database=database, timeout_s=timeout_s)
    rows = run_read(
        driver,
        Q.TOP_CONTRIBUTORS,
        {"refs": ep.refs, "limit": limit},
        database=database,
        timeout_s=timeout_s,
        what="top contributors",
    )
    texts = _ref_texts(driver, {r["source"] for r in rows}, database, timeout_s)
    for r in rows:
        r["name"] = describe_ref(r["source"], texts)
    return rows


def neighbours(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 20,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Aggregated neighbours (over all prompts) of a feature or a supernode."""
    kw: dict[str, Any] = {"database": database, "timeout_s": timeout_s, "what": "neighbours"}
    if spec.startswith("supernode:"):
        from atlas.store.supernodes import validate_name

        name = validate_name(spec.split(":", 1)[1])
        return run_read(driver, Q.SUPERNODE_NEIGHBOURS, {"name": name, "limit": limit}, **kw)
    ep = resolve_endpoint(driver, spec, database=database, timeout_s=timeout_s)
    if ep.kind != "feature":
        raise InputError("neighbours take feature:L/I or supernode:NAME")
    out: list[dict[str, Any]] = []
    for ref in ep.refs:
        out.extend(run_read(driver, Q.FEATURE_NEIGHBOURS, {"fid": ref, "limit": limit}, **kw))
    out.sort(key=lambda r: (-r["n_prompts"], -abs(r["sum_w"])))
    return out[:limit]


def resolve_prompt(
    driver: neo4j.Driver, prefix: str, *, database: str | None = None, timeout_s: float = 30.0
) -> str:
    """Full id of a stored prompt from its id or a unique prefix of it."""
    if not prefix or not re.fullmatch(r"[0-9a-f]+", prefix):
        raise InputError(f"bad prompt id {prefix!r}: expected hexadecimal")
    rows = run_read(
        driver,
        Q.FIND_PROMPT_BY_PREFIX,
        {"prefix": prefix},
        database=database,
        timeout_s=timeout_s,
        what="finding prompt",
    )
    if not rows:
        raise InputError(f"no stored prompt with id {prefix!r}")
    if len(rows) > 1:
        raise InputError(f"prompt id prefix {prefix!r} is ambiguous")
    return str(rows[0]["id"])


def prompt_supernode_graph(
    driver: neo4j.Driver,
    prompt: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """One prompt collapsed to supernodes (+ its token and logit nodes): summed edges."""
    pid = resolve_prompt(driver, prompt, database=database, timeout_s=timeout_s)
    return run_read(
        driver,
        Q.PROMPT_SUPERNODE_GRAPH,
        {"id": pid},
        database=database,
        timeout_s=timeout_s,
        what="supernode graph",
    )


def compare_prompts(
    driver: neo4j.Driver,
    a: str,
    b: str,
    *,
    limit: int = 50,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """Two prompts side by side: shared / exclusive features and shared feature edges."""
    pa = resolve_prompt(driver, a, database=database, timeout_s=timeout_s)
    pb = resolve_prompt(driver, b, database=database, timeout_s=timeout_s)
    kw: dict[str, Any] = {"database": database, "timeout_s": timeout_s, "what": "compare"}
    feats = run_read(driver, Q.COMPARE_FEATURES, {"a": pa, "b": pb}, **kw)
    edges = run_read(driver, Q.COMPARE_EDGES, {"a": pa, "b": pb, "limit": limit}, **kw)
    texts = _ref_texts(driver, {f["ref"] for f in feats}, database, timeout_s)
    shared, only_a, only_b = [], [], []
    for f in feats:
        item = {"feature": describe_ref(f["ref"], texts), "act_a": f["act_a"], "act_b": f["act_b"]}
        if f["act_a"] is not None and f["act_b"] is not None:
            shared.append(item)
        elif f["act_a"] is not None:
            only_a.append(item)
        else:
            only_b.append(item)
    for lst in (shared, only_a, only_b):
        lst.sort(key=lambda x: -max(x["act_a"] or 0.0, x["act_b"] or 0.0))
    return {
        "a": pa,
        "b": pb,
        "shared_features": shared,
        "only_a": only_a[:limit],
        "only_b": only_b[:limit],
        "shared_edges": [
            {
                "source": describe_ref(e["source"], texts),
                "target": describe_ref(e["target"], texts),
                "w_a": e["w_a"],
                "w_b": e["w_b"],
            }
            for e in edges
        ],
    }


# --------------------------------------------------------------------------- export
def export_graph(
    driver: neo4j.Driver,
    prompt: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> tuple[Graph, dict[str, str]]:
    """Rebuild a stored prompt's :class:`Graph` (node order and values as ingested).

    Returns the graph and the feature labels by node id (for the interchange JSON ``clerp``).
    """
    graph, labels, _ = _export(driver, prompt, database=database, timeout_s=timeout_s)
    return graph, labels


def _export(
    driver: neo4j.Driver, prompt: str, *, database: str | None, timeout_s: float
) -> tuple[Graph, dict[str, str], dict[int, str]]:
    pid = resolve_prompt(driver, prompt, database=database, timeout_s=timeout_s)
    kw: dict[str, Any] = {"database": database, "timeout_s": timeout_s, "what": f"export {pid}"}
    head = run_read(driver, Q.EXPORT_PROMPT, {"id": pid}, **kw)
    if not head:
        raise InputError(f"no stored prompt with id {pid!r}")
    meta = GraphMetadata.model_validate_json(head[0]["meta_json"])
    nodes = run_read(driver, Q.EXPORT_NODES, {"id": pid}, **kw)
    edges = run_read(driver, Q.EXPORT_EDGES, {"id": pid}, **kw)
    if [n["idx"] for n in nodes] != list(range(len(nodes))):
        raise InputError(f"prompt {pid}: stored node order is inconsistent")
    kinds = {
        "feature": NodeKind.FEATURE,
        "error": NodeKind.ERROR,
        "token": NodeKind.TOKEN,
        "logit": NodeKind.LOGIT,
    }

    def col(name: str, dtype: torch.dtype, nan: float = math.nan) -> torch.Tensor:
        return torch.tensor([nan if n[name] is None else n[name] for n in nodes], dtype=dtype)

    edges.sort(key=lambda e: (e["target"], e["source"]))
    input_ids = head[0]["input_ids"]
    graph = Graph(
        metadata=meta,
        input_ids=torch.tensor(input_ids or [], dtype=torch.int64),
        kind=torch.tensor([int(kinds[n["kind"]]) for n in nodes], dtype=torch.int8),
        layer=col("layer", torch.int32),
        pos=col("pos", torch.int32),
        feature=col("feature", torch.int64),
        token_id=col("token_id", torch.int64),
        activation=col("activation", torch.float32),
        influence=col("influence", torch.float32),
        logit_prob=col("logit_prob", torch.float32),
        edge_target=torch.tensor([e["target"] for e in edges], dtype=torch.int64),
        edge_source=torch.tensor([e["source"] for e in edges], dtype=torch.int64),
        edge_weight=torch.tensor([e["weight"] for e in edges], dtype=torch.float32),
    )
    labels = {n["id"]: n["label"] for n in nodes if n["label"]}
    token_texts = {
        int(n["token_id"]): n["token_text"] for n in nodes if n["token_text"] is not None
    }
    return graph, labels, token_texts


def export_json(
    driver: neo4j.Driver,
    prompt: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """A stored prompt as interchange JSON (labels and its supernodes included)."""
    from atlas.interchange import graph_to_json

    graph, labels, token_texts = _export(driver, prompt, database=database, timeout_s=timeout_s)
    supernodes = prompt_supernodes(driver, graph.prompt_id, database=database, timeout_s=timeout_s)
    known = {s[0] for s in graph.metadata.extra.get("supernodes") or []}
    merged = list(graph.metadata.extra.get("supernodes") or []) + [
        s for s in supernodes if s[0] not in known
    ]

    def decode(tid: int) -> str:
        return token_texts.get(tid, f"#{tid}")

    result: dict[str, Any] = graph_to_json(
        graph, labels=labels, supernodes=merged, token_decoder=decode
    )
    return result


def prompt_supernodes(
    driver: neo4j.Driver, pid: str, *, database: str | None = None, timeout_s: float = 30.0
) -> list[list[str]]:
    """``[[name, node_id, ...], ...]`` of the supernodes with members in one prompt."""
    rows = run_read(
        driver,
        Q.PROMPT_SUPERNODES,
        {"id": pid},
        database=database,
        timeout_s=timeout_s,
        what="prompt supernodes",
    )
    grouped: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        grouped[r["name"]].extend(sorted(r["ids"]))
    return [[name, *ids] for name, ids in grouped.items()]
