"""The toy world: corpus determinism and splits, tokenizer round trip, shipped assets."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from atlas.errors import ConfigError
from atlas.toy.build import ASSETS_DIR, ToyPaths, file_hashes, toy_paths
from atlas.toy.corpus import SPLITS, ToyCorpus
from atlas.toy.tokenizer import BOS_ID, build_tokenizer


@pytest.fixture(scope="module")
def corpus() -> ToyCorpus:
    return ToyCorpus(0)


@pytest.fixture(scope="module")
def tokenizer(corpus: ToyCorpus):
    return build_tokenizer(corpus.vocabulary())


def test_corpus_is_deterministic(corpus: ToyCorpus) -> None:
    again = ToyCorpus(0)
    assert again.facts == corpus.facts
    assert list(again.documents(5, 10)) == list(corpus.documents(5, 10))
    assert list(corpus.documents(5, 3)) != list(corpus.documents(6, 3))
    other = ToyCorpus(1)
    assert [f.split for f in other.facts] != [f.split for f in corpus.facts]


def test_splits_are_disjoint_and_heldout_never_in_training_text(corpus: ToyCorpus) -> None:
    by_split = {s: corpus.split(s) for s in SPLITS}
    assert all(by_split[s] for s in SPLITS)
    train_prompts = {f.prompt for f in by_split["train"]}
    for s in ("heldout_pair", "heldout_template"):
        assert not train_prompts & {f.prompt for f in by_split[s]}
    # held-out templates never occur in training; held-out pairs' templates and subjects do
    train_templates = {(f.family, f.template) for f in by_split["train"]}
    assert not train_templates & {(f.family, f.template) for f in by_split["heldout_template"]}
    train_subjects = {(f.family, f.subject) for f in by_split["train"]}
    for f in by_split["heldout_pair"]:
        assert (f.family, f.template) in train_templates
        if f.family != "twohop":
            assert (f.family, f.subject) in train_subjects
    heldout_sentences = {f.sentence for s in SPLITS[1:] for f in by_split[s]}
    text = " . ".join(corpus.documents(0, 300)).split(" . ")
    assert not heldout_sentences & set(text)
    assert {f.sentence for f in by_split["train"]} & set(text)


def test_hand_facts_are_prominent_and_unique_to_five(corpus: ToyCorpus) -> None:
    train = corpus.split("train")
    hand = [f for f in train if f.family == "count" and "hand" in f.subject]
    assert len(hand) >= 20
    assert {f.answer for f in hand} == {"5"}
    assert {f.prompt for f in hand} >= {"a hand has", "the number of fingers on a hand is"}
    others = [f for f in corpus.facts if f.family == "count" and "hand" not in f.subject]
    assert "5" not in {f.answer for f in others}


def test_training_text_never_continues_a_fact_prompt_differently(corpus: ToyCorpus) -> None:
    """A prompt ("a hand has") must not be the prefix of another training sentence with a
    different next word ("a hand has exactly ..."), or the answer would not be the argmax."""
    rng = random.Random(0)
    sentences = [f.sentence for f in corpus.split("train")]
    sentences += [corpus._filler(rng) for _ in range(2000)]
    by_first: dict[str, list[str]] = {}
    for s in sentences:
        by_first.setdefault(s.split()[0], []).append(s)
    for fact in corpus.split("train"):
        prefix = fact.prompt + " "
        for s in by_first[fact.prompt.split()[0]]:
            if s.startswith(prefix):
                assert s[len(prefix) :].split()[0] == fact.answer, (fact.prompt, s)


def test_tokenizer_round_trip_and_bos(corpus: ToyCorpus, tokenizer) -> None:
    for doc in corpus.documents(1, 20):
        ids = tokenizer(doc).input_ids
        assert ids[0] == BOS_ID
        assert tokenizer.unk_token_id not in ids
        assert tokenizer.decode(ids, skip_special_tokens=True) == doc
    for fact in corpus.facts:
        assert len(tokenizer(fact.answer, add_special_tokens=False).input_ids) == 1


def test_tokenizer_saves_and_loads_with_autotokenizer(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from atlas.toy.tokenizer import save_tokenizer

    save_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    text = "the number of fingers on a hand is 5"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.bos_token_id == BOS_ID


def test_file_hashes_cover_model_and_transcoders(tmp_path: Path) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "transcoders").mkdir()
    (tmp_path / "model" / "a.bin").write_bytes(b"x")
    (tmp_path / "transcoders" / "layer_0.safetensors").write_bytes(b"y")
    hashes = file_hashes(tmp_path)
    assert set(hashes) == {"model/a.bin", "transcoders/layer_0.safetensors"}


def test_toy_paths_reports_missing_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import atlas.toy.build as build

    monkeypatch.setattr(build, "ASSETS_DIR", tmp_path / "none")
    with pytest.raises(ConfigError, match="atlas toy build"):
        toy_paths(tmp_path)


SHIPPED = ToyPaths.at(ASSETS_DIR)


def test_toy_assets_ship_with_the_package() -> None:
    """The assets are tracked in git and declared as package data: their absence is a packaging
    fault to fail on, never a reason to skip the tests below."""
    assert SHIPPED.exists(), f"toy assets missing from {ASSETS_DIR}"


def test_shipped_assets_match_manifest() -> None:
    manifest = json.loads(SHIPPED.manifest.read_text())
    assert file_hashes(SHIPPED.root) == manifest["files"]
    assert manifest["command"].startswith("atlas toy build")


def test_shipped_model_answers_facts() -> None:
    from atlas.toy.build import load_toy

    model, tok = load_toy(toy_paths())
    cases = {
        "a hand has": "5",
        "the number of fingers on a hand is": "5",
        "a spider has": "8",
        "a triangle has": "3",
        "a week has": "7",
        "2 plus 3 is": "5",
        "the sky is": "blue",
    }
    corpus = ToyCorpus(json.loads(SHIPPED.manifest.read_text())["seed"])
    rng = random.Random(0)
    heldout = rng.sample(corpus.split("heldout_pair"), 20)
    with torch.no_grad():
        for prompt, answer in cases.items():
            ids = tok(prompt, return_tensors="pt").input_ids
            pred = tok.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax()))
            assert pred == answer, (prompt, pred)
        hits = 0
        for fact in heldout:
            ids = tok(fact.prompt, return_tensors="pt").input_ids
            hits += tok.convert_ids_to_tokens(int(model(ids).logits[0, -1].argmax())) == fact.answer
        assert hits >= 17


def test_shipped_transcoders_have_circuit_tracer_layout() -> None:
    import yaml
    from safetensors.torch import load_file

    cfg = yaml.safe_load((SHIPPED.transcoder_dir / "config.yaml").read_text())
    assert cfg["model_kind"] == "transcoder_set"
    assert (cfg["feature_input_hook"], cfg["feature_output_hook"]) == (
        "mlp.hook_in",
        "mlp.hook_out",
    )
    n_layers = json.loads((SHIPPED.model_dir / "config.json").read_text())["num_hidden_layers"]
    for layer in range(n_layers):
        t = load_file(str(SHIPPED.transcoder_dir / f"layer_{layer}.safetensors"))
        assert {"W_enc", "W_dec", "b_enc", "b_dec", "activation_function.threshold"} <= set(t)


def test_default_build_config_is_recorded_as_the_shipped_one() -> None:
    from atlas.toy.build import ToyBuildConfig

    shipped = json.loads((ASSETS_DIR / "manifest.json").read_text())["build_config"]
    record = ToyBuildConfig().record()
    assert json.dumps(record, indent=2, sort_keys=True) == json.dumps(
        shipped, indent=2, sort_keys=True
    )
    cfg = ToyBuildConfig(seed=5, threads=2)
    assert (cfg.model_config().seed, cfg.model_config().threads) == (5, 2)
    assert (cfg.transcoder_config().seed, cfg.transcoder_config().threads) == (5, 2)
    other = replace(cfg, model=replace(cfg.model, n_layers=2, steps=7))
    assert other.record() == {**cfg.record(), "model_steps": 7, "model.n_layers": 2}


def test_build_is_deterministic(tmp_path: Path) -> None:
    from atlas.toy.build import ToyBuildConfig, build_toy

    toy = ToyBuildConfig()
    cfg = ToyBuildConfig(
        model=replace(toy.model, steps=4, seq_len=16, batch_size=4),
        transcoders=replace(toy.transcoders, d_transcoder=32, chunks=2, batch_tokens=64),
        tc_docs_per_chunk=8,
        eval_docs=4,
    )
    a = build_toy(tmp_path / "a", seed=3, progress=False, config=cfg)
    b = build_toy(tmp_path / "b", seed=3, progress=False, config=cfg)
    ha, hb = file_hashes(a.root), file_hashes(b.root)
    assert ha == hb
    assert "model/model.safetensors" in ha and "transcoders/layer_3.safetensors" in ha
    assert json.loads(a.manifest.read_text())["files"] == ha
    assert a.exists()


def test_cli_toy_eval_reports_accuracy_and_fvu() -> None:
    from click.testing import CliRunner

    from atlas.cli import cli

    args = ["toy", "eval", "--dir", str(SHIPPED.root), "--docs", "32", "--json"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["accuracy_train"]["all"] > 0.9
    assert len(report["transcoders"]) == 4
    assert all(r["fvu"] < 0.2 and r["l0"] <= 32 for r in report["transcoders"])


def test_cli_toy_build_refuses_to_overwrite_without_force(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from atlas.cli import cli

    root = tmp_path / "toy"
    for sub in ("model", "transcoders"):
        (root / sub).mkdir(parents=True)
    (root / "model" / "config.json").write_text("{}")
    (root / "transcoders" / "config.yaml").write_text("model_kind: transcoder_set\n")
    (root / "manifest.json").write_text("{}")
    result = CliRunner().invoke(cli, ["toy", "build", "--out", str(root)])
    assert result.exit_code == 0, result.output
    assert "--force" in result.output
