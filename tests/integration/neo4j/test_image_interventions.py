"""Interventions on image + text prompts through the pipeline step, against a real Neo4j: the
stored graph of an image prompt gives predictions, a stored image prompt is a donor by its id,
its faithfulness report runs, and a queued spec carries its image by content address."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from atlas.errors import InputError
from atlas.pipeline.intervention_payloads import InterventionSpec
from atlas.pipeline.interventions import (
    canonical_spec,
    faithfulness_step,
    intervene_step,
)
from atlas.pipeline.payloads import PromptSpec
from atlas.pipeline.submit import submit
from atlas.testing.vlm_case import PROMPT, VlmCase, picture, tiny_vlm_case

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> VlmCase:
    return tiny_vlm_case(tmp_path_factory.mktemp("vlm_intervene"))


@pytest.fixture()
def stored(db: Any, neo4j_settings: Any, case: VlmCase) -> tuple[str, str]:
    """Two image prompts attributed and stored inline (default settings): their prompt ids."""
    other = picture(case.image.with_name("other.png"), seed=5)
    specs = [
        PromptSpec(
            prompt=PROMPT,
            model=str(case.model_dir),
            transcoders=str(case.tc_dir),
            image=str(img),
        )
        for img in (case.image, other)
    ]
    job_id, _ = submit(neo4j_settings, specs, source="test", driver=db)
    from atlas.store.jobs import JobStore

    items = JobStore(db, neo4j_settings.neo4j_database).items(job_id)
    assert [it.state for it in items] == ["done", "done"], [it.reason for it in items]
    return items[0].prompt_id, items[1].prompt_id


def _spec(case: VlmCase, **kw: Any) -> InterventionSpec:
    return InterventionSpec(
        prompt=PROMPT, model=str(case.model_dir), transcoders=str(case.tc_dir), **kw
    )


def graph_token(case: VlmCase, token_id: int) -> str:
    from transformers import AutoTokenizer

    return str(AutoTokenizer.from_pretrained(case.model_dir).decode([token_id]))


def _active_image_feature(case: VlmCase) -> tuple[int, int, int]:
    from atlas.interventions import clean_run
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    model = load_model(case.model_dir)
    tset = load_transcoders(case.tc_dir, model)
    inputs = model.inputs(PROMPT, image=case.image)
    acts = clean_run(model, tset, inputs).activations
    assert inputs.image_positions is not None
    img = set(inputs.image_positions.tolist())
    for layer, pos, f in acts.nonzero().tolist():
        if pos in img:
            return int(layer), int(pos), int(f)
    raise AssertionError("no feature active at an image position")


def test_image_prompt_is_predicted_from_its_stored_graph(
    stored: tuple[str, str], neo4j_settings: Any, case: VlmCase
) -> None:
    from atlas.graph import Graph, artifact_path
    from atlas.interventions import feature_nodes
    from atlas.interventions.predict import graph_view

    graph = Graph.load(artifact_path(neo4j_settings.resolved_artifact_dir, stored[0]))
    layer, pos, f = sorted(feature_nodes(graph))[0]  # a node of the stored graph
    view = graph_view(graph)
    logit = int(view.logit_tokens[0])
    token = str(graph_token(case, logit))
    spec = _spec(
        case,
        image=str(case.image),
        edits=[{"layer": layer, "pos": pos, "feature": f, "mode": "scale", "amount": 2.0}],
        watch=[token],
    )
    answer = intervene_step(spec, neo4j_settings)
    assert answer["prompt_id"] == stored[0]
    [watched] = answer["watch"]
    assert watched["token_id"] == logit and 0 <= watched["steered"] <= 1
    k = len(answer["predicted"]["rows"]) - len(view.logit_tokens)
    assert watched["predicted_logit"] == answer["predicted"]["direct_effect"][k]
    assert watched["measured_logit"] == answer["predicted"]["measured"][k]
    pred = answer["predicted"]
    assert pred is not None and pred["sources"] == [[layer, pos, f]]
    assert len(pred["direct_effect"]) == len(pred["measured"]) == len(pred["rows"]) > 0
    # the spec's id names the image by content, wherever the file lies
    assert answer["id"] == canonical_spec(spec, neo4j_settings).content_id()
    moved = _spec(
        case,
        image=str(Path(case.image).rename(case.image.with_name("moved.png"))),
        edits=spec.model_dump()["edits"],
        watch=[token],
    )
    try:
        assert intervene_step(moved, neo4j_settings)["id"] == answer["id"]
    finally:
        Path(str(moved.image)).rename(case.image)


def test_stored_image_prompt_is_a_donor_by_id(
    stored: tuple[str, str], neo4j_settings: Any, case: VlmCase
) -> None:
    layer, pos, f = _active_image_feature(case)
    edit = [{"layer": layer, "pos": pos, "feature": f, "mode": "set", "amount": 0.0}]
    own = intervene_step(
        _spec(case, image=str(case.image), donor=stored[0], edits=edit), neo4j_settings
    )
    assert own["kl"] == pytest.approx(0.0, abs=1e-9)  # its own activations change nothing
    other = intervene_step(
        _spec(case, image=str(case.image), donor=stored[1], edits=edit), neo4j_settings
    )
    assert other["interventions"] and other["interventions"][0][:3] == [layer, pos, f]
    # every feature at the image tokens: the image's own activations change nothing, another
    # image's change the answer's distribution
    whole = {"patch_image_tokens": True, "edits": []}
    same = intervene_step(
        _spec(case, image=str(case.image), donor=stored[0], **whole), neo4j_settings
    )
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["interventions"]
    moved = intervene_step(
        _spec(case, image=str(case.image), donor=stored[1], **whole), neo4j_settings
    )
    assert moved["kl"] > 0
    with pytest.raises(InputError, match="needs a donor"):
        intervene_step(_spec(case, image=str(case.image), **whole), neo4j_settings)
    with pytest.raises(InputError, match="brings its own image"):
        intervene_step(
            _spec(
                case,
                image=str(case.image),
                donor=stored[1],
                donor_image=str(case.image),
                edits=edit,
            ),
            neo4j_settings,
        )


def test_faithfulness_of_an_image_prompt(stored: tuple[str, str], neo4j_settings: Any) -> None:
    report = faithfulness_step(stored[0], neo4j_settings, n_sources=3)
    assert report["prompt_id"] == stored[0]
    assert report["n_sources"] >= 1 and len(report["kl"]) == report["n_sources"]


def test_queued_specs_carry_their_images_by_content(neo4j_settings: Any, case: VlmCase) -> None:
    spec = _spec(case, image=str(case.image), donor=PROMPT, donor_image=str(case.image))
    queued = canonical_spec(spec, neo4j_settings, store_images=True)
    assert queued.image is not None and queued.image.startswith("sha256:")
    assert queued.donor_image == queued.image
    from atlas.images import stored_image_path

    assert stored_image_path(neo4j_settings.resolved_artifact_dir, queued.image[7:]).is_file()
