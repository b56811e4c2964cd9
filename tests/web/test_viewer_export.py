"""``atlas export viewer``: stored prompts in the attribution-graphs frontend's layout, read back
by the interchange reader, and opened by circuit-tracer 0.5.0's own local server (in its own
environment, ``bench/.venv-ct``; that part is skipped where the environment was not made)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from atlas.cli import cli
from atlas.graph import NodeKind
from atlas.interchange import graph_from_json
from atlas.store import read
from tests import REPO_ROOT
from tests.web.conftest import World, fingerprint

pytestmark = pytest.mark.timeout(600)

CT_PYTHON = REPO_ROOT / "bench" / ".venv-ct" / "bin" / "python"


def export(world: World, out: Path, *args: str) -> Any:
    r = CliRunner().invoke(
        cli, ["export", "viewer", "--out", str(out), *args], obj={"settings": world.settings}
    )
    assert r.exit_code == 0, r.output
    return r


@pytest.fixture(scope="module")
def exported(world: World, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("viewer")
    before = fingerprint(world.driver)
    r = export(world, out)
    assert "4 graph(s)" in r.output
    assert fingerprint(world.driver) == before
    return out


def test_layout_and_round_trip(world: World, exported: Path) -> None:
    listing = json.loads((exported / "graph-metadata.json").read_text())
    assert json.loads((exported / "graph_data" / "graph-metadata.json").read_text()) == listing
    slugs = [g["slug"] for g in listing["graphs"]]
    every = [*world.graphs, world.image]
    assert sorted(slugs) == sorted(g.prompt_id for g in every)
    assert all("atlas" not in g and g["scan"] == "synthetic-model" for g in listing["graphs"])
    for g in every:
        doc = json.loads((exported / "graph_data" / f"{g.prompt_id}.json").read_text())
        assert doc["metadata"]["slug"] == g.prompt_id
        back = graph_from_json(doc)
        stored, _ = read.export_graph(world.driver, g.prompt_id)
        assert back.node_ids() == stored.node_ids() and back.n_edges == stored.n_edges
        for node in doc["nodes"]:
            if node["feature_type"] == NodeKind.FEATURE.feature_type:
                f = exported / "features" / "synthetic-model" / f"{node['feature']}.json"
                feature = json.loads(f.read_text())
                layer, index = (int(x) for x in node["node_id"].split("_")[:2])
                assert (feature["layer"], feature["index"]) == (layer, index)
    layer, index = world.labelled
    labelled = next(
        json.loads(f.read_text())
        for f in (exported / "features" / "synthetic-model").iterdir()
        if json.loads(f.read_text())["label"] == "finger count"
    )
    assert (labelled["layer"], labelled["index"]) == (layer, index)
    assert labelled["top_logits"] == [" five", " 5"]
    examples = labelled["examples_quantiles"][0]["examples"]
    assert examples and all(max(e["tokens_acts_list"]) > 0 for e in examples)


def test_chosen_prompts_and_bad_ids(world: World, tmp_path: Path) -> None:
    g = world.graphs[0]
    export(world, tmp_path / "one", "--prompts", g.prompt_id[:10])
    listing = json.loads((tmp_path / "one" / "graph-metadata.json").read_text())
    assert [x["slug"] for x in listing["graphs"]] == [g.prompt_id]
    r = CliRunner().invoke(
        cli,
        ["export", "viewer", "--out", str(tmp_path / "bad"), "--prompts", "abcdef0123"],
        obj={"settings": world.settings},
    )
    assert r.exit_code != 0 and "no stored prompt" in str(r.exception)
    # the one-prompt export still answers under the same command
    out = tmp_path / "g.json"
    r = CliRunner().invoke(
        cli, ["export", g.prompt_id[:10], "--out", str(out)], obj={"settings": world.settings}
    )
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["metadata"]["slug"] == g.prompt_id


def test_opens_in_circuit_tracer_local_server(exported: Path) -> None:
    if not CT_PYTHON.exists():
        pytest.skip("circuit-tracer's environment is not made (bash bench/ct_env.sh)")
    r = subprocess.run(
        [str(CT_PYTHON), str(REPO_ROOT / "bench" / "ct_viewer.py"), str(exported)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO_ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    loaded = json.loads(r.stdout.strip().splitlines()[-1])
    assert loaded["graphs"] == 4 and loaded["links"] > 0 and loaded["feature_files"] > 0
