"""Intervention specs: strict JSON, one-line refusals, a content id that ignores ``store``."""

from __future__ import annotations

import math

import pytest

from atlas.errors import InputError
from atlas.pipeline.intervention_payloads import InterventionPayload, parse_intervention

BASE = {
    "prompt": "The cat sat",
    "edits": [{"layer": 1, "pos": "last", "feature": 3, "mode": "set", "amount": 2.0}],
}


def _with(**kw: object) -> dict:
    return BASE | kw


def test_parses_positions() -> None:
    spec = parse_intervention(
        _with(
            edits=[
                {"layer": 0, "pos": 4, "feature": 1, "mode": "scale", "amount": -1.0},
                {"layer": 0, "pos": "last", "feature": 1, "mode": "ablate"},
                {"layer": 1, "pos": "3:", "feature": 2, "mode": "add", "amount": 0.5},
            ],
            constrained=[0, 1],
        )
    )
    assert [e.position() for e in spec.edits] == [4, -1, slice(3, None)]
    assert spec.layer_range() == range(0, 2)
    assert spec.freeze_attention is True and spec.generate == 0


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"edits": [{"layer": 0, "pos": 1, "feature": 1, "mode": "double"}]}, "mode"),
        ({"edits": [{"layer": 0, "pos": 1, "feature": 1, "amount": math.nan}]}, "finite"),
        ({"edits": [{"layer": 0, "pos": 1, "feature": 1, "amount": math.inf}]}, "finite"),
        ({"edits": [{"layer": 0, "pos": "first", "feature": 1}]}, "position"),
        ({"edits": [{"layer": -1, "pos": 1, "feature": 1}]}, "layer"),
        ({"supernode": {"name": "hand", "multiplier": math.nan}}, "finite"),
        ({"constrained": [2, 1]}, "constrained"),
        ({"colour": "red"}, "colour"),
        ({"prompt": ""}, "prompt"),
        ({"generate": -1}, "generate"),
    ],
)
def test_bad_specs_are_one_line(change: dict, needle: str) -> None:
    with pytest.raises(InputError) as err:
        parse_intervention(_with(**change))
    text = str(err.value)
    assert "\n" not in text and needle in text


def test_content_id_ignores_store_and_is_stable() -> None:
    a = parse_intervention(_with(store=True))
    b = parse_intervention(_with(store=False))
    c = parse_intervention(_with(generate=2))
    assert a.content_id() == b.content_id() != c.content_id()
    assert a.content_id().startswith("iv-")


def test_payload_round_trips_as_json() -> None:
    p = InterventionPayload(spec=parse_intervention(BASE), job_id="j", item=0)
    again = InterventionPayload.model_validate_json(p.model_dump_json())
    assert again == p
