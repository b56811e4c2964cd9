"""``atlas draw`` against a real Neo4j: circuit, supernodes, paths, heatmap and card pictures of
stored prompts, and one-line errors for a bad suffix or an unknown prompt."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import neo4j
import pytest
from click.testing import CliRunner
from PIL import Image

from atlas.cli import cli
from atlas.graph import Graph, NodeKind, artifact_path
from atlas.images import store_image
from atlas.render import select_nodes
from atlas.store import read
from atlas.store.ingest import graph_rows, ingest_rows
from atlas.store.synthetic import synthetic_graph
from tests.unit.render.test_render import image_graph, picture, svg_text

pytestmark = pytest.mark.timeout(600)


def small(seed: int) -> Graph:
    return synthetic_graph(
        seed, n_layers=4, n_pos=6, n_features=40, n_logits=3, n_edges=300, vocab_size=12
    )


def invoke(settings: Any, *args: str) -> Any:
    return CliRunner().invoke(cli, list(args), obj={"settings": settings})


def ids_with(path: Path, prefix: str) -> list[str]:
    root = ET.parse(path).getroot()
    return [e.get("id", "") for e in root.iter() if e.get("id", "").startswith(prefix)]


def stored(driver: neo4j.Driver, g: Graph) -> None:
    assert ingest_rows(driver, graph_rows(g)).created


def test_draw_circuit_of_a_stored_prompt(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path
) -> None:
    g = small(1)
    stored(db, g)
    feature = next(i for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE)
    with db.session() as s:
        s.run(
            "MATCH (f:Feature {layer: $l, index: $i}) SET f.label = 'a stored label'",
            l=int(g.layer[feature]),
            i=int(g.feature[feature]),
        ).consume()
    out = tmp_path / "c.svg"
    r = invoke(
        neo4j_settings,
        "draw",
        "circuit",
        g.prompt_id[:10],
        "--out",
        str(out),
        "--max-nodes",
        "1000",
    )
    assert r.exit_code == 0, r.output
    assert r.output.strip() == str(out)
    back, _ = read.export_graph(db, g.prompt_id)
    kept = select_nodes(back, 1000)
    assert len(ids_with(out, "node-")) == len(kept)
    assert feature in kept
    assert "a stored label" in svg_text(out)

    png = tmp_path / "c.png"
    r = invoke(
        neo4j_settings, "draw", "circuit", g.prompt_id, "--out", str(png), "--max-nodes", "12"
    )
    assert r.exit_code == 0, r.output
    with Image.open(png) as im:
        assert im.format == "PNG" and im.size[0] > 500


def test_draw_errors_are_one_line(db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path) -> None:
    g = small(2)
    stored(db, g)
    for args in (
        ["circuit", g.prompt_id, "--out", str(tmp_path / "c.gif")],
        ["circuit", "abcdef0123", "--out", str(tmp_path / "c.svg")],
        ["heatmap", g.prompt_id, "--tokens", "0", "--out", str(tmp_path / "h.svg")],
        ["heatmap", g.prompt_id, "--tokens", "0", "--out", str(tmp_path / "h.png")],
        ["card", "99/99999", "--out", str(tmp_path / "k.svg")],
    ):
        r = invoke(neo4j_settings, "draw", *args)
        assert r.exit_code != 0, args
        assert r.exception is not None and len(str(r.exception).splitlines()) == 1, args
    assert not list(tmp_path.iterdir())


def test_draw_supernodes_paths_and_card(
    db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path
) -> None:
    graphs = [small(s) for s in (3, 4)]
    for g in graphs:
        stored(db, g)
    g = graphs[0]
    feats = [i for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE][:3]
    specs = [x for i in feats for x in ("--feature", f"{int(g.layer[i])}/{int(g.feature[i])}")]
    r = invoke(neo4j_settings, "supernode", "define", "group", *specs)
    assert r.exit_code == 0, r.output
    rows = read.prompt_supernode_graph(db, g.prompt_id)
    out = tmp_path / "s.svg"
    r = invoke(neo4j_settings, "draw", "supernodes", g.prompt_id, "--out", str(out))
    assert r.exit_code == 0, r.output
    names = {n for row in rows for n in (row["source"], row["target"])}
    assert len(ids_with(out, "node-")) == len(names)
    assert "group" in svg_text(out)

    token = g.metadata.tokens[1].strip()
    logit = next(i for i in range(g.n_nodes) if g.kind[i] == NodeKind.LOGIT)
    word = read.prompt_circuit(db, g.prompt_id)["token_texts"]
    target = f"logit:{word[int(g.token_id[logit])].strip()}"
    result = read.paths(db, f"token:{token}", target, max_hops=2)
    out = tmp_path / "p.svg"
    r = invoke(
        neo4j_settings, "draw", "paths", "--from", f"token:{token}", "--to", target,
        "--max-hops", "2", "--out", str(out),
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert result["aggregate"]
    steps = {s for a in result["aggregate"] for s in a["route"]}
    assert len(ids_with(out, "node-")) == len(steps)

    i = feats[0]
    with db.session() as s:
        s.run(
            "MATCH (f:Feature {layer: $l, index: $i}) SET f.label = 'card label',"
            " f.top_tokens = [' Austin', ' Paris'], f.top_values = [1.5, 0.5]",
            l=int(g.layer[i]),
            i=int(g.feature[i]),
        ).consume()
    out = tmp_path / "card.svg"
    r = invoke(
        neo4j_settings, "draw", "card", f"{int(g.layer[i])}/{int(g.feature[i])}", "--out", str(out)
    )
    assert r.exit_code == 0, r.output
    text = svg_text(out)
    assert "card label" in text and "·Austin" in text and "top activations" in text


def test_draw_image_prompt(db: neo4j.Driver, neo4j_settings: Any, tmp_path: Path) -> None:
    im = picture((64, 48))
    g = image_graph(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    root = neo4j_settings.resolved_artifact_dir
    store_image(root, buf.getvalue())
    g.save(artifact_path(root, g.prompt_id))
    stored(db, g)

    out = tmp_path / "c.svg"
    r = invoke(
        neo4j_settings, "draw", "circuit", g.prompt_id, "--out", str(out), "--max-nodes", "1000"
    )
    assert r.exit_code == 0, r.output
    back, _ = read.export_graph(db, g.prompt_id)
    images = [i for i in select_nodes(back, 1000) if back.kind[i] == NodeKind.IMAGE]
    assert images and len(ids_with(out, "thumb-")) == len(images)

    heat = tmp_path / "h.png"
    r = invoke(
        neo4j_settings, "draw", "heatmap", g.prompt_id, "--tokens", "0,3", "--out", str(heat)
    )
    assert r.exit_code == 0, r.output
    with Image.open(heat) as h:
        assert h.size == (64 * 6, 48 * 6)  # a small image is enlarged to >= 384 px
    r = invoke(neo4j_settings, "draw", "heatmap", g.prompt_id, "--tokens", "9", "--out", str(heat))
    assert r.exit_code != 0 and "not one of" in str(r.exception)
