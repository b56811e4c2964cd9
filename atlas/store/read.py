"""Named read queries over the atlas (the Cypher itself lives in :mod:`atlas.store.queries`).

Every function takes the driver (never a global), runs in a READ transaction with a server-side
timeout (:func:`atlas.store.connection.read_rows`) and returns plain dicts/lists ready for
tables or JSON (:mod:`atlas.present`).

Endpoint specs (``atlas query paths --from X --to Y``):

    supernode:NAME      every instance of the supernode's member features
    feature:LAYER/INDEX every instance of that feature (any transcoder set)
    token:TEXT          input-token nodes whose text, whitespace-stripped, equals TEXT
    logit:TEXT          logit nodes whose token text, whitespace-stripped, equals TEXT
    image               (sources only) every image soft token of an image prompt
    image:ROW,COL       the soft token at that cell of the pooled grid
    image:R0-R1,C0-C1   the soft tokens in that box of cells (inclusive)

``image_tag`` (paths, image regions) keeps only the prompts whose image carries that tag.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import neo4j

from atlas.errors import InputError
from atlas.graph import NodeKind
from atlas.store import queries as Q
from atlas.store.connection import read_rows

if TYPE_CHECKING:
    from atlas.graph import Graph

DEFAULT_TIMEOUT_S = 30.0


def normalise_token_text(text: str) -> str:
    """Token text as matched by ``token:TEXT`` / ``logit:TEXT``: surrounding whitespace stripped
    (ingestion stores it so, as ``Token.text_norm``)."""
    return text.strip()


#: ``LAYER/INDEX`` of a feature (``feature:3/1024``; spaces around the slash allowed)
FEATURE_SPEC = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


def parse_feature(arg: str) -> tuple[int, int]:
    """``(layer, index)`` of a ``LAYER/INDEX`` spec, or :class:`InputError`."""
    m = FEATURE_SPEC.match(arg)
    if m is None:
        raise InputError(f"bad feature {arg!r}: use feature:LAYER/INDEX, e.g. feature:3/1024")
    return int(m.group(1)), int(m.group(2))


@dataclass(frozen=True)
class _Reader:
    """A driver with the caller's database and timeout, so the helpers below run named queries
    without repeating them."""

    driver: neo4j.Driver
    database: str | None
    timeout_s: float

    def rows(self, text: str, params: dict[str, Any], what: str) -> list[dict[str, Any]]:
        """The records of one read query with this reader's database and timeout."""
        return read_rows(
            self.driver, text, params, database=self.database, timeout_s=self.timeout_s, what=what
        )

    def refs(self, text: str, params: dict[str, Any], what: str) -> list[str]:
        """The ``ref`` column of a query's rows."""
        return [r["ref"] for r in self.rows(text, params, what)]


# --------------------------------------------------------------------------- endpoints
@dataclass(frozen=True)
class Endpoint:
    """A resolved endpoint: node kind plus the global refs its instances carry."""

    spec: str
    kind: str
    refs: list[str]


_SPEC = re.compile(r"^(supernode|feature|token|logit):(.*)$", re.DOTALL)


def _resolve_endpoint(reader: _Reader, spec: str) -> Endpoint:
    """Resolve ``supernode:NAME`` / ``feature:L/I`` / ``token:TEXT`` / ``logit:TEXT``."""
    m = _SPEC.match(spec)
    if m is None:
        raise InputError(
            f"bad endpoint {spec!r}: use supernode:NAME, feature:LAYER/INDEX, token:TEXT or logit:TEXT"
        )
    kind, arg = m.group(1), m.group(2)
    what = f"resolving {spec}"
    if kind == "feature":
        layer, index = parse_feature(arg)
        params = {"layer": layer, "index": index}
        return Endpoint(spec, "feature", reader.refs(Q.FEATURES_BY_LAYER_INDEX, params, what))
    if kind == "supernode":
        name = _supernode_name(arg)
        if not reader.rows(Q.SUPERNODE_EXISTS, {"name": name}, what):
            raise InputError(f"no supernode named {name!r}")
        return Endpoint(spec, "feature", reader.refs(Q.SUPERNODE_MEMBERS, {"name": name}, what))
    text = normalise_token_text(arg)
    if not text:
        raise InputError(f"empty token text in {spec!r}")
    return Endpoint(spec, kind, reader.refs(Q.TOKENS_BY_TEXT, {"text": text}, what))


def _supernode_name(arg: str) -> str:
    """A validated supernode name (imported late: :mod:`atlas.store.supernodes` imports this)."""
    from atlas.store.supernodes import validate_name

    return validate_name(arg)


def _feature_refs(reader: _Reader, spec: str, usage: str) -> list[str]:
    """Refs of an endpoint that must name features (``usage`` is the error otherwise)."""
    ep = _resolve_endpoint(reader, spec)
    if ep.kind != "feature":
        raise InputError(usage)
    return ep.refs


def _ref_texts(reader: _Reader, refs: set[str]) -> dict[str, str]:
    """Display names of global refs: ``feature:L/I (label)`` or the token's text (quoted)."""
    if not refs:
        return {}
    names: dict[str, str] = {}
    for r in reader.rows(Q.REF_TEXTS, {"refs": sorted(refs)}, "naming nodes"):
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
    image_tag: str | None = None,
    prompt_ids: Collection[str] | None = None,
) -> dict[str, Any]:
    """Every directed path of 1..max_hops edges within one prompt from ``source`` to ``target``
    (only in the prompts ``prompt_ids`` when given, and whose image has ``image_tag``).

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
    reader = _Reader(driver, database, timeout_s)
    ids = None if prompt_ids is None else sorted(set(prompt_ids))
    if _IMAGE_SPEC.match(source) or _IMAGE_SPEC.match(target):
        rows = _image_path_rows(reader, source, target, max_hops, min_weight, cap, image_tag, ids)
    else:
        if image_tag is not None:  # the tag narrows the prompts before the cap, in the query
            tagged = _tagged_ids(reader, image_tag)
            ids = sorted(tagged if ids is None else tagged & set(ids))
        src = _resolve_endpoint(reader, source)
        dst = _resolve_endpoint(reader, target)
        if not src.refs or not dst.refs:
            return {"paths": [], "aggregate": [], "truncated": False}
        params = {
            "from_refs": src.refs,
            "from_kind": src.kind,
            "to_refs": dst.refs,
            "to_kind": dst.kind,
            "min_weight": float(min_weight),
            "cap": cap + 1,
            "prompt_ids": ids,
        }
        rows = reader.rows(Q.PATHS[max_hops], params, "paths query")
    truncated = len(rows) > cap
    found = [
        {
            "prompt": r["prompt"],
            "nodes": r["nodes"],
            "weights": r["weights"],
            "score": math.prod(r["weights"]),
            "_refs": r["refs"],
        }
        for r in rows[:cap]
    ]
    found.sort(key=lambda p: (-abs(p["score"]), p["prompt"], p["nodes"]))
    refs = {ref for p in found for ref in p["_refs"] if not ref.startswith(("error:", "image:"))}
    aggregate = _aggregate_routes(found, _ref_texts(reader, refs))
    return {"paths": found[:limit], "aggregate": aggregate, "truncated": truncated}


def _aggregate_routes(found: list[dict[str, Any]], texts: dict[str, str]) -> list[dict[str, Any]]:
    """Group paths by their route of named global refs (popping each path's ``_refs``)."""
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
    return aggregate


# --------------------------------------------------------------------------- other named queries
def active_prompts(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 50,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    image_tag: str | None = None,
) -> list[dict[str, Any]]:
    """Prompts where a feature (``feature:L/I``) or supernode (``supernode:NAME``) is active
    (with ``image_tag``: among the prompts whose image carries it)."""
    reader = _Reader(driver, database, timeout_s)
    refs = _feature_refs(reader, spec, "active prompts take feature:L/I or supernode:NAME")
    # the tag narrows the prompts inside the query, before the row cap
    ids = None if image_tag is None else sorted(_tagged_ids(reader, image_tag))
    params = {"refs": refs, "limit": limit, "prompt_ids": ids}
    return reader.rows(Q.ACTIVE_PROMPTS, params, "active prompts")


def count_prompts(
    driver: neo4j.Driver, *, database: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S
) -> int:
    """Number of complete prompts in the atlas."""
    rows = read_rows(driver, Q.COUNT_PROMPTS, database=database, timeout_s=timeout_s, what="count")
    return int(rows[0]["n"]) if rows else 0


def list_prompts(
    driver: neo4j.Driver,
    *,
    limit: int = 20,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """The most recently ingested prompts (id, text, sizes, scores)."""
    return read_rows(
        driver,
        Q.LIST_PROMPTS,
        {"limit": limit},
        database=database,
        timeout_s=timeout_s,
        what="listing prompts",
    )


def prompt_texts(
    driver: neo4j.Driver,
    prompt_ids: list[str],
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, str]:
    """Text of each stored prompt by id (tables show prompts, not hashes)."""
    rows = read_rows(
        driver,
        Q.PROMPT_TEXTS,
        {"prompt_ids": list(prompt_ids)},
        database=database,
        timeout_s=timeout_s,
        what="prompt texts",
    )
    return {r["prompt_id"]: r["text"] or "" for r in rows}


def top_contributors(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 20,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    prompt_ids: Collection[str] | None = None,
) -> list[dict[str, Any]]:
    """Sources with the largest summed |direct effect| on a logit (``logit:TEXT``) across prompts
    (only the prompts ``prompt_ids`` when given)."""
    if not spec.startswith("logit:"):
        spec = "logit:" + spec
    reader = _Reader(driver, database, timeout_s)
    ep = _resolve_endpoint(reader, spec)
    ids = None if prompt_ids is None else sorted(prompt_ids)
    params = {"refs": ep.refs, "limit": limit, "prompt_ids": ids}
    rows = reader.rows(Q.TOP_CONTRIBUTORS, params, "top contributors")
    texts = _ref_texts(reader, {r["source"] for r in rows})
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
    reader = _Reader(driver, database, timeout_s)
    if spec.startswith("supernode:"):
        name = _supernode_name(spec.split(":", 1)[1])
        return reader.rows(Q.SUPERNODE_NEIGHBOURS, {"name": name, "limit": limit}, "neighbours")
    refs = _feature_refs(reader, spec, "neighbours take feature:L/I or supernode:NAME")
    out: list[dict[str, Any]] = []
    for ref in refs:
        out.extend(reader.rows(Q.FEATURE_NEIGHBOURS, {"fid": ref, "limit": limit}, "neighbours"))
    out.sort(key=lambda r: (-r["n_prompts"], -abs(r["sum_w"])))
    return out[:limit]


def _resolve_prompt(reader: _Reader, prefix: str) -> str:
    """Full id of a stored prompt from its id or a unique prefix of it."""
    if not prefix or not re.fullmatch(r"[0-9a-f]+", prefix):
        raise InputError(f"bad prompt id {prefix!r}: expected hexadecimal")
    rows = reader.rows(Q.FIND_PROMPT_BY_PREFIX, {"prefix": prefix}, "finding prompt")
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
    reader = _Reader(driver, database, timeout_s)
    pid = _resolve_prompt(reader, prompt)
    return reader.rows(Q.PROMPT_SUPERNODE_GRAPH, {"id": pid}, "supernode graph")


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
    reader = _Reader(driver, database, timeout_s)
    pa = _resolve_prompt(reader, a)
    pb = _resolve_prompt(reader, b)
    feats = reader.rows(Q.COMPARE_FEATURES, {"a": pa, "b": pb}, "compare")
    edges = reader.rows(Q.COMPARE_EDGES, {"a": pa, "b": pb, "limit": limit}, "compare")
    texts = _ref_texts(reader, {f["ref"] for f in feats})
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
    graph, labels, _ = _export(_Reader(driver, database, timeout_s), prompt)
    return graph, labels


_NODE_KINDS = {kind.text: kind for kind in NodeKind}


def _export(reader: _Reader, prompt: str) -> tuple[Graph, dict[str, str], dict[int, str]]:
    import torch

    from atlas.graph import Graph, GraphMetadata

    pid = _resolve_prompt(reader, prompt)
    what = f"export {pid}"
    head = reader.rows(Q.EXPORT_PROMPT, {"id": pid}, what)
    if not head:
        raise InputError(f"no stored prompt with id {pid!r}")
    meta = GraphMetadata.model_validate_json(head[0]["meta_json"])
    nodes = reader.rows(Q.EXPORT_NODES, {"id": pid}, what)
    edges = reader.rows(Q.EXPORT_EDGES, {"id": pid}, what)
    if [n["idx"] for n in nodes] != list(range(len(nodes))):
        raise InputError(f"prompt {pid}: stored node order is inconsistent")

    def col(name: str, dtype: torch.dtype, nan: float = math.nan) -> torch.Tensor:
        return torch.tensor([nan if n[name] is None else n[name] for n in nodes], dtype=dtype)

    edges.sort(key=lambda e: (e["target"], e["source"]))
    image = _export_image(reader, pid) if meta.image is not None else None
    input_ids = head[0]["input_ids"]
    graph = Graph.from_columns(
        meta,
        input_ids or [],
        {
            "kind": [int(_NODE_KINDS[n["kind"]]) for n in nodes],
            "layer": col("layer", torch.int32),
            "pos": col("pos", torch.int32),
            "feature": col("feature", torch.int64),
            "token_id": col("token_id", torch.int64),
            "activation": col("activation", torch.float32),
            "influence": col("influence", torch.float32),
            "logit_prob": col("logit_prob", torch.float32),
        },
        {key: [e[key] for e in edges] for key in ("target", "source", "weight")},
        image=image,
    )
    labels = {n["id"]: n["label"] for n in nodes if n["label"]}
    token_texts = {
        int(n["token_id"]): n["token_text"] for n in nodes if n["token_text"] is not None
    }
    return graph, labels, token_texts


def prompt_circuit(
    driver: neo4j.Driver,
    prompt: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """What a picture of a stored prompt needs: ``graph``, feature ``labels`` by node id,
    ``token_texts`` by vocabulary id and ``supernodes`` (``[[name, node_id, ...], ...]``)."""
    reader = _Reader(driver, database, timeout_s)
    graph, labels, token_texts = _export(reader, prompt)
    return {
        "graph": graph,
        "labels": labels,
        "token_texts": token_texts,
        "supernodes": _prompt_supernodes(reader, graph.prompt_id),
    }


def feature_card(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 8,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """A feature's card (``feature:L/I`` or ``L/I``; the first transcoder set's when several
    have it): ``name``, ``label``, logit-lens ``top_tokens``/``top_values``, ``snippets``
    (``{"text", "activation", "prompt"}``: the prompt's tokens around its top activations, the
    active one in brackets) and ``image_tops`` (``{"image", "row", "col", "activation",
    "prompt"}``: its top activations at image soft tokens)."""
    reader = _Reader(driver, database, timeout_s)
    spec = spec if spec.startswith("feature:") else "feature:" + spec
    refs = _feature_refs(reader, spec, "a card takes L/I or feature:L/I")
    if not refs:
        raise InputError(f"no stored feature {spec!r}")
    fid = sorted(refs)[0]
    props = reader.rows(Q.FEATURE_CARD, {"fid": fid}, "feature card")[0]
    tops = reader.rows(Q.TOP_ACTIVATIONS, {"fids": [fid], "limit": limit}, "feature card")
    texts = prompt_token_lists(reader, [t["prompt"] for r in tops for t in r["top"]])
    snippets = []
    for top in tops[0]["top"] if tops else []:
        toks = texts.get(top["prompt"], [])
        pos = int(top["pos"])
        here = f"[{toks[pos]}]" if pos < len(toks) else "[?]"
        window = [*toks[max(0, pos - 6) : pos], here, *toks[pos + 1 : pos + 3]]
        snippets.append(
            {"text": "".join(window), "activation": top["activation"], "prompt": top["prompt"]}
        )
    images = reader.rows(Q.TOP_IMAGE_ACTIVATIONS, {"fids": [fid], "limit": limit}, "feature card")
    image_tops = images[0]["top"] if images else []
    ids = sorted({t["prompt"] for t in image_tops})
    grids = {
        r["prompt"]: (r["rows"], r["cols"])
        for r in reader.rows(Q.IMAGE_GRID_SIZES, {"ids": ids}, "feature card")
    }
    for t in image_tops:
        t["grid"] = grids.get(t["prompt"])
    layer, index = props["layer"], props["index"]
    return {
        "name": f"feature:{layer}/{index}  ({fid})",
        "label": props["label"],
        "top_tokens": props["top_tokens"] or [],
        "top_values": props["top_values"] or [],
        "snippets": snippets,
        "image_tops": image_tops,
    }


def prompt_token_lists(reader: _Reader, prompt_ids: list[str]) -> dict[str, list[str]]:
    """The decoded tokens of each stored prompt by id."""
    if not prompt_ids:
        return {}
    rows = reader.rows(Q.PROMPT_TOKENS, {"ids": sorted(set(prompt_ids))}, "prompt tokens")
    return {r["id"]: list(r["tokens"] or []) for r in rows}


def export_json(
    driver: neo4j.Driver,
    prompt: str,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """A stored prompt as interchange JSON (labels and its supernodes included)."""
    from atlas.interchange import graph_to_json

    reader = _Reader(driver, database, timeout_s)
    graph, labels, token_texts = _export(reader, prompt)
    supernodes = _prompt_supernodes(reader, graph.prompt_id)
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


def _prompt_supernodes(reader: _Reader, pid: str) -> list[list[str]]:
    """``[[name, node_id, ...], ...]`` of the supernodes with members in one prompt."""
    grouped: dict[str, list[str]] = defaultdict(list)
    for r in reader.rows(Q.PROMPT_SUPERNODES, {"id": pid}, "prompt supernodes"):
        grouped[r["name"]].extend(sorted(r["ids"]))
    return [[name, *ids] for name, ids in grouped.items()]


# --------------------------------------------------------------------------- images
_IMAGE_SPEC = re.compile(r"^image(?::(.*))?$", re.DOTALL)
_CELL = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
#: Grid cells are far below this; it stands for "no upper bound" in a region.
_NO_LIMIT = 1 << 30


def parse_image_region(spec: str) -> tuple[int, int, int, int]:
    """``(row0, row1, col0, col1)`` (inclusive) of ``image``, ``image:ROW,COL`` or
    ``image:R0-R1,C0-C1``; :class:`InputError` otherwise."""
    m = _IMAGE_SPEC.match(spec)
    if m is None:
        raise InputError(
            f"bad image endpoint {spec!r}: use image, image:ROW,COL or image:R0-R1,C0-C1"
        )
    if m.group(1) is None:
        return 0, _NO_LIMIT, 0, _NO_LIMIT
    parts = m.group(1).split(",")
    cells = [_CELL.match(x) for x in parts] if len(parts) == 2 else []
    if len(cells) != 2 or not all(cells):
        raise InputError(
            f"bad image region {spec!r}: use image:ROW,COL or image:R0-R1,C0-C1 (grid cells)"
        )
    (r0, r1), (c0, c1) = (
        (int(c.group(1)), int(c.group(2) or c.group(1))) for c in cells if c is not None
    )
    if r1 < r0 or c1 < c0:
        raise InputError(f"bad image region {spec!r}: an empty box")
    return r0, r1, c0, c1


def _image_path_rows(
    reader: _Reader,
    source: str,
    target: str,
    max_hops: int,
    min_weight: float,
    cap: int,
    image_tag: str | None,
    prompt_ids: list[str] | None,
) -> list[dict[str, Any]]:
    """Path rows from image soft tokens (an image end is a source: nothing flows into one)."""
    if _IMAGE_SPEC.match(target):
        raise InputError("an image endpoint is a source only: use --from image")
    r0, r1, c0, c1 = parse_image_region(source)
    dst = _resolve_endpoint(reader, target)
    if not dst.refs:
        return []
    params = {
        "to_refs": dst.refs,
        "to_kind": dst.kind,
        "row0": r0,
        "row1": r1,
        "col0": c0,
        "col1": c1,
        "tag": image_tag,
        "min_weight": float(min_weight),
        "cap": cap + 1,
        "prompt_ids": prompt_ids,
    }
    return reader.rows(Q.IMAGE_PATHS[max_hops], params, "image paths query")


def _tagged_ids(reader: _Reader, image_tag: str) -> set[str]:
    """The prompts whose image carries ``image_tag``."""
    return {r["prompt"] for r in reader.rows(Q.PROMPTS_WITH_IMAGE_TAG, {"tag": image_tag}, "tag")}


def prompt_answers(
    driver: neo4j.Driver,
    prompt_ids: Collection[str],
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, tuple[str, float]]:
    """Each stored prompt's answer: the text of its most probable logit target and its
    probability."""
    reader = _Reader(driver, database, timeout_s)
    rows = reader.rows(Q.PF_ANSWERS, {"ids": sorted(prompt_ids)}, "prompt answers")
    return {r["id"]: (str(r["answer"]), float(r["prob"])) for r in rows if r["answer"] is not None}


def image_regions(
    driver: neo4j.Driver,
    spec: str,
    *,
    limit: int = 20,
    image_tag: str | None = None,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> list[dict[str, Any]]:
    """Which image regions feed a feature (``feature:L/I`` or ``supernode:NAME``), over every
    image prompt: the summed direct effect of each image's soft token at each grid cell on the
    feature's instances, with the cell's strongest rollout patches (``[row, col]`` on the patch
    grid) and their weights."""
    reader = _Reader(driver, database, timeout_s)
    refs = _feature_refs(reader, spec, "image regions take feature:L/I or supernode:NAME")
    params = {"refs": refs, "limit": limit, "tag": image_tag}
    rows = reader.rows(Q.IMAGE_REGIONS, params, "image regions")
    for r in rows:
        cols = r.pop("patch_cols")
        patches = r.pop("top_patches")
        r["top_patches"] = [[p // cols, p % cols] for p in patches] if patches and cols else []
    return rows


def _export_image(reader: _Reader, pid: str) -> dict[str, Any]:
    """The image tensors of a stored image prompt, from its image-token nodes (the rollout maps
    stay in the artifact: the store keeps their summary)."""
    import torch

    rows = reader.rows(Q.EXPORT_IMAGE_TOKENS, {"id": pid}, f"export {pid} image")
    return {
        "image_positions": torch.tensor([r["pos"] for r in rows], dtype=torch.int64),
        "image_grid": torch.tensor([[r["row"], r["col"]] for r in rows], dtype=torch.int64).reshape(
            -1, 2
        ),
    }
