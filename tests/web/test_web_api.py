"""The read-only API of ``atlas serve`` against a real Neo4j: every endpoint's answer checked
against the store's own reads, and hostile parameters (Cypher injection in filters, huge limits,
unknown ids, writes) refused with a 4xx and one line of JSON, with nothing written."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from typing import Any

import pytest
from PIL import Image
from starlette.testclient import TestClient

from atlas.graph import NodeKind
from atlas.render import select_nodes
from atlas.store import read
from atlas.web import serve_command
from atlas.web.app import MAX_LIMIT, NODE_EDGES, allowed_hosts
from tests.web.conftest import World, fingerprint

pytestmark = pytest.mark.timeout(600)


def ok(client: TestClient, path: str, **params: Any) -> Any:
    r = client.get(path, params=params)
    assert r.status_code == 200, (path, r.status_code, r.text[:300])
    if r.headers["content-type"].startswith("application/json"):
        return r.json()
    return r


def svg_ids(body: bytes, prefix: str) -> list[str]:
    root = ET.fromstring(body)
    return [e.get("id", "") for e in root.iter() if e.get("id", "").startswith(prefix)]


def test_summary_and_prompt_filters(client: TestClient, world: World) -> None:
    s = ok(client, "/api/summary")
    assert s["n_prompts"] == 4
    assert [m["model"] for m in s["models"]] == ["synthetic-model"]
    assert world.job_id in [j["id"] for j in s["jobs"]]

    every = ok(client, "/api/prompts")["prompts"]
    assert {p["id"] for p in every} == {g.prompt_id for g in [*world.graphs, world.image]}
    assert [p["has_image"] for p in every if p["id"] == world.image.prompt_id] == [True]

    g = world.graphs[1]
    word = g.metadata.prompt.split()[-1]
    found = ok(client, "/api/prompts", q=word.upper())["prompts"]
    assert g.prompt_id in {p["id"] for p in found}
    assert all(word.lower() in p["text"].lower() for p in found)

    assert ok(client, "/api/prompts", model="synthetic-model")["prompts"]
    assert ok(client, "/api/prompts", model="another")["prompts"] == []

    in_job = ok(client, "/api/prompts", job=world.job_id)["prompts"]
    assert {p["id"] for p in in_job} == {world.graphs[0].prompt_id, world.graphs[1].prompt_id}

    # the answer is the text of the most probable logit
    top = max(
        (i for i in range(g.n_nodes) if g.kind[i] == NodeKind.LOGIT),
        key=lambda i: float(g.logit_prob[i]),
    )
    listed = next(p for p in every if p["id"] == g.prompt_id)
    assert listed["answer_prob"] == pytest.approx(float(g.logit_prob[top]))
    answered = ok(client, "/api/prompts", answer=f"  {listed['answer']} ")["prompts"]
    assert g.prompt_id in {p["id"] for p in answered}
    assert all(p["answer"].strip() == listed["answer"].strip() for p in answered)

    page = ok(client, "/api/prompts", limit=1, offset=1)
    assert len(page["prompts"]) == 1 and page["more"] is True
    assert page["prompts"][0]["id"] == every[1]["id"]
    assert ok(client, "/api/prompts", limit=1, offset=3)["more"] is False


def test_prompt_circuit_and_node(client: TestClient, world: World) -> None:
    g = world.graphs[0]
    p = ok(client, f"/api/prompts/{g.prompt_id[:10]}")
    assert p["id"] == g.prompt_id and p["tokens"] == list(g.metadata.tokens)
    assert [x["prob"] for x in p["logits"]] == sorted(
        (x["prob"] for x in p["logits"]), reverse=True
    )
    assert [s["name"] for s in p["supernodes"]] == ["Hand"]

    r = ok(client, f"/api/prompts/{g.prompt_id}/circuit.svg", max_nodes=400, max_edges=4000)
    assert r.headers["content-type"].startswith("image/svg+xml")
    back, _ = read.export_graph(world.driver, g.prompt_id)
    kept = select_nodes(back, 400)
    nodes = svg_ids(r.content, "node-")
    assert len(nodes) == len(kept)
    assert b"finger count" in r.content and svg_ids(r.content, "supernode-Hand")
    small = ok(client, f"/api/prompts/{g.prompt_id}/circuit.svg", max_nodes=5)
    assert len(svg_ids(small.content, "node-")) == len(select_nodes(back, 5))

    # a clicked feature node: values, its strongest edges, its card
    layer, index = world.labelled
    fid = next(
        back.node_ids()[i]
        for i in range(back.n_nodes)
        if back.kind[i] == NodeKind.FEATURE
        and (int(back.layer[i]), int(back.feature[i])) == (layer, index)
    )
    n = ok(client, f"/api/prompts/{g.prompt_id}/nodes/{fid}")
    assert (n["kind"], n["layer"], n["feature"]) == ("feature", layer, index)
    assert n["card"]["label"] == "finger count" and n["label"] == "finger count"
    i = back.node_ids().index(fid)
    into = sorted(
        (abs(w) for t, w in zip(back.edge_target.tolist(), back.edge_weight.tolist(), strict=True)
         if t == i),
        reverse=True,
    )  # fmt: skip
    assert [abs(e["w"]) for e in n["inputs"]] == pytest.approx(into[:NODE_EDGES])
    assert len(n["outputs"]) <= NODE_EDGES
    logit = next(x["id"] for x in p["logits"])
    assert ok(client, f"/api/prompts/{g.prompt_id}/nodes/{logit}")["kind"] == "logit"

    sn = ok(client, f"/api/prompts/{g.prompt_id}/supernodes.svg")
    rows = read.prompt_supernode_graph(world.driver, g.prompt_id)
    names = {x for row in rows for x in (row["source"], row["target"])}
    assert len(svg_ids(sn.content, "node-")) == len(names)


def test_image_prompt_thumbnails_and_heatmap(client: TestClient, world: World) -> None:
    pid = world.image.prompt_id
    p = ok(client, f"/api/prompts/{pid}")
    assert p["image"] and p["image_tags"] == ["hands"] and (p["width"], p["height"]) == (64, 48)
    svg = ok(client, f"/api/prompts/{pid}/circuit.svg", max_nodes=400)
    assert svg_ids(svg.content, "thumb-")
    png = ok(client, f"/api/prompts/{pid}/heatmap.png", tokens="0,3")
    assert png.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(png.content)) as im:
        assert im.size == (64 * 6, 48 * 6)  # a small image is enlarged
    bad = client.get(f"/api/prompts/{pid}/heatmap.png", params={"tokens": "9"})
    assert bad.status_code == 400 and "not one of" in bad.json()["error"]
    text_only = client.get(f"/api/prompts/{world.graphs[0].prompt_id}/heatmap.png?tokens=0")
    assert text_only.status_code == 400 and "no image" in text_only.json()["error"]
    regions = ok(client, "/api/query/image-regions", spec="supernode:Hand", image_tag="hands")
    assert regions["rows"] == read.image_regions(world.driver, "supernode:Hand", image_tag="hands")


def test_features_and_cards(client: TestClient, world: World) -> None:
    layer, index = world.labelled
    found = ok(client, "/api/features", q="FINGER")["features"]
    assert [(f["layer"], f["index"]) for f in found] == [(layer, index)]
    by_layer = ok(client, "/api/features", layer=layer, limit=500)["features"]
    assert by_layer and all(f["layer"] == layer for f in by_layer)
    ns = [f["n_prompts"] for f in ok(client, "/api/features", limit=500)["features"]]
    assert ns == sorted(ns, reverse=True)

    f = ok(client, f"/api/features/{layer}/{index}")
    assert f["card"]["label"] == "finger count" and f["card"]["top_tokens"] == [" five", " 5"]
    spec = f"feature:{layer}/{index}"
    assert f["active"] == read.active_prompts(world.driver, spec, limit=20)
    assert f["neighbours"] == read.neighbours(world.driver, spec, limit=20)
    card = ok(client, f"/api/features/{layer}/{index}/card.svg")
    assert b"finger count" in card.content and b"top activations" in card.content


def test_supernodes_and_interventions(client: TestClient, world: World) -> None:
    listed = ok(client, "/api/supernodes")["supernodes"]
    n = world.n_members
    assert [(s["name"], s["n_members"]) for s in listed] == [("Hand", n)]
    s = ok(client, "/api/supernodes/Hand")
    assert s["n_members"] == n and len(s["members"]) == n
    assert s["active"] == read.active_prompts(world.driver, "supernode:Hand", limit=20)
    assert [i["id"] for i in s["interventions"]] == [world.intervention_id]
    pic = ok(client, "/api/supernodes/Hand/neighbours.svg")
    assert pic.headers["content-type"].startswith("image/svg+xml")

    ivs = ok(client, "/api/interventions")["interventions"]
    assert [i["id"] for i in ivs] == [world.intervention_id]
    assert ok(client, "/api/interventions", supernode="Hand")["interventions"][0]["kl"] == 0.25
    one = ok(client, f"/api/interventions/{world.intervention_id}")
    assert one["top"][0]["steered"] == 0.1 and one["predicted"]["measured"] == [-0.5]
    assert one["spec"]["supernode"]["name"] == "Hand"


def test_named_queries_match_the_store(client: TestClient, world: World) -> None:
    d = world.driver
    args = {"from": "supernode:Hand", "to": f"logit:{_answer(world)}", "max_hops": 3}
    got = ok(client, "/api/query/paths", **args, limit=10)
    want = read.paths(d, "supernode:Hand", args["to"], max_hops=3, limit=10)
    assert got["paths"] == json.loads(json.dumps(want["paths"]))
    assert got["aggregate"] == json.loads(json.dumps(want["aggregate"][:10]))
    assert got["aggregate"], "the world should have a path from Hand to the answer"
    pic = ok(client, "/api/query/paths.svg", **args)
    routes = {n for a in want["aggregate"][:20] for n in a["route"]}
    assert len(svg_ids(pic.content, "node-")) == len(routes)

    assert ok(client, "/api/query/active", spec="supernode:Hand")["rows"] == read.active_prompts(
        d, "supernode:Hand"
    )
    top = ok(client, "/api/query/contributors", logit=args["to"], limit=5)["rows"]
    assert top == read.top_contributors(d, args["to"], limit=5)
    nb = ok(client, "/api/query/neighbours", spec="supernode:Hand")["rows"]
    assert nb == read.neighbours(d, "supernode:Hand")
    a, b = world.graphs[0].prompt_id, world.graphs[1].prompt_id
    cmp = ok(client, "/api/query/compare", a=a[:8], b=b)
    assert (
        cmp["a"] == a
        and cmp["shared_features"]
        == read.compare_prompts(d, a, b, limit=20)["shared_features"][:20]
    )
    sg = ok(client, "/api/query/supernode-graph", prompt=a)["rows"]
    assert sg == read.prompt_supernode_graph(d, a)

    rows = ok(client, "/api/cypher", q="MATCH (p:Prompt) RETURN count(p) AS n")
    assert rows == {"keys": ["n"], "rows": [{"n": 4}], "truncated": False}


def _answer(world: World) -> str:
    g = world.graphs[0]
    top = max(
        (i for i in range(g.n_nodes) if g.kind[i] == NodeKind.LOGIT),
        key=lambda i: float(g.logit_prob[i]),
    )
    return _token_text(world, int(g.token_id[top]))


def _token_text(world: World, token_id: int) -> str:
    rows = world.driver.execute_query(
        "MATCH (t:Token {token_id: $t}) RETURN t.text_norm AS text", t=token_id
    ).records
    return str(rows[0]["text"])


INJECTIONS = [
    "x' OR 1=1 //",
    "feature:1/2' DETACH DELETE n //",
    'supernode:Hand"}) MATCH (n) DETACH DELETE n //',
    "1}) CREATE (:Pwned) //",
]


def hostile_requests(world: World) -> list[tuple[str, str, dict[str, Any], int]]:
    """(method, path, params, expected status) of requests that must be refused."""
    pid = world.graphs[0].prompt_id
    out: list[tuple[str, str, dict[str, Any], int]] = []
    for bad in INJECTIONS:
        # an injected supernode name is a name no supernode has
        unknown = 404 if bad.startswith("supernode:") else 400
        out += [
            ("GET", "/api/prompts", {"job": bad}, 400),
            ("GET", "/api/query/active", {"spec": bad}, unknown),
            ("GET", "/api/query/neighbours", {"spec": bad}, unknown),
            ("GET", "/api/query/paths", {"from": bad, "to": "logit:5"}, unknown),
            ("GET", "/api/query/compare", {"a": bad, "b": pid}, 400),
            ("GET", "/api/query/supernode-graph", {"prompt": bad}, 400),
            ("GET", "/api/cypher", {"q": f"MATCH (n) WHERE n.x = '{bad}' DETACH DELETE n"}, 400),
            ("GET", "/api/features", {"layer": bad}, 400),
        ]
    out += [
        # huge or malformed numbers
        ("GET", "/api/prompts", {"limit": MAX_LIMIT + 1}, 400),
        ("GET", "/api/prompts", {"limit": 10**18}, 400),
        ("GET", "/api/prompts", {"limit": -1}, 400),
        ("GET", "/api/prompts", {"offset": "1e9"}, 400),
        ("GET", "/api/features", {"limit": "99999999999999999999"}, 400),
        ("GET", f"/api/prompts/{pid}/circuit.svg", {"max_nodes": 100000}, 400),
        ("GET", f"/api/prompts/{pid}/circuit.svg", {"max_edges": 0}, 400),
        (
            "GET",
            "/api/query/paths",
            {"from": "supernode:Hand", "to": "logit:5", "max_hops": 99},
            400,
        ),
        (
            "GET",
            "/api/query/paths",
            {"from": "supernode:Hand", "to": "logit:5", "min_weight": "nan"},
            400,
        ),
        ("GET", f"/api/prompts/{pid}/heatmap.png", {"tokens": "0," * 500}, 400),
        ("GET", "/api/prompts", {"q": "x" * 5000}, 400),
        ("GET", "/api/prompts", {"q": "a\x00b"}, 400),
        # unknown ids
        ("GET", "/api/prompts/abcdef0123", {}, 404),
        ("GET", "/api/prompts/not-hex", {}, 400),
        ("GET", f"/api/prompts/{pid}/nodes/99_99_99", {}, 404),
        ("GET", f"/api/prompts/{pid}/nodes/x'y", {}, 400),
        ("GET", "/api/features/99/999999", {}, 404),
        ("GET", "/api/features/99/999999/card.svg", {}, 404),
        ("GET", "/api/supernodes/Nobody", {}, 404),
        ("GET", "/api/supernodes/Nobody/neighbours.svg", {}, 404),
        ("GET", "/api/interventions/ffff", {}, 404),
        ("GET", "/api/interventions", {"supernode": "Nobody"}, 404),
        ("GET", "/api/query/paths", {"from": "supernode:Nobody", "to": "logit:5"}, 404),
        ("GET", "/api/query/neighbours", {"spec": "supernode:Nobody"}, 404),
        ("GET", "/api/nothing-here", {}, 404),
        # unknown or repeated parameters, missing ones
        ("GET", "/api/prompts", {"limt": 5}, 400),
        ("GET", "/api/query/paths", {"to": "logit:5"}, 400),
        ("GET", "/api/cypher", {}, 400),
        # raw Cypher the guard refuses
        ("GET", "/api/cypher", {"q": "CREATE (:Pwned)"}, 400),
        ("GET", "/api/cypher", {"q": "LOAD CSV FROM 'file:///etc/passwd' AS l RETURN l"}, 400),
        ("GET", "/api/cypher", {"q": "SHOW USERS"}, 400),
        ("GET", "/api/cypher", {"q": "CALL dbms.components()"}, 400),
        ("GET", "/api/cypher", {"q": "MATCH (f:Feature) WHERE f.label =~ '(a+)+b' RETURN f"}, 400),
        # writes of any kind
        ("POST", "/api/prompts", {}, 405),
        ("PUT", "/api/supernodes/Hand", {}, 405),
        ("DELETE", f"/api/prompts/{pid}", {}, 405),
    ]
    return out


def test_hostile_parameters_are_refused_with_one_line_and_nothing_written(
    client: TestClient, world: World
) -> None:
    before = fingerprint(world.driver)
    for method, path, params, status in hostile_requests(world):
        r = client.request(method, path, params=params)
        assert r.status_code == status, (method, path, params, r.status_code, r.text[:200])
        assert r.headers["content-type"].startswith("application/json"), (path, params)
        body = r.json()
        assert list(body) == ["error"], body
        assert body["error"] and "\n" not in body["error"] and len(body["error"]) <= 500
    repeated = client.get("/api/prompts?limit=1&limit=2")
    assert repeated.status_code == 400 and "more than once" in repeated.json()["error"]
    # an injection in a free-text filter is only text to search for
    for bad in INJECTIONS:
        for name in ("q", "model", "answer"):
            r = client.get("/api/prompts", params={name: bad})
            assert r.status_code == 200 and r.json()["prompts"] == [], (name, bad)
        assert ok(client, "/api/features", q=bad)["features"] == []
    assert fingerprint(world.driver) == before


def test_only_the_served_host_is_answered(world: World) -> None:
    from atlas.web.app import create_app

    app = create_app(world.settings, driver=world.driver)
    with TestClient(app, base_url="http://attacker.example") as c:
        r = c.get("/api/summary")
        assert r.status_code == 400 and "own address" in r.json()["error"]
    with TestClient(app, base_url="http://localhost:8765") as c:
        r = c.get("/")
        assert r.status_code == 200 and "Circuit Atlas" in r.text
        assert "default-src 'self'" in r.headers["content-security-policy"]
        assert c.get("/static/app.js").status_code == 200
    assert allowed_hosts("0.0.0.0") == ["*"]
    assert "127.0.0.1" in allowed_hosts("127.0.0.1")


def test_the_page_names_no_outside_assets() -> None:
    from atlas.web.app import STATIC

    for f in STATIC.iterdir():
        text = f.read_text()
        assert "http://" not in text and "https://" not in text, f.name
        assert "//cdn" not in text and "@import" not in text, f.name


def test_serve_command_line() -> None:
    assert serve_command() == "atlas serve\nthen open http://127.0.0.1:8765/"
    line = serve_command("0.0.0.0", 9000, atlas_home="/tmp/a b")
    assert line.startswith("ATLAS_HOME='/tmp/a b' atlas serve --host 0.0.0.0 --port 9000")


def test_atlas_serve_command(world: World) -> None:
    """The real console script serves the page and the API; a busy port is one line."""
    import os
    import signal
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from atlas.services._proc import free_port
    from tests import REPO_ROOT

    s = world.settings
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "REDIS_"))}
    env |= {
        "ATLAS_HOME": str(s.atlas_home),
        "NEO4J_URI": s.neo4j_uri,
        "NEO4J_USER": s.neo4j_user,
        "NEO4J_PASSWORD": s.neo4j_password.get_secret_value(),
    }
    script = str(Path(sys.executable).with_name("atlas"))
    port = free_port()
    proc = subprocess.Popen(
        [script, "serve", "--port", str(port)],
        env=env,
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        body = None
        while body is None:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "atlas serve did not answer"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/summary") as r:
                    body = json.loads(r.read())
            except OSError:
                time.sleep(0.3)
        assert body["n_prompts"] == 4
        busy = subprocess.run(
            [script, "serve", "--port", str(port)],
            env=env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert busy.returncode == 1
        assert busy.stderr.strip().splitlines() == [
            f"error: port {port} on 127.0.0.1 is in use: choose another with --port"
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
