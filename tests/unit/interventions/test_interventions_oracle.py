"""Feature interventions against circuit-tracer 0.5.0's (golden files from
``bench/make_golden_interventions.py``): last-position logits to 1e-4 relative, the full logits and
activations, and greedy generation token for token."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from atlas.interventions import FeatureEdit, clean_run, feature_intervention, generate
from atlas.models import load_model
from atlas.transcoders import load_transcoders
from tests import GOLDEN

CASES = sorted(p.parent.name for p in GOLDEN.glob("*/interventions.json"))
RTOL = 1e-4


@cache
def _case(case: str) -> tuple[Any, ...]:
    record = json.loads((GOLDEN / case / "interventions.json").read_text())
    tensors = load_file(str(GOLDEN / case / "interventions.safetensors"))
    model = load_model(GOLDEN / case / "model")
    tset = load_transcoders(GOLDEN / case / "transcoders", model)
    inputs = model.inputs(record["prompt"])
    return record, tensors, model, tset, inputs, clean_run(model, tset, inputs)


def _edits(spec: dict[str, Any]) -> list[FeatureEdit]:
    out = []
    for layer, pos, feature, mode, amount in spec["edits"]:
        p = slice(pos["start"], None) if isinstance(pos, dict) else pos
        out.append(FeatureEdit(layer, p, feature, mode, amount))
    return out


def _specs() -> list[tuple[str, str]]:
    out = []
    for case in CASES:
        record = json.loads((GOLDEN / case / "interventions.json").read_text())
        out += [(case, s["name"]) for s in record["specs"]]
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


@pytest.mark.parametrize(("case", "name"), _specs())
def test_matches_circuit_tracer(case: str, name: str) -> None:
    record, tensors, model, tset, inputs, clean = _case(case)
    spec = next(s for s in record["specs"] if s["name"] == name)
    rng = spec["constrained"]
    kwargs = {
        "constrained": range(rng[0], rng[1]) if rng else None,
        "freeze_attention": spec["freeze_attention"],
        "clean": clean,
    }
    if spec.get("generate"):
        res = generate(model, tset, inputs, _edits(spec), spec["generate"], **kwargs)
        assert res.generated_ids is not None and res.generated_logits is not None
        assert res.generated_ids.tolist() == tensors[f"{name}.gen_tokens"].tolist()
        assert _rel(res.generated_logits, tensors[f"{name}.gen_logits"]) < RTOL
        return
    res = feature_intervention(model, tset, inputs, _edits(spec), **kwargs)
    ref = tensors[f"{name}.logits"]
    assert _rel(res.last_logits, ref[-1]) < RTOL
    assert _rel(res.logits, ref) < RTOL
    acts = tensors[f"{name}.activations"]
    torch.testing.assert_close(
        res.activations, acts, atol=1e-4 * float(acts.abs().max()), rtol=1e-4
    )
    # the intervention must do something, or the comparison proves little
    assert float((res.logits - res.base_logits).abs().max()) > 1e-3 or "first" in name
