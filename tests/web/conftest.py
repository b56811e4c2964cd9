"""A small stored world for the page and API tests (real Neo4j), built once per module, and
the app around it: synthetic prompts with recurring features, labels, a supernode, a job, an
image prompt with its image and artifact, and a stored intervention."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import neo4j
import pytest
from starlette.testclient import TestClient

from atlas.graph import Graph, NodeKind, artifact_path
from atlas.images import store_image
from atlas.pipeline.intervention_payloads import InterventionSpec
from atlas.store import queries as Q
from atlas.store import supernodes
from atlas.store.connection import write_rows
from atlas.store.ingest import graph_rows, ingest_rows
from atlas.store.interventions import intervention_params
from atlas.store.jobs import JobStore
from atlas.store.schema import apply_schema
from atlas.store.synthetic import synthetic_graph
from atlas.web.app import create_app
from tests.conftest import Neo4jTarget, wipe_database
from tests.unit.render.test_render import image_graph, picture


def small(seed: int) -> Graph:
    return synthetic_graph(
        seed,
        n_layers=4,
        n_pos=6,
        n_features=40,
        n_logits=3,
        n_edges=300,
        feature_pool=30,
        vocab_size=12,
    )


@dataclass
class World:
    driver: neo4j.Driver
    settings: Any
    graphs: list[Graph]
    image: Graph
    job_id: str
    intervention_id: str
    labelled: tuple[int, int]  # (layer, index) of the labelled feature
    supernode: str
    n_members: int


def fingerprint(driver: neo4j.Driver) -> dict[str, Any]:
    """Counts of every label and relationship type and the aggregates' sums: unchanged when
    nothing was written."""
    rec = driver.execute_query(
        "CALL () { MATCH (n) RETURN count(n) AS nodes } "
        "CALL () { MATCH ()-[r]->() RETURN count(r) AS rels } "
        "CALL () { MATCH (n) UNWIND labels(n) AS l RETURN collect(DISTINCT l) AS labels } "
        "CALL () { MATCH ()-[g:AGG]->() RETURN sum(g.sum_w) AS agg_w } "
        "CALL () { MATCH (f:Feature) RETURN sum(f.n_prompts) AS feat_n, "
        "  collect(f.label) AS feature_labels } "
        "RETURN nodes, rels, labels, agg_w, feat_n, feature_labels"
    ).records[0]
    data = rec.data()
    data["labels"] = sorted(data["labels"])
    data["feature_labels"] = sorted(data["feature_labels"])
    return data


@pytest.fixture(scope="module")
def world(neo4j_driver: Any, neo4j_target: Neo4jTarget, neo4j_settings: Any) -> World:
    if not neo4j_target.allow_wipe:
        pytest.fail("NEO4J_URI points at a server these tests may not wipe", pytrace=False)
    driver = neo4j_driver
    wipe_database(driver)
    apply_schema(driver)
    graphs = [small(s) for s in (11, 12, 13)]
    for g in graphs:
        assert ingest_rows(driver, graph_rows(g)).created

    im = picture((64, 48))
    img = image_graph(im)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    root = neo4j_settings.resolved_artifact_dir
    store_image(root, buf.getvalue())
    img.save(artifact_path(root, img.prompt_id))
    assert ingest_rows(driver, graph_rows(img, image_tags=["hands"])).created

    g = graphs[0]
    feats = [i for i in range(g.n_nodes) if g.kind[i] == NodeKind.FEATURE]
    first = feats[0]
    layer, index = int(g.layer[first]), int(g.feature[first])
    driver.execute_query(
        "MATCH (f:Feature {layer: $l, index: $i}) SET f.label = 'finger count', "
        "f.top_tokens = [' five', ' 5'], f.top_values = [1.5, 0.75]",
        l=layer,
        i=index,
    )
    specs = [f"{int(g.layer[i])}/{int(g.feature[i])}" for i in feats[:4]]
    n_members = supernodes.define_from_features(driver, "Hand", specs)

    jobs = JobStore(driver, "neo4j")
    job_id = "20261201-000000-abc123"
    jobs.create(
        job_id,
        [{"prompt": "a"}, {"prompt": "b"}],
        ["spec-a", "spec-b"],
        source="test",
        mode="inline",
        already_done={0: graphs[0].prompt_id, 1: graphs[1].prompt_id},
    )

    iid = "0f" * 16
    spec = InterventionSpec(
        prompt=g.metadata.prompt, supernode={"name": "Hand", "multiplier": -1.0}
    )
    answer = {
        "id": iid,
        "kl": 0.25,
        "top": [{"token": " 5", "token_id": 5, "base": 0.6, "steered": 0.1}],
        "predicted": {
            "rows": [0],
            "direct_effect": [-0.4],
            "measured": [-0.5],
            "sources": [[0, 1, 2]],
        },
        "prompt_id": g.prompt_id,
    }
    write_rows(
        driver,
        Q.STORE_INTERVENTION,
        intervention_params(spec, answer, tset_hash="", touched=[], donor_id=None),
        database="neo4j",
        what="test intervention",
    )
    return World(
        driver=driver,
        settings=neo4j_settings,
        graphs=graphs,
        image=img,
        job_id=job_id,
        intervention_id=iid,
        labelled=(layer, index),
        supernode="Hand",
        n_members=n_members,
    )


@pytest.fixture(scope="module")
def client(world: World) -> Iterator[TestClient]:
    app = create_app(world.settings, driver=world.driver)
    with TestClient(app, base_url="http://127.0.0.1:8765", raise_server_exceptions=True) as c:
        yield c
