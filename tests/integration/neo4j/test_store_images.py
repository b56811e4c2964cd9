"""Image + text prompts in the atlas, against the real Neo4j the fixtures start: ingestion (Image,
ImageTokenNode), image ends and regions in the named queries, tag filters, image labels, the
round trip artifact -> Neo4j -> export, and the pipeline and CLI with good and bad images."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import neo4j
import pytest
import torch

from atlas.attribution import attribute
from atlas.circuits.labels import common_tags
from atlas.graph import Graph, NodeKind
from atlas.images import sha256_bytes
from atlas.models import load_model
from atlas.store import read
from atlas.store.ingest import graph_rows, ingest_rows
from atlas.store.labels import label_features
from atlas.store.schema import apply_schema
from atlas.testing.vlm_case import PROMPT, VlmCase, picture, tiny_vlm_case
from atlas.transcoders import load_transcoders
from tests.helpers import run_console

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> VlmCase:
    return tiny_vlm_case(tmp_path_factory.mktemp("vlm_store"))


@pytest.fixture(scope="module")
def results(case: VlmCase) -> list[Any]:
    """Two image prompts on one image, one on another image."""
    model = load_model(case.model_dir)
    tset = load_transcoders(case.tc_dir, model)
    other = picture(case.image.with_name("other.png"), seed=3)
    return [
        attribute(text, model, tset, image=img)
        for text, img in ((PROMPT, case.image), ("count the fingers", case.image), (PROMPT, other))
    ]


@pytest.fixture(scope="module")
def graphs(results: list[Any]) -> list[Graph]:
    return [r.to_graph() for r in results]


@pytest.fixture(scope="module")
def full_graphs(results: list[Any]) -> list[Graph]:
    """Unpruned: features at image positions kept (the tiny model's pruning drops them)."""
    return [r.to_graph(prune=False) for r in results]


def _rows(driver: neo4j.Driver, text: str, **params: Any) -> list[dict[str, Any]]:
    with driver.session() as session:
        return [r.data() for r in session.run(text, **params)]


def _ingest(
    driver: neo4j.Driver, graphs: list[Graph], tags: list[list[str]], max_edges: int | None = None
) -> None:
    for g, t in zip(graphs, tags, strict=True):
        assert ingest_rows(driver, graph_rows(g, image_tags=t, max_edges=max_edges)).created


def _top_logit(driver: neo4j.Driver) -> str:
    (row,) = _rows(
        driver,
        "MATCH (l:LogitNode)-[:OF]->(t:Token) RETURN t.text_norm AS text "
        "ORDER BY l.logit_prob DESC LIMIT 1",
    )
    return str(row["text"])


def test_images_and_image_tokens_are_stored(db: neo4j.Driver, graphs: list[Graph]) -> None:
    _ingest(db, graphs, [["hands"], ["hands", "six"], []])
    images = _rows(
        db,
        "MATCH (i:Image) OPTIONAL MATCH (p:Prompt)-[:HAS_IMAGE]->(i) "
        "RETURN i.sha256 AS sha, i.width AS w, i.height AS h, i.tags AS tags, count(p) AS n "
        "ORDER BY n DESC",
    )
    first = graphs[0].metadata.image_sha256
    top = images[0]
    assert (top["sha"], top["w"], top["h"], top["n"]) == (first, 50, 40, 2)
    assert sorted(images[0]["tags"]) == ["hands", "six"] and images[1]["tags"] == []
    tokens = _rows(
        db,
        "MATCH (n:Node:ImageTokenNode {prompt: $p}) RETURN n.kind AS kind, n.pos AS pos, "
        "n.row AS row, n.col AS col, n.k AS k, n.image AS image, n.top_patches AS patches, "
        "n.top_weights AS weights ORDER BY n.k",
        p=graphs[0].prompt_id,
    )
    assert len(tokens) == 16 and {t["kind"] for t in tokens} == {"image"}
    assert [[t["row"], t["col"]] for t in tokens] == graphs[0].image_grid.tolist()  # type: ignore[union-attr]
    assert [t["pos"] for t in tokens] == graphs[0].image_positions.tolist()  # type: ignore[union-attr]
    maps = graphs[0].rollout
    assert maps is not None
    best = int(maps[3].flatten().argmax())
    assert tokens[3]["patches"][0] == best and len(tokens[3]["weights"]) == 8
    assert tokens[3]["image"] == first


def test_round_trip_artifact_store_export(db: neo4j.Driver, graphs: list[Graph]) -> None:
    from atlas.interchange import graph_from_json

    _ingest(db, graphs[:1], [["hands"]])
    g = graphs[0]
    back, _ = read.export_graph(db, g.prompt_id)
    assert back.node_ids() == g.node_ids() and torch.equal(back.kind, g.kind)
    assert torch.equal(back.image_positions, g.image_positions)  # type: ignore[arg-type]
    assert torch.equal(back.image_grid, g.image_grid)  # type: ignore[arg-type]
    assert back.rollout is None  # the maps stay in the artifact; the store keeps their summary
    assert back.metadata.image == g.metadata.image and back.prompt_id == g.prompt_id
    assert torch.allclose(back.edge_weight, g.edge_weight)
    doc = read.export_json(db, g.prompt_id)
    again = graph_from_json(doc)
    assert torch.equal(again.kind, g.kind) and torch.equal(again.image_grid, g.image_grid)  # type: ignore[arg-type]


def test_paths_from_image_ends_and_regions(db: neo4j.Driver, graphs: list[Graph]) -> None:
    _ingest(db, graphs, [["hands"], ["hands"], ["other"]])
    logit = f"logit:{_top_logit(db)}"
    every = read.paths(db, "image", logit, max_hops=3, limit=100_000)
    assert every["paths"], "no path from the image to the top logit"
    ids = {g.prompt_id: g for g in graphs}
    starts = {(p["prompt"], p["nodes"][0]) for p in every["paths"]}
    for prompt, node in starts:
        g = ids[prompt]
        assert node in {g.node_ids()[i] for i in torch.nonzero(g.kind == NodeKind.IMAGE).flatten()}
    assert all(a["route"][0].startswith("image:") for a in every["aggregate"])

    one = read.paths(db, "image:1,2", logit, max_hops=3, limit=100_000)
    g0 = graphs[0]
    pos_12 = int(g0.image_positions[6])  # type: ignore[index]
    assert one["paths"] and all(p["nodes"][0].endswith(f"_{pos_12}") for p in one["paths"])
    box = read.paths(db, "image:0-1,1-2", logit, max_hops=3, limit=100_000)
    assert len(one["paths"]) <= len(box["paths"]) <= len(every["paths"])

    tagged = read.paths(db, "image", logit, max_hops=3, limit=100_000, image_tag="other")
    assert {p["prompt"] for p in tagged["paths"]} <= {graphs[2].prompt_id}
    none = read.paths(db, "image", logit, max_hops=3, image_tag="no-such-tag")
    assert none["paths"] == []
    from atlas.errors import InputError

    with pytest.raises(InputError, match="source only"):
        read.paths(db, logit, "image")
    with pytest.raises(InputError, match="bad image region"):
        read.paths(db, "image:1", logit)


def test_image_regions_and_image_labels(db: neo4j.Driver, full_graphs: list[Graph]) -> None:
    graphs = full_graphs  # the largest edges only: the test server's memory pool is small
    _ingest(db, graphs, [["hands"], ["hands"], []], max_edges=3000)
    (row,) = _rows(
        db,
        "MATCH (:ImageTokenNode)-[e:EDGE]->(n:FeatureNode)-[:OF]->(f:Feature) "
        "RETURN f.layer AS layer, f.index AS idx, sum(abs(e.w)) AS s ORDER BY s DESC LIMIT 1",
    )
    spec = f"feature:{row['layer']}/{row['idx']}"
    regions = read.image_regions(db, spec, limit=100)
    assert regions and all(r["image"] in {g.metadata.image_sha256 for g in graphs} for r in regions)
    assert all(len(r["top_patches"]) == 8 and len(r["top_patches"][0]) == 2 for r in regions)
    assert abs(regions[0]["sum_w"]) >= abs(regions[-1]["sum_w"])
    assert read.image_regions(db, spec, image_tag="no-such-tag") == []
    active = read.active_prompts(db, spec, limit=10)
    tagged = [r for r in active if r["prompt"] in {graphs[0].prompt_id, graphs[1].prompt_id}]
    assert read.active_prompts(db, spec, image_tag="hands") == tagged
    # the tag narrows inside the query, before the row cap
    assert read.active_prompts(db, spec, image_tag="hands", limit=1) == tagged[:1]
    assert read.active_prompts(db, spec, image_tag="no-such-tag") == []

    label_features(db)
    labelled = _rows(
        db,
        "MATCH (f:Feature) WHERE f.top_image_regions IS NOT NULL "
        "RETURN f.label AS label, f.top_image_regions AS regions, f.top_image_prompts AS prompts",
    )
    assert labelled
    first = labelled[0]
    sha, cell = first["regions"][0].split("@")
    assert any(g.metadata.image_sha256.startswith(sha) for g in graphs)  # type: ignore[union-attr]
    assert "sees: image" in first["label"] and cell in first["label"]
    # a label names the image tags at least two thirds of its top activations carry
    tags = {graphs[0].prompt_id: ["hands"], graphs[1].prompt_id: ["hands"]}
    seen = set()
    for r in _rows(db, "MATCH (f:Feature) RETURN f.label AS label, f.top_act_prompts AS top"):
        per_activation = [tags.get(ref.rsplit(":", 1)[0], []) for ref in r["top"] or []]
        named = common_tags(per_activation) == ["hands"]
        assert (r["label"] or "").startswith("images: hands") == named, r
        seen.add(named)
    assert seen == {True, False}


# --------------------------------------------------------------------------- pipeline and CLI
def _console(args: list[str], settings: Any, **env: str) -> subprocess.CompletedProcess[str]:
    """The console script, inline (no Redis) and offline."""
    return run_console(
        args, settings, timeout=600, **({"REDIS_URL": "", "HF_HUB_OFFLINE": "1"} | env)
    )


def _bad_images(root: Path, good: Path) -> dict[str, Path]:
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "not_image": root / "notes.png",
        "empty": root / "empty.png",
        "truncated": root / "cut.png",
        "huge": root / "huge.png",
    }
    files["not_image"].write_text("this is not a picture\n")
    files["empty"].write_bytes(b"")
    files["truncated"].write_bytes(good.read_bytes()[:80])
    picture(files["huge"], seed=5, size=(400, 300))
    return files


def test_batch_with_good_and_bad_images(
    clean_neo4j: neo4j.Driver, neo4j_settings: Any, case: VlmCase, tmp_path: Path
) -> None:
    """A batch of image prompts through the real CLI: the good ones are stored with their image,
    every bad one fails alone with one line naming its file, nothing is stored for it."""
    apply_schema(clean_neo4j)
    shutil_copy = tmp_path / "pics" / "hand.png"
    shutil_copy.parent.mkdir(parents=True)
    shutil_copy.write_bytes(case.image.read_bytes())
    bad = _bad_images(tmp_path / "pics", case.image)
    vlm = {"model": str(case.model_dir), "transcoders": str(case.tc_dir)}
    text_only = {"model": str(case.text_dir), "transcoders": str(case.tc_dir)}
    lines = [
        {"prompt": PROMPT, "image": "pics/hand.png", "tags": ["hands"], **vlm},
        {"prompt": "count the fingers", "image": "pics/hand.png", **vlm},
        *({"prompt": PROMPT, "image": f"pics/{p.name}", **vlm} for p in bad.values()),
        {"prompt": PROMPT, "image": "pics/hand.png", **text_only},
        {"prompt": "<start_of_image> a <start_of_image> b", "image": "pics/hand.png", **vlm},
        {"prompt": " ".join(["hand"] * 600), "image": "pics/hand.png", **vlm},
    ]
    batch = tmp_path / "batch.jsonl"
    batch.write_text("".join(json.dumps(x) + "\n" for x in lines))
    out = _console(["batch", str(batch)], neo4j_settings, IMAGE_MAX_PIXELS="100000")
    assert out.returncode == 1, (out.stdout, out.stderr[-3000:])
    assert "2 done, 7 failed of 9" in out.stderr, out.stderr[-3000:]
    failed = [ln for ln in out.stderr.splitlines() if ln.startswith("  item ")]
    assert len(failed) == 7
    for ln, name in zip(failed, ["notes.png", "empty.png", "cut.png", "huge.png"], strict=False):
        assert name in ln, ln
    assert "not an image" in failed[0] and "empty" in failed[1] and "truncated" in failed[2]
    assert "pixel limit" in failed[3]
    assert "text-only model" in failed[4] and "hand.png" in failed[4]
    assert "placeholders" in failed[5] and "hand.png" in failed[5]
    assert "more than the limit" in failed[6] and "hand.png" in failed[6]

    sha = sha256_bytes(case.image.read_bytes())
    prompts = _rows(
        clean_neo4j,
        "MATCH (p:Prompt) OPTIONAL MATCH (p)-[:HAS_IMAGE]->(i:Image) "
        "RETURN p.image_sha256 AS psha, i.sha256 AS sha, i.tags AS tags",
    )
    assert [(r["psha"], r["sha"]) for r in prompts] == [(sha, sha)] * 2
    stored = neo4j_settings.resolved_artifact_dir / "images" / sha[:2] / f"{sha}.png"
    assert stored.read_bytes() == case.image.read_bytes()
    assert not list((neo4j_settings.resolved_artifact_dir / "images").glob("*/*.tmp"))

    # the queue message and the job record carry the hash, never the pixels or the path
    job = out.stdout.strip().splitlines()[-1]
    items = _rows(clean_neo4j, "MATCH (i:JobItem {job_id: $j}) RETURN i.spec AS spec", j=job)
    specs = [json.loads(i["spec"]) if isinstance(i["spec"], str) else i["spec"] for i in items]
    assert sum(s.get("image") == f"sha256:{sha}" for s in specs) == 5

    # re-running the file skips what is done (same prompt id: the image hash is part of it)
    again = _console(["batch", str(batch)], neo4j_settings, IMAGE_MAX_PIXELS="100000")
    assert "2 done" in again.stderr and again.returncode == 1

    logit = _top_logit(clean_neo4j)
    q = _console(
        ["query", "paths", "--from", "image", "--to", f"logit:{logit}", "--max-hops", "3",
         "--image-tag", "hands", "--format", "json"],
        neo4j_settings,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads(q.stdout)["paths"]

    # a supernode of image-prompt features is validated on those prompts, with their image
    top = _rows(
        clean_neo4j,
        "MATCH (n:FeatureNode) RETURN n.layer AS l, n.feature AS f, sum(n.activation) AS a "
        "ORDER BY a DESC, l, f LIMIT 3",
    )
    specs = [f"{r['l']}/{r['f']}" for r in top]
    made = _console(
        ["supernode", "define", "Seen", *(a for spec in specs for a in ("--feature", spec))],
        neo4j_settings,
    )
    assert made.returncode == 0, made.stderr[-2000:]
    v = _console(
        ["supernode", "validate", "Seen", "--prompts", "2", "--model", str(case.model_dir),
         "--transcoders", str(case.tc_dir), "--format", "json"],
        neo4j_settings,
    )  # fmt: skip
    assert v.returncode == 0, v.stderr[-2000:]
    (res,) = json.loads(v.stdout)
    assert res["name"] == "Seen" and res["validation_prompts"] == 2 and res["validation_kl"] >= 0.0
    assert -1.0 <= res["validation_drop"] <= 1.0
    runs = _rows(
        clean_neo4j,
        "MATCH (i:Intervention)-[:TOUCHES]->(:Supernode {name: 'Seen'}) "
        "MATCH (p:Prompt {id: i.prompt_id}) RETURN p.image_sha256 AS sha",
    )
    assert [r["sha"] for r in runs] == [sha, sha]


def test_enqueue_with_image(clean_neo4j: neo4j.Driver, neo4j_settings: Any, case: VlmCase) -> None:
    apply_schema(clean_neo4j)
    out = _console(
        ["enqueue", PROMPT, "--image", str(case.image), "--tag", "t1", "--model",
         str(case.model_dir), "--transcoders", str(case.tc_dir)],
        neo4j_settings,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = _rows(clean_neo4j, "MATCH (p:Prompt)-[:HAS_IMAGE]->(i:Image) RETURN i.tags AS tags")
    assert rows == [{"tags": ["t1"]}]
    (feature,) = _rows(
        clean_neo4j,
        "MATCH (:ImageTokenNode)-[:EDGE]->(:FeatureNode)-[:OF]->(f:Feature) "
        "RETURN f.layer AS l, f.index AS i LIMIT 1",
    )
    q = _console(
        ["query", "image-regions", f"feature:{feature['l']}/{feature['i']}", "--format", "json"],
        neo4j_settings,
    )
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads(q.stdout)[0]["image"] == sha256_bytes(case.image.read_bytes())


def test_image_prompt_through_a_celery_worker(
    clean_neo4j: neo4j.Driver, service_settings: Any, celery_worker: Any, case: VlmCase
) -> None:
    """Celery mode: the message carries the image's address, the worker reads the image from
    the shared artifact store, and the prompt is stored with its Image."""
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import submit, wait_for_job

    apply_schema(clean_neo4j)
    spec = PromptSpec(
        prompt=PROMPT,
        image=str(case.image),
        tags=["celery"],
        model=str(case.model_dir),
        transcoders=str(case.tc_dir),
    )
    job, _ = submit(service_settings, [spec], source="test", driver=clean_neo4j)
    summary = wait_for_job(service_settings, clean_neo4j, job, timeout_s=300, poll_s=0.5)
    assert (summary.done, summary.failed) == (1, 0), celery_worker.log_text()[-3000:]
    rows = _rows(
        clean_neo4j,
        "MATCH (p:Prompt)-[:HAS_IMAGE]->(i:Image) RETURN i.sha256 AS sha, i.tags AS tags",
    )
    assert rows == [{"sha": sha256_bytes(case.image.read_bytes()), "tags": ["celery"]}]
