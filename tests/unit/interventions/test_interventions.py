"""Interventions against the graph and against themselves.

* Direct effect, every family (text, and the tiny Gemma-3 / LLaVA VLMs at image and text
  positions): doubling a feature with every layer constrained (attention, norms and MLPs
  frozen: the local replacement model) moves each feature node's pre-activation and each demeaned
  logit by its adjacency entry.
* Round trips: patching a prompt with its own activations, alpha 0, ablating an absent direction
  change nothing; reverse steering moves the probe projection the other way.
* Bad input: one-line :class:`InputError`.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from atlas.attribution import AttributionResult, attribute
from atlas.errors import InputError
from atlas.interventions import (
    FeatureEdit,
    Intervention,
    active_members,
    alpha_sweep,
    build_vector,
    circuit_patch,
    clean_run,
    decoder_cosines,
    direct_effect,
    donor_activations,
    faithfulness,
    feature_intervention,
    generate,
    graph_influence,
    measured_effect,
    spearman,
    steer,
    supernode_intervention,
    target_rows,
)
from atlas.models import LoadedModel, ModelInputs, load_model
from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders
from atlas.testing.tiny_vlm import save_language_model, save_tiny_vlm
from atlas.transcoders import TranscoderSet, load_transcoders
from tests.helpers import FAMILY_CASES

PROMPT = "The cat sat on the mat"
TEXT_CASES = FAMILY_CASES


def _check_direct_effects(
    model: LoadedModel,
    tset: TranscoderSet,
    inputs: ModelInputs,
    res: AttributionResult,
    sources: list[int],
) -> float:
    """Double each source under full constraint; returns the largest relative miss."""
    feats = res.active_features[res.selected_features]
    rows = target_rows(res)
    clean = clean_run(model, tset, inputs)
    worst = 0.0
    for s in sources:
        lay, pos, f = (int(v) for v in feats[s])
        a = float(res.activation_values[res.selected_features[s]])
        run = feature_intervention(
            model,
            tset,
            inputs,
            [FeatureEdit(lay, pos, f, "scale", 2.0)],
            constrained=range(model.n_layers),
            apply_activation_function=False,
            clean=clean,
        )
        measured = measured_effect(model, res, run)
        predicted = direct_effect(res, [(lay, pos, f, a)])[rows]
        measured[s] = predicted[s]  # the source's own pre-activation is not an edge
        scale = 1.0 + float(predicted.abs().max())
        torch.testing.assert_close(measured, predicted, atol=1e-4 * scale, rtol=1e-4)
        assert float(predicted.abs().max()) > 0
        worst = max(worst, float((measured - predicted).abs().max()) / scale)
    return worst


def _low_sources(res: AttributionResult, n: int, positions: set[int] | None = None) -> list[int]:
    feats = res.active_features[res.selected_features]
    top = res.n_layers - 1
    ok = [
        i
        for i in range(res.n_features)
        if int(feats[i, 0]) < top and (positions is None or int(feats[i, 1]) in positions)
    ]
    gen = torch.Generator().manual_seed(0)
    return [ok[int(i)] for i in torch.randperm(len(ok), generator=gen)[:n]]


@pytest.fixture(scope="module")
def text_case(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    root = tmp_path_factory.mktemp("intv")
    model_dir = build_tiny_model("gemma2", root / "m", n_layers=3)
    tc_dir = build_tiny_transcoders(model_dir, root / "t", d_transcoder=128)
    model = load_model(model_dir)
    tset = load_transcoders(tc_dir, model)
    inputs = model.inputs(PROMPT)
    return model, tset, inputs, attribute(PROMPT, model, tset, batch_size=32)


@pytest.mark.parametrize(("family", "kind", "skip"), TEXT_CASES)
def test_direct_effect_text(tmp_path: Path, family: str, kind: str, skip: bool) -> None:
    model_dir = build_tiny_model(family, tmp_path / "m", n_layers=3, n_kv_heads=2)
    tc_dir = build_tiny_transcoders(
        model_dir, tmp_path / "t", kind=kind, skip=skip, d_transcoder=128
    )
    model = load_model(model_dir)
    tset = load_transcoders(tc_dir, model)
    res = attribute(PROMPT, model, tset, batch_size=32)
    worst = _check_direct_effects(model, tset, model.inputs(PROMPT), res, _low_sources(res, 4))
    print(f"direct effect {family}/{kind}{'/skip' if skip else ''}: max rel miss {worst:.2e}")


def _picture(path: Path, seed: int = 0) -> Path:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, 256, (50 * 40 * 3,), generator=gen, dtype=torch.uint8)
    Image.frombytes("RGB", (50, 40), bytes(data.tolist())).save(path, format="PNG")
    return path


@pytest.mark.parametrize("kind", ["gemma3", "llava"])
def test_direct_effect_vlm(tmp_path: Path, kind: str) -> None:
    vlm_dir = save_tiny_vlm(tmp_path / "vlm", kind)
    text_dir = save_language_model(vlm_dir, tmp_path / "text")
    tc_dir = build_tiny_transcoders(text_dir, tmp_path / "tc", d_transcoder=128)
    model = load_model(vlm_dir)
    tset = load_transcoders(tc_dir, model)
    image = _picture(tmp_path / "hand.png")
    inputs = model.inputs("how many fingers", image)
    res = attribute("how many fingers", model, tset, image=image, batch_size=32)
    assert inputs.image_positions is not None
    img = set(inputs.image_positions.tolist())
    text = set(range(1, inputs.n_pos)) - img
    sources = _low_sources(res, 2, img) + _low_sources(res, 2, text)
    assert len(sources) == 4
    worst = _check_direct_effects(model, tset, inputs, res, sources)
    print(f"direct effect {kind} (image + text positions): max rel miss {worst:.2e}")
    # circuit patching at image positions: its own image changes nothing, another image does
    clean = clean_run(model, tset, inputs)
    at_image = [m for m in active_members(clean.activations) if m[1] in img]
    own = circuit_patch(model, tset, inputs, donor_activations(model, tset, inputs), at_image)
    torch.testing.assert_close(own.logits, own.base_logits, atol=1e-5, rtol=1e-5)
    other = model.inputs("how many fingers", _picture(tmp_path / "other.png", seed=1))
    donor = donor_activations(model, tset, other)
    moved = [m for m in active_members(donor.activations) if m[1] in img]
    run = circuit_patch(model, tset, inputs, donor, moved, clean=clean)
    assert run.kl() > 0
    assert {iv.pos for iv in run.interventions} <= img
    # a steering vector between the two images, applied over the image block, both ways
    vec = build_vector(model, [inputs], [other], layer=0, token_rule="mean")
    span, probe = sorted(img), model.n_layers - 1
    up, down = steer(model, inputs, vec, 2.0, span=span), steer(model, inputs, vec, -2.0, span=span)
    base, p_up = up.projection(vec, probe, span[-1])
    _, p_down = down.projection(vec, probe, span[-1])
    assert p_up > base > p_down


# ---------------------------------------------------------------------- round trips
def test_self_patch_changes_nothing(text_case: tuple) -> None:
    model, tset, inputs, res = text_case
    donor = donor_activations(model, tset, inputs)
    feats = [tuple(int(v) for v in row) for row in res.active_features[:40]]
    for constrained in (None, range(model.n_layers)):
        run = circuit_patch(model, tset, inputs, donor, feats, constrained=constrained)
        torch.testing.assert_close(run.logits, run.base_logits, atol=1e-5, rtol=1e-5)


def test_patch_from_another_prompt_moves_the_answer(text_case: tuple) -> None:
    model, tset, inputs, _ = text_case
    other = model.inputs("A dog ran to the park")
    donor = donor_activations(model, tset, other)
    feats = [tuple(int(v) for v in row) for row in torch.nonzero(donor.activations[:, -1:])]
    feats = [(lay, -1, f) for lay, _, f in feats]
    run = circuit_patch(model, tset, inputs, donor, feats)
    assert run.kl() > 0
    # the patched features sit at the donor's values in the recipient's last position
    for lay, _, f in feats:
        assert run.interventions[0].pos == inputs.n_pos - 1
        assert any(iv.layer == lay and iv.feature == f for iv in run.interventions)


def test_alpha_zero_and_reverse_steering(text_case: tuple) -> None:
    model, _, inputs, _ = text_case
    pos = [model.inputs(t) for t in ("the cat sat", "a cat ran", "my cat ate")]
    neg = [model.inputs(t) for t in ("the dog sat", "a dog ran", "my dog ate")]
    vec = build_vector(model, pos, neg, layer=1, token_rule="mean")
    zero = steer(model, inputs, vec, 0.0)
    torch.testing.assert_close(zero.logits, zero.base_logits, atol=1e-6, rtol=1e-6)
    up, down = steer(model, inputs, vec, 4.0), steer(model, inputs, vec, -4.0)
    base, p_up = up.projection(vec, 2)
    _, p_down = down.projection(vec, 2)
    assert p_up > base > p_down
    ablated = steer(model, inputs, vec, mode="ablate")
    _, p_abl = ablated.projection(vec, 1)
    assert abs(p_abl) < 1e-4
    rows = alpha_sweep(model, inputs, vec, [-2.0, 0.0, 2.0], tokens=[5])
    assert rows[1]["kl"] < 1e-9 and rows[0]["projection"] < rows[2]["projection"]
    gen = steer(model, inputs, vec, 2.0, generate=3)
    assert gen.generated_ids.numel() == 3
    cos = decoder_cosines(vec, tset=text_case[1], layer=0)
    assert cos.shape == (128,) and float(cos.abs().max()) <= 1.0 + 1e-6


def test_supernode_and_faithfulness(text_case: tuple) -> None:
    model, tset, inputs, res = text_case
    feats = res.active_features[res.selected_features][:3].tolist()
    members = [(lay, p, f) for lay, p, f in feats]
    run = supernode_intervention(model, tset, inputs, members, -1.0)
    for lay, p, f in members:
        iv = next(i for i in run.interventions if (i.layer, i.pos, i.feature) == (lay, p, f))
        assert iv.value == pytest.approx(-float(run.clean_activations[lay, p, f]))
    report = faithfulness(model, tset, inputs, res, n_sources=4)
    assert len(report.sources) == 4 and report.influence.numel() == report.effect.numel()
    assert -1.0 <= report.spearman <= 1.0
    print(f"faithfulness: spearman {report.spearman:.3f}, log-log {report.log_log_pearson:.3f}")


def test_predictions_from_a_graph_equal_the_result(text_case: tuple) -> None:
    model, tset, inputs, res = text_case
    graph = res.to_graph(prune=False)
    feats = res.active_features[res.selected_features][:3].tolist()
    changes = [(lay, p, f, 0.5) for lay, p, f in feats]
    torch.testing.assert_close(direct_effect(graph, changes), direct_effect(res, changes))
    run = feature_intervention(model, tset, inputs, [FeatureEdit(*feats[0], "scale", 0.0)])
    torch.testing.assert_close(
        measured_effect(model, graph, run), measured_effect(model, res, run), atol=0, rtol=0
    )


def test_influence_and_rank_correlation() -> None:
    adj = torch.tensor([[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    b = graph_influence(adj)
    # row-normalised |A|: node 2 gets 1/2 from 0 and 1/2 from 1, node 1 all from 0
    assert float(b[2, 0]) == pytest.approx(0.5 + 0.5)
    assert (
        spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 20.0, 40.0])) > 0.9
    )


def test_generation_with_ablation_runs(text_case: tuple) -> None:
    model, tset, inputs, _ = text_case
    run = generate(model, tset, inputs, [FeatureEdit(0, slice(1, None), 3, "set", 2.0)], 3)
    assert run.generated_ids is not None and 1 <= run.generated_ids.numel() <= 3


# ---------------------------------------------------------------------- bad input
def _one_line(exc: pytest.ExceptionInfo[InputError]) -> str:
    text = str(exc.value)
    assert "\n" not in text
    return text


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (FeatureEdit(9, -1, 0, "set", 1.0), "layer"),
        (FeatureEdit(0, -1, 10_000, "set", 1.0), "feature"),
        (FeatureEdit(0, 99, 0, "set", 1.0), "position"),
        (FeatureEdit(0, -1, 0, "set", float("nan")), "finite"),
        (Intervention(0, -1, 0, float("inf")), "finite"),
        (FeatureEdit(0, -1, 0, "scale", float("inf")), "finite"),
    ],
)
def test_bad_edits(text_case: tuple, edit: object, needle: str) -> None:
    model, tset, inputs, _ = text_case
    with pytest.raises(InputError) as exc:
        feature_intervention(model, tset, inputs, [edit])  # type: ignore[list-item]
    assert needle in _one_line(exc)


def test_bad_supernode_range_and_donor(text_case: tuple, tmp_path: Path) -> None:
    model, tset, inputs, _ = text_case
    clean = clean_run(model, tset, inputs)
    inactive = torch.nonzero(clean.activations[0, 1:] == 0)[:2] + torch.tensor([1, 0])
    members = [(0, int(p), int(f)) for p, f in inactive]
    with pytest.raises(InputError) as exc:
        supernode_intervention(model, tset, inputs, members, -1.0)
    assert "no member" in _one_line(exc)
    with pytest.raises(InputError) as exc:
        feature_intervention(model, tset, inputs, [], constrained=range(0, 9))
    assert "constrained" in _one_line(exc)
    other_tc = build_tiny_transcoders(
        Path(model.info.name), tmp_path / "t2", d_transcoder=128, seed=1
    )
    other = load_transcoders(other_tc, model)
    donor = donor_activations(model, other, inputs)
    with pytest.raises(InputError) as exc:
        circuit_patch(model, tset, inputs, donor, [(0, 1, 0)])
    assert "transcoder" in _one_line(exc)


def test_interventions_import_no_infrastructure() -> None:
    code = (
        "import sys, atlas.interventions\n"
        "bad = ('neo4j', 'celery', 'click', 'atlas.store', 'atlas.pipeline', 'atlas.cli')\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in bad or m.startswith(bad)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
