"""The read-only HTTP API of ``atlas serve`` and the page that uses it (Starlette).

Every endpoint is a GET that reads: the named queries of :mod:`atlas.store.read` and the reads of
:mod:`atlas.store.queries` run in READ transactions with the settings' server timeout
(``QUERY_TIMEOUT_S``); raw Cypher goes through the guard of ``atlas cypher``
(:func:`atlas.store.cypher.run_cypher`: refused text, EXPLAIN check, READ transaction, row cap
``CYPHER_ROW_CAP``, byte cap ``CYPHER_RESULT_MB``). Every response is bounded: lists take a
``limit`` of at most :data:`~atlas.web.http.MAX_LIMIT`, pictures a node and edge cap, and a JSON body over
:data:`~atlas.web.http.MAX_RESPONSE_BYTES` is refused with 413. Bad input is a 4xx with one line of JSON,
``{"error": "..."}``: unknown parameters, malformed or out-of-range values (400), unknown
prompts, features, supernodes, nodes or interventions (404). Requests whose ``Host`` is not the
served address are refused (a page elsewhere cannot reach a loopback server by DNS rebinding),
and the page's Content-Security-Policy allows nothing outside this server.
"""

from __future__ import annotations

import contextlib
import json
import re
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any

import neo4j
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from atlas.errors import (
    InputError,
)
from atlas.settings import AtlasSettings
from atlas.store import queries as Q
from atlas.store import read
from atlas.web.http import (
    INTERVENTION_ID_RE,
    JOB_ID_RE,
    LIST_TEXT_CHARS,
    MAX_CYPHER,
    MAX_LIMIT,
    MAX_PICTURE_EDGES,
    MAX_PICTURE_NODES,
    MAX_RESPONSE_BYTES,
    NODE_EDGES,
    NODE_ID_RE,
    PROMPT_MAX_TOKENS,
    PROMPT_TEXT_CHARS,
    STATIC,
    ApiError,
    Atlas,
    Guard,
    Params,
    allowed_hosts,
    checked_spec,
    endpoint,
    error_response,
    feature_spec,
    json_response,
    not_found,
    path_int,
    prompt_id,
    supernode_name,
)


# --------------------------------------------------------------------------- summary, filters
@endpoint
def summary(request: Request, atlas: Atlas) -> Response:
    """Counts and the values the page's filters offer (models, recent jobs)."""
    Params(request, ())
    models = atlas.rows(Q.WEB_MODELS, {}, "models")
    jobs = atlas.rows(Q.JOB_LIST, {"limit": 50}, "jobs")
    return json_response(
        {
            "n_prompts": atlas.ask(read.count_prompts),
            "models": models,
            "jobs": [
                {k: j[k] for k in ("id", "source", "n_items", "done", "failed", "created_at")}
                for j in jobs
            ],
            "limits": {"max_limit": MAX_LIMIT, "max_nodes": MAX_PICTURE_NODES},
        }
    )


# --------------------------------------------------------------------------- prompts
@endpoint
def prompts(request: Request, atlas: Atlas) -> Response:
    """Stored prompts, newest first: ``q`` (text contains), ``model``, ``job``, ``answer`` (the
    most probable logit's text), ``limit``, ``offset``."""
    p = Params(request, ("q", "model", "job", "answer", "limit", "offset"))
    job = p.text("job")
    if job is not None and not JOB_ID_RE.fullmatch(job):
        raise ApiError(400, f"bad job id {job[:80]!r}")
    answer = p.text("answer")
    limit = p.limit()
    params = {
        "q": p.text("q"),
        "model": p.text("model"),
        "job": job,
        "answer": None if answer is None else read.normalise_token_text(answer),
        "offset": p.integer("offset", 0, 0, 10**9),
        "limit": limit + 1,
        "text_chars": LIST_TEXT_CHARS,
    }
    rows = atlas.rows(Q.WEB_PROMPTS, params, "listing prompts")
    return json_response({"prompts": rows[:limit], "more": len(rows) > limit})


@endpoint
def prompt(request: Request, atlas: Atlas) -> Response:
    """One prompt: text, tokens, scores, image, logits and the supernodes with members in it."""
    Params(request, ())
    pid = prompt_id(atlas, request.path_params["pid"])
    head = atlas.rows(
        Q.WEB_PROMPT,
        {"id": pid, "text_chars": PROMPT_TEXT_CHARS, "max_tokens": PROMPT_MAX_TOKENS},
        "prompt",
    )
    if not head:
        raise not_found(f"no stored prompt with id {pid!r}")
    logits = atlas.rows(Q.WEB_PROMPT_LOGITS, {"id": pid, "limit": 50}, "prompt logits")
    supernodes = atlas.rows(Q.PROMPT_SUPERNODES, {"id": pid}, "prompt supernodes")
    return json_response(
        {
            **head[0],
            "logits": logits,
            "supernodes": [{"name": s["name"], "n_nodes": len(s["ids"])} for s in supernodes],
        }
    )


@endpoint
def prompt_node(request: Request, atlas: Atlas) -> Response:
    """One node of a prompt (the circuit's click): its values, strongest inputs and outputs, and
    its feature's card when it is a feature."""
    Params(request, ())
    pid = prompt_id(atlas, request.path_params["pid"])
    nid = request.path_params["node"]
    if not NODE_ID_RE.fullmatch(nid):
        raise ApiError(400, f"bad node id {nid[:80]!r}")
    rows = atlas.rows(Q.WEB_NODE, {"prompt": pid, "node": nid, "limit": NODE_EDGES}, "node")
    if not rows:
        raise not_found(f"prompt {pid[:12]} has no node {nid!r}")
    node = rows[0]
    if node["kind"] == "feature" and node["layer"] is not None and node["feature"] is not None:
        node["card"] = atlas.ask(read.feature_card, f"feature:{node['layer']}/{node['feature']}")
    return json_response(node)


@endpoint
def prompt_circuit_svg(request: Request, atlas: Atlas) -> Response:
    """The prompt's circuit as SVG (``max_nodes``, ``max_edges``)."""
    from atlas.render import DEFAULT_MAX_EDGES, DEFAULT_MAX_NODES, draw_prompt_circuit

    p = Params(request, ("max_nodes", "max_edges"))
    max_nodes = p.integer("max_nodes", DEFAULT_MAX_NODES, 1, MAX_PICTURE_NODES)
    max_edges = p.integer("max_edges", DEFAULT_MAX_EDGES, 1, MAX_PICTURE_EDGES)
    pid = prompt_id(atlas, request.path_params["pid"])
    found = atlas.ask(read.prompt_circuit, pid)
    meta = found["graph"].metadata
    image = _stored_image(atlas, meta.image_sha256) if meta.image else None
    return _picture(
        atlas,
        "circuit.svg",
        lambda out: draw_prompt_circuit(
            found, out, max_nodes=max_nodes, max_edges=max_edges, image=image
        ),
    )


@endpoint
def prompt_supernodes_svg(request: Request, atlas: Atlas) -> Response:
    """The prompt collapsed to its supernodes, as SVG."""
    from atlas.render import draw_supernode_graph

    Params(request, ())
    pid = prompt_id(atlas, request.path_params["pid"])
    rows = atlas.ask(read.prompt_supernode_graph, pid)
    return _picture(
        atlas,
        "supernodes.svg",
        lambda out: draw_supernode_graph(rows, out, title=f"supernodes of {pid[:12]}"),
    )


@endpoint
def prompt_heatmap_png(request: Request, atlas: Atlas) -> Response:
    """An image prompt's image with the rollout heat of image tokens ``tokens`` (``k``s)."""
    from atlas.graph import Graph, artifact_path
    from atlas.render import draw_heatmap

    p = Params(request, ("tokens",))
    raw = p.required("tokens")
    if not re.fullmatch(r"\s*\d{1,6}(\s*,\s*\d{1,6}){0,63}\s*", raw):
        raise ApiError(400, "parameter 'tokens' must be image token indices like 0,3,5")
    ks = [int(k) for k in raw.split(",")]
    pid = prompt_id(atlas, request.path_params["pid"])
    head = atlas.rows(Q.EXPORT_PROMPT, {"id": pid}, "prompt")
    from atlas.graph import GraphMetadata

    meta = GraphMetadata.model_validate_json(head[0]["meta_json"])
    if meta.image is None:
        raise ApiError(400, f"prompt {pid[:12]} has no image")
    path = artifact_path(atlas.settings.resolved_artifact_dir, pid)
    if not path.is_file():
        raise not_found(f"the artifact of prompt {pid[:12]} is not in the artifact store")
    rollout = Graph.load(path).rollout
    if rollout is None:
        raise not_found(f"prompt {pid[:12]} was attributed without rollout maps")
    image = _stored_image(atlas, meta.image_sha256)
    if image is None:
        raise not_found(f"the image of prompt {pid[:12]} is not in the artifact store")
    return _picture(atlas, "heatmap.png", lambda out: draw_heatmap(image, rollout, ks, out))


# --------------------------------------------------------------------------- features
@endpoint
def features(request: Request, atlas: Atlas) -> Response:
    """Features by label (``q``: contains, case-insensitive) and ``layer``, most widespread
    first."""
    p = Params(request, ("q", "layer", "limit", "offset"))
    limit = p.limit()
    params = {
        "q": p.text("q"),
        "layer": p.optional_integer("layer", 0, 10_000),
        "offset": p.integer("offset", 0, 0, 10**9),
        "limit": limit + 1,
    }
    rows = atlas.rows(Q.WEB_FEATURES, params, "features")
    return json_response({"features": rows[:limit], "more": len(rows) > limit})


@endpoint
def feature(request: Request, atlas: Atlas) -> Response:
    """A feature's card, the prompts where it is active and its aggregated neighbours."""
    p = Params(request, ("limit",))
    limit = p.limit(20)
    spec = feature_spec(atlas, path_int(request, "layer"), path_int(request, "index"))
    return json_response(
        {
            "spec": spec,
            "card": atlas.ask(read.feature_card, spec),
            "active": atlas.ask(read.active_prompts, spec, limit=limit),
            "neighbours": atlas.ask(read.neighbours, spec, limit=limit),
        }
    )


@endpoint
def feature_card_svg(request: Request, atlas: Atlas) -> Response:
    """A feature card as SVG (image crops included when their images are stored)."""
    from atlas.render import crop_cell, draw_card

    Params(request, ())
    spec = feature_spec(atlas, path_int(request, "layer"), path_int(request, "index"))
    found = atlas.ask(read.feature_card, spec)
    crops = []
    for top in found.pop("image_tops"):
        image = _stored_image(atlas, top["image"])
        if image is not None and top["row"] is not None and top["grid"]:
            from PIL import Image

            cell = (int(top["row"]), int(top["col"]))
            pixels = crop_cell(image, cell, tuple(top["grid"]))
            caption = f"{top['activation']:.2f} @ {top['row']},{top['col']}"
            crops.append({"image": Image.fromarray(pixels), "caption": caption})
    return _picture(atlas, "card.svg", lambda out: draw_card({**found, "crops": crops}, out))


# --------------------------------------------------------------------------- supernodes
@endpoint
def supernodes(request: Request, atlas: Atlas) -> Response:
    """Every supernode with its member count."""
    Params(request, ())
    rows = atlas.rows(Q.LIST_SUPERNODES, {}, "listing supernodes")
    return json_response({"supernodes": rows[:MAX_LIMIT], "more": len(rows) > MAX_LIMIT})


@endpoint
def supernode(request: Request, atlas: Atlas) -> Response:
    """One supernode: definition, members, prompts where it is active, neighbours and the
    interventions on it."""
    p = Params(request, ("limit",))
    limit = p.limit(20)
    name = supernode_name(atlas, request.path_params["name"])
    shown = atlas.rows(Q.SHOW_SUPERNODE, {"name": name}, "supernode")[0]
    spec = f"supernode:{name}"
    members = sorted(shown["members"], key=lambda m: (-(m["n_prompts"] or 0), m["fid"]))
    on = atlas.rows(Q.INTERVENTIONS_ON_SUPERNODE, {"name": name}, "interventions")
    return json_response(
        {
            **shown,
            "members": members[:MAX_LIMIT],
            "n_members": len(members),
            "active": atlas.ask(read.active_prompts, spec, limit=limit),
            "neighbours": atlas.ask(read.neighbours, spec, limit=limit),
            "interventions": [_decoded(r) for r in on[:limit]],
        }
    )


@endpoint
def supernode_neighbours_svg(request: Request, atlas: Atlas) -> Response:
    """The supernode with its aggregated neighbours (a circuit across prompts), as SVG."""
    from atlas.render import draw_global_circuit

    p = Params(request, ("limit",))
    limit = p.limit(12)
    name = supernode_name(atlas, request.path_params["name"])
    rows = atlas.ask(read.neighbours, f"supernode:{name}", limit=limit)
    edges = [
        (name, r["neighbour"], r["sum_w"], r["n_prompts"])
        if r["direction"] == "out"
        else (r["neighbour"], name, r["sum_w"], r["n_prompts"])
        for r in rows
    ]
    return _picture(
        atlas,
        "neighbours.svg",
        lambda out: draw_global_circuit(edges, out, title=f"{name} and its neighbours"),
    )


# --------------------------------------------------------------------------- named queries
_ENDPOINT_HELP = "supernode:NAME, feature:L/I, token:TEXT or logit:TEXT"


def _paths_args(p: Params, atlas: Atlas) -> dict[str, Any]:
    return {
        "source": checked_spec(atlas, p.required("from")),
        "target": checked_spec(atlas, p.required("to")),
        "max_hops": p.integer("max_hops", 4, 1, Q.PATHS_MAX_HOPS),
        "min_weight": p.number("min_weight", 0.0, 0.0, 1e30),
        "image_tag": p.text("image_tag"),
        "cap": int(atlas.settings.cypher_row_cap),
    }


_PATHS_PARAMS = ("from", "to", "max_hops", "min_weight", "image_tag", "limit")


@endpoint
def query_paths(request: Request, atlas: Atlas) -> Response:
    """``atlas query paths``: paths within each prompt and their routes summed across prompts."""
    p = Params(request, _PATHS_PARAMS)
    limit = p.limit(20)
    args = _paths_args(p, atlas)
    result = atlas.ask(read.paths, args.pop("source"), args.pop("target"), limit=limit, **args)
    result["aggregate"] = result["aggregate"][:limit]
    return json_response(result)


@endpoint
def query_paths_svg(request: Request, atlas: Atlas) -> Response:
    """The routes of a paths query as a layered picture (the ``limit`` strongest routes)."""
    from atlas.render import draw_paths

    p = Params(request, _PATHS_PARAMS)
    limit = p.limit(20)
    args = _paths_args(p, atlas)
    source, target = args.pop("source"), args.pop("target")
    result = atlas.ask(read.paths, source, target, limit=1, **args)
    result["aggregate"] = result["aggregate"][:limit]
    return _picture(
        atlas, "paths.svg", lambda out: draw_paths(result, out, title=f"paths {source} → {target}")
    )


@endpoint
def query_active(request: Request, atlas: Atlas) -> Response:
    """``atlas query active``: prompts where a feature or supernode is active."""
    p = Params(request, ("spec", "image_tag", "limit"))
    rows = atlas.ask(
        read.active_prompts,
        checked_spec(atlas, p.required("spec")),
        limit=p.limit(),
        image_tag=p.text("image_tag"),
    )
    return json_response({"rows": rows})


@endpoint
def query_contributors(request: Request, atlas: Atlas) -> Response:
    """``atlas query contributors``: top direct contributors to a logit across prompts."""
    p = Params(request, ("logit", "limit"))
    rows = atlas.ask(read.top_contributors, p.required("logit"), limit=p.limit(20))
    return json_response({"rows": rows})


@endpoint
def query_neighbours(request: Request, atlas: Atlas) -> Response:
    """``atlas query neighbours``: aggregated neighbours of a feature or supernode."""
    p = Params(request, ("spec", "limit"))
    rows = atlas.ask(read.neighbours, checked_spec(atlas, p.required("spec")), limit=p.limit(20))
    return json_response({"rows": rows})


@endpoint
def query_compare(request: Request, atlas: Atlas) -> Response:
    """``atlas query compare``: two prompts' shared and exclusive features and shared edges."""
    p = Params(request, ("a", "b", "limit"))
    limit = p.limit(20)
    a = prompt_id(atlas, p.required("a"))
    b = prompt_id(atlas, p.required("b"))
    result = atlas.ask(read.compare_prompts, a, b, limit=limit)
    result["shared_features"] = result["shared_features"][:limit]
    return json_response(result)


@endpoint
def query_supernode_graph(request: Request, atlas: Atlas) -> Response:
    """``atlas query supernode-graph``: one prompt collapsed to its supernodes."""
    p = Params(request, ("prompt", "limit"))
    limit = p.limit(100)
    pid = prompt_id(atlas, p.required("prompt"))
    rows = atlas.ask(read.prompt_supernode_graph, pid)
    return json_response({"rows": rows[:limit], "more": len(rows) > limit})


@endpoint
def query_image_regions(request: Request, atlas: Atlas) -> Response:
    """``atlas query image-regions``: image cells that feed a feature or supernode."""
    p = Params(request, ("spec", "image_tag", "limit"))
    rows = atlas.ask(
        read.image_regions,
        checked_spec(atlas, p.required("spec")),
        limit=p.limit(20),
        image_tag=p.text("image_tag"),
    )
    return json_response({"rows": rows})


@endpoint
def cypher(request: Request, atlas: Atlas) -> Response:
    """``atlas cypher``: read-only Cypher (``q``) behind the same guard, timeout and caps."""
    from atlas.store.cypher import run_cypher

    p = Params(request, ("q",))
    text = p.required("q", max_len=MAX_CYPHER)
    assert atlas.driver is not None
    settings = atlas.settings
    max_bytes = min(int(settings.cypher_result_mb * 2**20), MAX_RESPONSE_BYTES // 2)
    res = run_cypher(
        atlas.driver,
        text,
        {},
        database=atlas.database,
        timeout_s=atlas.timeout_s,
        row_cap=min(int(settings.cypher_row_cap), 10 * MAX_LIMIT),
        max_bytes=max_bytes,
    )
    return json_response({"keys": res.keys, "rows": res.rows, "truncated": res.truncated})


# --------------------------------------------------------------------------- interventions
def _decoded(row: Mapping[str, Any]) -> dict[str, Any]:
    """JSON-string properties of an intervention back to values."""
    out = dict(row)
    for key in ("spec", "top", "predicted"):
        if isinstance(out.get(key), str):
            with contextlib.suppress(ValueError):
                out[key] = json.loads(out[key])
    return out


@endpoint
def interventions(request: Request, atlas: Atlas) -> Response:
    """Stored interventions, newest first (``supernode``: only those touching it)."""
    p = Params(request, ("supernode", "limit"))
    limit = p.limit(100)
    name = p.text("supernode")
    if name is not None:
        name = supernode_name(atlas, name)
        rows = atlas.rows(Q.INTERVENTIONS_ON_SUPERNODE, {"name": name}, "interventions")[:limit]
    else:
        rows = atlas.rows(Q.LIST_INTERVENTIONS, {"limit": limit}, "interventions")
    return json_response({"interventions": [_decoded(r) for r in rows]})


@endpoint
def intervention(request: Request, atlas: Atlas) -> Response:
    """One intervention with its spec and effects: the KL of the changed next-token distribution,
    the top tokens before and after, and the graph's predicted against the measured effect."""
    Params(request, ())
    iid = request.path_params["iid"]
    if not INTERVENTION_ID_RE.fullmatch(iid):
        raise ApiError(400, f"bad intervention id {iid[:80]!r}")
    rows = atlas.rows(Q.WEB_INTERVENTION, {"id": iid}, "intervention")
    if not rows:
        raise not_found(f"no stored intervention {iid!r}")
    return json_response(_decoded(rows[0]["props"]))


# --------------------------------------------------------------------------- helpers
def _stored_image(atlas: Atlas, sha: str | None) -> Any:
    """The image with this sha256 from the artifact store, or None when it is not there."""
    from atlas.images import load_stored_image

    if not sha:
        return None
    try:
        loaded = load_stored_image(
            atlas.settings.resolved_artifact_dir, sha, max_pixels=atlas.settings.image_max_pixels
        )
    except InputError:
        return None
    return loaded.image


_MEDIA = {".svg": "image/svg+xml", ".png": "image/png"}


def _picture(atlas: Atlas, name: str, draw: Callable[[Path], Any]) -> Response:
    """Draw into a temporary file (one drawing at a time) and answer with its bytes."""
    with atlas.draw_lock, tempfile.TemporaryDirectory(prefix="atlas-web-") as tmp:
        out = Path(tmp) / name
        draw(out)
        body = out.read_bytes()
    if len(body) > MAX_RESPONSE_BYTES:
        return error_response(413, "picture too large; lower max_nodes / max_edges")
    return Response(body, media_type=_MEDIA[out.suffix], headers={"Cache-Control": "no-store"})


def _index(request: Request) -> Response:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


async def _api_not_found(request: Request) -> Response:
    return error_response(404, f"no endpoint {request.url.path[:200]}")


def routes() -> list[Any]:
    api = [
        Route("/summary", summary),
        Route("/prompts", prompts),
        Route("/prompts/{pid}", prompt),
        Route("/prompts/{pid}/circuit.svg", prompt_circuit_svg),
        Route("/prompts/{pid}/supernodes.svg", prompt_supernodes_svg),
        Route("/prompts/{pid}/heatmap.png", prompt_heatmap_png),
        Route("/prompts/{pid}/nodes/{node}", prompt_node),
        Route("/features", features),
        Route("/features/{layer:int}/{index:int}", feature),
        Route("/features/{layer:int}/{index:int}/card.svg", feature_card_svg),
        Route("/supernodes", supernodes),
        Route("/supernodes/{name}", supernode),
        Route("/supernodes/{name}/neighbours.svg", supernode_neighbours_svg),
        Route("/query/paths", query_paths),
        Route("/query/paths.svg", query_paths_svg),
        Route("/query/active", query_active),
        Route("/query/contributors", query_contributors),
        Route("/query/neighbours", query_neighbours),
        Route("/query/compare", query_compare),
        Route("/query/supernode-graph", query_supernode_graph),
        Route("/query/image-regions", query_image_regions),
        Route("/cypher", cypher),
        Route("/interventions", interventions),
        Route("/interventions/{iid}", intervention),
        Route("/{rest:path}", _api_not_found),
    ]
    return [
        Route("/", _index),
        Mount("/api", routes=api),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]


def create_app(
    settings: AtlasSettings,
    *,
    driver: neo4j.Driver | None = None,
    host: str = "127.0.0.1",
) -> Starlette:
    """The application. Without ``driver`` it opens one for ``settings`` when it starts and
    closes it when it stops; ``host`` is the address served (it decides the accepted ``Host``
    headers)."""
    atlas = Atlas(settings=settings, driver=driver)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        from atlas.store.connection import open_driver

        owned = atlas.driver is None
        if owned:
            atlas.driver = open_driver(settings)
        try:
            yield
        finally:
            if owned and atlas.driver is not None:
                atlas.driver.close()
                atlas.driver = None

    app = Starlette(
        routes=routes(),
        middleware=[Middleware(Guard, hosts=allowed_hosts(host))],
        lifespan=lifespan,
    )
    app.state.atlas = atlas
    return app
