"""Attribute messages carry chunks of prompt specs (one job-record round trip per chunk)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from atlas.pipeline import AttributeChunk, AttributePayload, IngestChunk, PromptSpec, chunked


def _payloads(n: int) -> list[AttributePayload]:
    return [
        AttributePayload(spec=PromptSpec(prompt=f"p {i}"), job_id="j", item=i) for i in range(n)
    ]


@pytest.mark.parametrize(("n", "size", "sizes"), [(1, 8, [1]), (8, 8, [8]), (19, 8, [8, 8, 3])])
def test_chunked_keeps_order_and_bounds(n: int, size: int, sizes: list[int]) -> None:
    chunks = chunked(_payloads(n), size)
    assert [len(c.items) for c in chunks] == sizes
    assert [p.item for c in chunks for p in c.items] == list(range(n))


def test_chunks_round_trip_as_json_and_refuse_empty() -> None:
    chunk = chunked(_payloads(3), 8)[0]
    assert AttributeChunk.model_validate_json(chunk.model_dump_json()) == chunk
    with pytest.raises(ValidationError):
        AttributeChunk.model_validate({"items": []})
    with pytest.raises(ValidationError):
        IngestChunk.model_validate({"items": [{"prompt_id": "p"}]})  # no artifact


def test_chunk_size_setting_is_bounded() -> None:
    from atlas.settings import AtlasSettings

    assert AtlasSettings(_env_file=None).chunk_size == 8  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        AtlasSettings(_env_file=None, chunk_size=0)  # type: ignore[call-arg]
