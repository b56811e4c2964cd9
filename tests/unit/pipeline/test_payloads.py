"""Attribute messages carry chunks of prompt specs (one job-record round trip per chunk), and a
prompt spec carries its attribution knobs as the one ``AttributionSettings``."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from atlas.pipeline.payloads import (
    AttributeChunk,
    AttributePayload,
    IngestChunk,
    PromptSpec,
    chunked,
)


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


def test_spec_embeds_the_attribution_settings_and_accepts_flat_knobs() -> None:
    from atlas.graph import AttributionSettings

    flat = PromptSpec.model_validate({"prompt": "a hand has", "max_n_logits": 3})
    nested = PromptSpec.model_validate({"prompt": "a hand has", "attribution": {"max_n_logits": 3}})
    assert flat == nested and isinstance(flat.attribution, AttributionSettings)
    assert flat.attribution.max_n_logits == 3
    assert PromptSpec(prompt="x").attribution == AttributionSettings()  # the defaults, once
    # messages and job records carry only what a request may set, and read back equal
    wire = flat.model_dump(mode="json")
    assert set(wire["attribution"]) == set(AttributionSettings.model_fields) - {"dtype", "pruned"}
    assert PromptSpec.model_validate(wire) == flat
    with pytest.raises(ValidationError, match="set by the worker"):
        PromptSpec.model_validate({"prompt": "x", "attribution": {"dtype": "float16"}})


def test_the_spec_id_is_the_hash_of_the_flat_request() -> None:
    """One id however the knobs are written, and the id the job records of flat specs hold."""
    import hashlib
    import json

    spec = PromptSpec(prompt="a hand has", max_n_logits=3)
    body = {"prompt": "a hand has", "model": None, "transcoders": None, "max_n_logits": 3}
    body |= {"desired_logit_prob": 0.95, "max_feature_nodes": None, "explicit_logit_tokens": None}
    body |= {"node_threshold": 0.8, "edge_threshold": 0.98}
    blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert spec.spec_id() == hashlib.sha256(blob).hexdigest()[:32]


def test_the_prompt_id_hashes_the_recorded_settings_and_the_image_hash() -> None:
    from atlas.engine import Engine
    from atlas.graph import GraphMetadata, ModelInfo, TranscoderInfo
    from atlas.pipeline.steps import prompt_id_for
    from atlas.settings import AtlasSettings

    info = ModelInfo(name="m", family="llama", n_layers=1, d_model=1, vocab_size=1)
    tinfo = TranscoderInfo(name="t", kind="transcoder_set", content_hash="h", d_transcoder=1)
    engine = Engine(model=None, transcoders=None, model_info=info, transcoder_info=tinfo)  # type: ignore[arg-type]
    settings = AtlasSettings(_env_file=None, dtype="bfloat16")  # type: ignore[call-arg]
    spec = PromptSpec(prompt="a hand has", node_threshold=0.5)
    recorded = spec.recorded_settings(settings.dtype)
    assert recorded.dtype == "bfloat16" and recorded.pruned and recorded.node_threshold == 0.5
    meta = GraphMetadata(
        prompt=spec.prompt, tokens=[], model=info, transcoders=tinfo, settings=recorded
    )
    assert prompt_id_for(spec, engine, settings) == meta.prompt_id()
    with_image = meta.model_copy(update={"image_sha256": "ab" * 32})
    assert with_image.prompt_id() != meta.prompt_id()
