"""``atlas intervene`` through the real console script on the tiny golden Gemma-2 model: its JSON
equals the compute core called directly, and bad input is one stderr line with nothing stored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from atlas.interventions import FeatureEdit, clean_run, feature_intervention
from atlas.models import load_model
from atlas.transcoders import load_transcoders
from tests import REPO_ROOT

pytestmark = pytest.mark.timeout(900)

GOLDEN = REPO_ROOT / "tests" / "golden"
MODEL = GOLDEN / "gemma2_jumprelu" / "model"
TCS = GOLDEN / "gemma2_jumprelu" / "transcoders"
PROMPT = "The cat sat"


def console(args: list[str], home: Path, settings: Any = None) -> subprocess.CompletedProcess[str]:
    """``.venv/bin/atlas intervene ...`` with its own atlas home (and the test Neo4j if given)."""
    script = Path(sys.executable).with_name("atlas")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "REDIS_"))}
    env |= {"ATLAS_HOME": str(home), "OMP_NUM_THREADS": "1"}
    if settings is not None:
        env |= {
            "NEO4J_URI": settings.neo4j_uri,
            "NEO4J_USER": settings.neo4j_user,
            "NEO4J_PASSWORD": settings.neo4j_password.get_secret_value(),
        }
    base = ["intervene", "--model", str(MODEL), "--transcoders", str(TCS), "--prompt", PROMPT]
    return subprocess.run(
        [str(script), *base, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )


@pytest.fixture(scope="module")
def world() -> tuple[Any, Any]:
    model = load_model(MODEL)
    return model, load_transcoders(TCS, model)


def test_set_and_ablate_json_equal_the_core(world: tuple[Any, Any], tmp_path: Path) -> None:
    model, tset = world
    out = console(
        ["--set", "1:last:3=2.5", "--ablate", "0:1:5", "--generate", "2", "--format", "json"],
        tmp_path,
    )
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert {"base_logits", "steered_logits", "top", "kl", "predicted", "generated"} <= set(got)
    inputs = model.inputs(PROMPT)
    edits = [FeatureEdit(1, -1, 3, "set", 2.5), FeatureEdit(0, 1, 5, "ablate")]
    want = feature_intervention(model, tset, inputs, edits, clean=clean_run(model, tset, inputs))
    steered = torch.tensor(got["steered_logits"])
    base = torch.tensor(got["base_logits"])
    assert steered.shape == (model.info.vocab_size,)
    torch.testing.assert_close(steered, want.last_logits.float().cpu(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(base, want.base_last_logits.float().cpu(), rtol=1e-5, atol=1e-5)
    assert got["kl"] == pytest.approx(want.kl(), rel=1e-4, abs=1e-7)
    assert [t["token_id"] for t in got["top"]] == [t for t, _, _ in want.top(10)]
    assert got["predicted"] is None  # no graph of this prompt in this atlas home
    assert isinstance(got["generated"], str) and len(got["generated_ids"]) == 2


def test_donor_of_the_same_prompt_changes_nothing(world: tuple[Any, Any], tmp_path: Path) -> None:
    """Circuit patching a prompt with its own activations (a text donor) is the clean run."""
    model, tset = world
    acts = clean_run(model, tset, model.inputs(PROMPT)).activations
    layer, pos, feature = (int(v) for v in acts.nonzero()[-1])
    edit = f"{layer}:{pos}:{feature}=0"
    out = console(["--donor", PROMPT, "--set", edit, "--format", "json"], tmp_path)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["kl"] == pytest.approx(0.0, abs=1e-9)
    assert got["interventions"] == [[layer, pos, feature, 0.0]]


def _inactive_feature(world: tuple[Any, Any]) -> int:
    model, tset = world
    acts = clean_run(model, tset, model.inputs(PROMPT)).activations
    return int((acts[1].abs().sum(0) == 0).nonzero()[0])


def _other_tset_donor(home: Path) -> str:
    """A stored graph of another transcoder set (the CLT golden world), in the artifact store."""
    from atlas.attribution import attribute
    from atlas.graph import artifact_path

    model = load_model(GOLDEN / "gemma2_clt" / "model")
    tset = load_transcoders(GOLDEN / "gemma2_clt" / "transcoders", model)
    graph = attribute("hello", model, tset).to_graph(prune=True)
    pid = graph.metadata.prompt_id()
    graph.save(artifact_path(home / "artifacts", pid))
    return pid


BAD = {
    "unknown feature": ["--set", "1:last:100000=1"],
    "layer out of range": ["--set", "7:1:3=1"],
    "position out of range": ["--ablate", "0:99:3"],
    "nan": ["--set", "1:1:3=nan"],
    "infinite": ["--scale", "1:1:3=inf"],
    "image for a text-only model": ["--image", str(REPO_ROOT / "README.md"), "--set", "1:1:3=1"],
    "supernode with no active member": ["--supernode", "quiet=0"],
    "donor with another transcoder set": ["--donor", "DONOR", "--set", "1:1:3=1"],
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line_and_stores_nothing(
    case: str, world: tuple[Any, Any], db: Any, neo4j_settings: Any, tmp_path: Path
) -> None:
    from atlas.store.supernodes import define

    args = list(BAD[case])
    if case.startswith("supernode"):
        fid = f"{world[1].info.content_hash}/1/{_inactive_feature(world)}"
        with db.session() as s:
            s.run("MERGE (:Feature {fid: $fid})", fid=fid).consume()
        define(db, "quiet", [fid])
    if case.startswith("donor"):
        args[args.index("DONOR")] = _other_tset_donor(tmp_path)
    out = console([*args, "--store", "--format", "json"], tmp_path, neo4j_settings)
    assert out.returncode != 0, out.stdout
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), out.stderr
    with db.session() as s:
        assert s.run("MATCH (i:Intervention) RETURN count(i) AS n").single()["n"] == 0


def _atlas(args: list[str], home: Path, settings: Any) -> subprocess.CompletedProcess[str]:
    """Any ``atlas`` command with the test Neo4j."""
    script = Path(sys.executable).with_name("atlas")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "REDIS_"))}
    env |= {
        "ATLAS_HOME": str(home),
        "OMP_NUM_THREADS": "1",
        "NEO4J_URI": settings.neo4j_uri,
        "NEO4J_USER": settings.neo4j_user,
        "NEO4J_PASSWORD": settings.neo4j_password.get_secret_value(),
    }
    return subprocess.run(
        [str(script), *args], env=env, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT
    )


def test_steer_vector_build_apply_list_query(db: Any, neo4j_settings: Any, tmp_path: Path) -> None:
    pos, neg = tmp_path / "pos.txt", tmp_path / "neg.txt"
    pos.write_text("The cat sat\nA cat ran\n")
    neg.write_text("The dog sat\nA dog ran\n")
    refs = ["--model", str(MODEL), "--transcoders", str(TCS)]
    build = ["steer-vector", "build", "cat", *refs, "--layer", "1"]
    out = _atlas(
        [*build, "--positive", str(pos), "--negative", str(neg), "--format", "json"],
        tmp_path,
        neo4j_settings,
    )
    assert out.returncode == 0, out.stderr
    built = json.loads(out.stdout)
    assert built["layer"] == 1 and len(built["close"]) == 10
    assert built["projections"]["The cat sat"] > built["projections"]["The dog sat"]

    out = _atlas(["steer-vector", "list", "--format", "json"], tmp_path, neo4j_settings)
    assert [r["name"] for r in json.loads(out.stdout)] == ["cat"]

    def apply(alpha: str) -> dict[str, Any]:
        args = ["steer-vector", "apply", "cat", "--prompt", "A bird sat", "--alpha", alpha]
        res = _atlas([*args, "--format", "json"], tmp_path, neo4j_settings)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)  # type: ignore[no-any-return]

    zero, up, down = apply("0"), apply("2"), apply("-2")
    assert zero["kl"] == pytest.approx(0.0, abs=1e-9)
    p = up["projection"]
    assert p["steered"] > p["clean"] > down["projection"]["steered"]

    out = _atlas(["query", "vector", "cat", "--format", "json"], tmp_path, neo4j_settings)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["features"] == []  # no graph ingested: no atlas features to link
    assert "A bird sat" in [r["prompt"] for r in report["prompts"]]
    assert report["prompts"][0]["projection"] == max(r["projection"] for r in report["prompts"])
