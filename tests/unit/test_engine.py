"""The engine's out-of-memory policy (no model: the attribution is replaced by a stand-in that
raises the same typed error the attribution code raises)."""

from __future__ import annotations

from typing import Any

import pytest

from atlas.errors import AttributionError, OutOfMemory


def _engine() -> Any:
    from atlas.engine import Engine
    from atlas.graph import ModelInfo, TranscoderInfo

    info = ModelInfo(name="m", family="llama", n_layers=1, d_model=1, vocab_size=1)
    tinfo = TranscoderInfo(name="t", kind="transcoder_set", content_hash="h", d_transcoder=1)
    return Engine(model=None, transcoders=None, model_info=info, transcoder_info=tinfo)  # type: ignore[arg-type]


def test_out_of_memory_halves_the_batch_then_fails_permanently(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """OOM at batch b -> retry at b/2 ... -> success, or a permanent AttributionError at 1."""
    import atlas.attribution
    from atlas.engine import attribute_with_halving
    from atlas.graph import AttributionSettings

    seen: list[int] = []
    limit = 10

    class _Result:
        def to_graph(self, **_: Any) -> str:
            return "graph"

    def fake_attribute(prompt: str, model: Any, tcs: Any, *, batch_size: int, **_: Any) -> Any:
        seen.append(batch_size)
        if batch_size > limit:
            raise OutOfMemory("out of memory in the frozen forward pass (batch 64)")
        return _Result()

    monkeypatch.setattr(atlas.attribution, "attribute", fake_attribute)
    knobs = AttributionSettings()
    graph = attribute_with_halving(_engine(), "a hand has", knobs, batch_size=64, timings={})
    assert graph == "graph"  # type: ignore[comparison-overlap]
    assert seen == [64, 32, 16, 8]

    seen.clear()
    limit = 0
    with pytest.raises(AttributionError, match="out of memory even at batch size 1") as info:
        attribute_with_halving(_engine(), "a hand has", knobs, batch_size=64, timings={})
    assert seen == [64, 32, 16, 8, 4, 2, 1]
    assert not isinstance(info.value, OutOfMemory)  # permanent: nothing left to halve
    assert isinstance(info.value.__cause__, OutOfMemory)


def test_other_attribution_errors_are_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the type counts: an error whose text merely mentions memory fails at once."""
    import atlas.attribution
    from atlas.engine import attribute_with_halving
    from atlas.graph import AttributionSettings

    seen: list[int] = []

    def fake_attribute(prompt: str, model: Any, tcs: Any, *, batch_size: int, **_: Any) -> Any:
        seen.append(batch_size)
        raise AttributionError("feature influence ranking did not converge (out of memory?)")

    monkeypatch.setattr(atlas.attribution, "attribute", fake_attribute)
    with pytest.raises(AttributionError, match="did not converge"):
        attribute_with_halving(_engine(), "x", AttributionSettings(), batch_size=64, timings={})
    assert seen == [64]
