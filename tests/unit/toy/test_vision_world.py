"""The shipped toy vision world: loads through the hub code path, reproduces its recorded eval
figures, its transcoders pass the perturbation self-check on an image prompt, and the demo's
image prompt set is what the demo needs."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from atlas.attribution import attribute
from atlas.models import load_model
from atlas.models.adapters import VisionLanguageAdapter
from atlas.pipeline.payloads import PromptSpec
from atlas.toy.build import file_hashes
from atlas.toy.vision_build import HEADLINE_KEYS, VISION_ASSETS_DIR, vision_paths
from atlas.toy.vision_data import VisionWorld
from atlas.toy.vision_demo import demo_image_prompts
from atlas.toy.vision_model import N_IMAGE_TOKENS
from atlas.transcoders import load_transcoders
from tests.unit.attribution.test_vlm_attribution import Case, _check_perturbation


@pytest.fixture(scope="module")
def manifest() -> dict:
    """The shipped manifest; its absence fails (a packaging fault, as for the text toy world)."""
    return json.loads((VISION_ASSETS_DIR / "manifest.json").read_text())


def test_shipped_files_match_the_manifest(manifest: dict) -> None:
    assert file_hashes(VISION_ASSETS_DIR) == manifest["files"]
    assert manifest["command"].startswith("atlas toy build --vision")


def test_loads_through_the_hub_code_path() -> None:
    paths = vision_paths()
    model = load_model(paths.model_dir)
    assert isinstance(model.adapter, VisionLanguageAdapter) and model.is_vision
    assert model.info.family == "llava_llama"
    assert model.info.n_layers == 4 and model.info.d_model == 128
    sample = VisionWorld(0).train_sample(0)
    from atlas.models.vision import image_from_pil

    inputs = model.inputs(sample.question, image_from_pil(sample.image))
    assert inputs.n_image_tokens == N_IMAGE_TOKENS
    assert inputs.pixel_values is not None and inputs.pixel_values.shape == (1, 3, 48, 48)
    tset = load_transcoders(paths.transcoder_dir, model)
    assert tset.n_layers == 4


def test_reproduces_recorded_eval_figures(manifest: dict) -> None:
    """``atlas toy eval --vision --format json`` gives the figures the build recorded."""
    from click.testing import CliRunner

    from atlas.cli import cli

    recorded = manifest["metrics"]["eval"]
    result = CliRunner().invoke(cli, ["toy", "eval", "--vision", "--format", "json"])
    assert result.exit_code == 0, result.output
    got = json.loads(result.stdout)
    for key in HEADLINE_KEYS:
        assert 0.0 <= got[key] <= 1.0
        assert math.isclose(got[key], recorded[key], abs_tol=1e-9), key
    assert got["dots_accuracy_by_count"] == pytest.approx(recorded["dots_accuracy_by_count"])
    assert got["hand_answers_by_fingers"] == recorded["hand_answers_by_fingers"]


def test_transcoders_pass_the_perturbation_check_on_an_image_prompt(tmp_path: Path) -> None:
    paths = vision_paths()
    sample = VisionWorld(0).eval_samples(per_count=2, per_class=3)[5]  # a five-finger hand
    assert sample.task == "hand"
    image = tmp_path / "hand.png"
    image.write_bytes(sample.png_bytes())
    case = Case(
        "toy", paths.model_dir, paths.model_dir, paths.transcoder_dir, image, sample.question
    )
    model = load_model(paths.model_dir)
    res = attribute(
        sample.question,
        model,
        load_transcoders(paths.transcoder_dir, model),
        image=image,
        batch_size=64,
        max_feature_nodes=200,
        rollout=False,
    )
    _check_perturbation(case, res)


def test_demo_image_prompts(tmp_path: Path) -> None:
    items = demo_image_prompts(tmp_path / "img")
    again = demo_image_prompts(tmp_path / "img2")
    assert len(items) >= 100
    assert [i.image.read_bytes() for i in items] == [i.image.read_bytes() for i in again]
    tags = {t for i in items for t in i.tags}
    assert {f"fingers:{n}" for n in range(3, 8)} <= tags
    assert {f"dots:{n}" for n in range(1, 10)} <= tags
    assert {"planet:mars", "planet:earth", "planet:saturn", "hand"} <= tags
    for item in items[:3]:
        spec = PromptSpec(**item.spec())
        assert spec.image == str(item.image) and Path(spec.image).is_file()
    assert torch.tensor([len(i.tags) for i in items]).min() >= 2


def test_default_build_config_is_the_shipped_one(manifest: dict) -> None:
    from atlas.toy.vision_build import VisionBuildConfig

    record = json.loads(json.dumps(VisionBuildConfig().record()))
    assert record == manifest["build_config"]


def _small_config() -> Any:
    from atlas.toy.vision_build import VisionBuildConfig
    from atlas.toy.vision_model import VisionTrainConfig
    from atlas.transcoders.training import TranscoderTrainConfig

    return VisionBuildConfig(
        model=VisionTrainConfig(steps=3, pool=48, batch_size=8, text_batch=2),
        transcoders=TranscoderTrainConfig(d_transcoder=32, chunks=2, batch_tokens=256),
        tc_docs_per_chunk=8,
        tc_images_per_chunk=8,
        tc_eval_images=16,
        eval_per_count=2,
        eval_per_class=3,
    )


def test_small_build_is_deterministic(tmp_path: Path) -> None:
    from atlas.toy.vision_build import build_toy_vision

    a = build_toy_vision(tmp_path / "a", seed=1, progress=False, config=_small_config())
    b = build_toy_vision(tmp_path / "b", seed=1, progress=False, config=_small_config())
    ha, hb = file_hashes(a.root), file_hashes(b.root)
    assert ha == hb
    assert {"model/model.safetensors", "model/processor_config.json"} <= set(ha)
    assert "transcoders/layer_3.safetensors" in ha
    ma, mb = json.loads(a.manifest.read_text()), json.loads(b.manifest.read_text())
    assert ma["files"] == ha and ma["metrics"]["eval"] == mb["metrics"]["eval"]
    assert set(HEADLINE_KEYS) <= set(ma["metrics"]["eval"])


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.skipif(
    os.environ.get("ATLAS_TOY_REBUILD") != "1",
    reason="a full rebuild takes ~15 min on 2 cores; set ATLAS_TOY_REBUILD=1",
)
def test_full_rebuild_reproduces_the_shipped_files(manifest: dict, tmp_path: Path) -> None:
    from atlas.toy.vision_build import build_toy_vision

    rebuilt = build_toy_vision(tmp_path / "vision", seed=manifest["seed"], progress=False)
    assert file_hashes(rebuilt.root) == manifest["files"]
