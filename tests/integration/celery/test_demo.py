"""``atlas demo``: prompt selection, and a small end-to-end run (real Neo4j, Redis and workers)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO_ROOT


def _toy_world_present() -> None:
    """The toy world ships with the package: its absence fails the test (a packaging fault)."""
    from atlas.toy import toy_paths

    toy_paths()


def test_demo_prompts_are_many_unique_and_hand_heavy() -> None:
    from atlas.toy import ToyCorpus
    from atlas.toy.demo import demo_prompts

    prompts = demo_prompts(120)
    assert len(prompts) == 120 == len(set(prompts))
    assert demo_prompts(120) == prompts  # deterministic
    facts = {f.prompt: f for f in ToyCorpus(seed=0).facts}
    assert all(p in facts for p in prompts)
    hand = [p for p in prompts if "hand" in facts[p].subject]
    assert len(hand) >= 40
    assert prompts[: len(hand)] == hand  # every hand fact first
    families = {facts[p].family for p in prompts}
    assert {"count", "arith", "colour"} <= families
    answers = {facts[p].answer for p in prompts}
    assert "5" in answers and len(answers) >= 5  # other facts have other answers
    assert len(demo_prompts(200)) == 200


@pytest.mark.slow
def test_demo_runs_end_to_end_and_stops_what_it_started(tmp_path: Path) -> None:
    _toy_world_present()
    home = tmp_path / "demo"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "REDIS_"))}
    out = subprocess.run(
        [sys.executable, "-m", "atlas", "demo", "--home", str(home), "--prompts", "12"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-3000:])
    text = out.stdout
    assert "All paths from Hand to '5'" in text
    assert "atlas.store.queries.PATHS[" in text
    assert "Top contributors to '5'" in text
    assert "atlas.store.queries.TOP_CONTRIBUTORS" in text
    assert "12 done, 0 failed" in out.stderr
    # the image part: the batch, the six-finger case, the causal steps, the atlas-wide answers
    assert "103 done, 0 failed" in out.stderr
    for heading in (
        "Global circuit Hand -> '5'",
        "What the toy VLM answers on the demo images",
        "The six-finger case:",
        "All paths from Visual hand to '5' in those images",
        "Image regions feeding the Visual hand nodes",
        "Six-finger hands answered '5' (A)",
        "what explains the error:",
        "Supernodes proposed from the atlas",
        "Ablating the 8 visual Hand features",
        "Circuit patching: planet_mars",
    ):
        assert heading in text, heading
    assert "atlas.store.queries.IMAGE_REGIONS" in text
    # the six-finger case on the shipped toy VLM: the visual Hand supernode reaches '5'
    found = re.search(r"All paths from Visual hand to '5' in those images \(.*?: (\d+) paths", text)
    assert found is not None and int(found.group(1)) > 0, text[-4000:]
    assert re.search(r"the circuit at the question \(\d+ features\)", text)
    # the proposals hold a match for the visual Hand from labels, proved by ablation
    assert re.search(r"│ Hand images +│ \d+ +│ [PC]\d+ ", text), text[-6000:]
    assert re.search(r"ablating '[PC]\d+ [^']*' \(\d+ features.*: KL [0-9.e+-]+", text)
    assert "atlas.store.queries.INTERVENTIONS_BY_ID" in text
    assert "atlas serve" in text
    pictures = sorted(p.name for p in (home / "pictures").iterdir())
    assert "paths_hand_to_5.png" in pictures and "global_hand_to_5.png" in pictures
    assert any(p.startswith("heatmap_hand_6") for p in pictures), pictures
    assert all((home / "pictures" / p).stat().st_size > 1000 for p in pictures)

    # everything it started is stopped: no live Neo4j or Redis in the demo home
    from atlas.services import neo4j_local, redis_local

    assert not neo4j_local.status(home=home / "neo4j").running
    assert redis_local.running(home / "redis") is None
