"""The tiny vision-language models: saved in the hub layout, loaded back offline through the Auto
classes, with processors that place the image tokens as the real ones do."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from PIL import Image

from atlas.testing.tiny_vlm import (
    BOI_ID,
    BOS_ID,
    EOI_ID,
    IMAGE_SOFT_ID,
    LLAVA_IMAGE_ID,
    build_tiny_vlm,
    save_tiny_vlm,
)


def _image(width: int = 50, height: int = 40, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _load(directory: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(
        str(directory), attn_implementation="eager", dtype=torch.float32, local_files_only=True
    ).eval()
    processor = AutoProcessor.from_pretrained(str(directory), local_files_only=True)
    return model, processor


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {kind: save_tiny_vlm(root / kind, kind) for kind in ("gemma3", "llava")}


def test_hub_layout(saved: dict[str, Path]) -> None:
    for directory in saved.values():
        names = {p.name for p in directory.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
        assert "processor_config.json" in names
        assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
        tok_cfg = json.loads((directory / "tokenizer_config.json").read_text())
        assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"


def test_gemma3_loads_and_marks_soft_tokens(saved: dict[str, Path]) -> None:
    model, processor = _load(saved["gemma3"])
    assert type(model).__name__ == "Gemma3ForConditionalGeneration"
    assert type(processor).__name__ == "Gemma3Processor"
    inputs = processor(
        images=_image(), text="<start_of_image> how many fingers?", return_tensors="pt"
    )
    ids, types = inputs["input_ids"][0], inputs["token_type_ids"][0]
    n = model.config.mm_tokens_per_image
    assert n == 16 and inputs["pixel_values"].shape == (1, 3, 32, 32)
    assert ids[0] == BOS_ID
    soft = ids == IMAGE_SOFT_ID
    assert int(soft.sum()) == n
    assert torch.equal(types.bool(), soft)
    start = int(torch.nonzero(soft)[0])
    assert ids[start - 1] == BOI_ID and ids[start + n] == EOI_ID
    assert processor.tokenizer.decode(ids[start - 2 : start - 1]) == "\n\n"
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape == (1, ids.numel(), model.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all()


def test_gemma3_bidirectional_image_block_needs_token_type_ids(saved: dict[str, Path]) -> None:
    model, processor = _load(saved["gemma3"])
    inputs = processor(images=_image(), text="<start_of_image> the hand", return_tensors="pt")
    with torch.no_grad():
        with_types = model(**inputs).logits
        without = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    assert (with_types - without).abs().max() > 1e-4


def test_llava_loads_with_one_token_per_patch(saved: dict[str, Path]) -> None:
    model, processor = _load(saved["llava"])
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert type(processor).__name__ == "LlavaProcessor"
    inputs = processor(images=_image(), text="<image> how many fingers?", return_tensors="pt")
    ids = inputs["input_ids"][0]
    assert ids[0] == BOS_ID
    assert int((ids == LLAVA_IMAGE_ID).sum()) == 16 == model.config.image_seq_length
    assert "token_type_ids" not in inputs
    with torch.no_grad():
        out = model(**inputs)
    assert torch.isfinite(out.logits).all()
    assert out.logits.shape[1] == ids.numel()


def test_llava_siglip_forward() -> None:
    model, processor = build_tiny_vlm("llava_siglip")
    inputs = processor(images=_image(seed=1), text="<image> the cat", return_tensors="pt")
    assert int((inputs["input_ids"][0] == LLAVA_IMAGE_ID).sum()) == 16
    with torch.no_grad():
        assert torch.isfinite(model(**inputs).logits).all()


@pytest.mark.parametrize("kind", ["gemma3", "llava"])
def test_prompt_without_placeholder(kind: str) -> None:
    """Given an image, a prompt with no placeholder is refused (the caller must place it), and so
    is a placeholder without an image; text alone is tokenised with no image tokens."""
    _model, processor = build_tiny_vlm(kind)
    with pytest.raises(ValueError, match="number of"):
        processor(images=_image(), text="how many fingers?", return_tensors="pt")
    placeholder = "<start_of_image>" if kind == "gemma3" else "<image>"
    with pytest.raises(ValueError, match="no images"):
        processor(text=placeholder + " how many fingers?", return_tensors="pt")
    text_only = processor(text="how many fingers?", return_tensors="pt")
    ids = text_only["input_ids"][0]
    assert (
        ids[0] == BOS_ID and not (ids == IMAGE_SOFT_ID).any() and not (ids == LLAVA_IMAGE_ID).any()
    )


def test_seeded_and_distinct() -> None:
    a, _ = build_tiny_vlm("gemma3", seed=0)
    b, _ = build_tiny_vlm("gemma3", seed=0)
    c, _ = build_tiny_vlm("gemma3", seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_gemma3_chat_template_places_the_image() -> None:
    _model, processor = build_tiny_vlm("gemma3", mm_tokens_per_image=4)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "how many?"}]}
    ]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert (
        text
        == "<start_of_turn>user\n<start_of_image>how many?<end_of_turn>\n<start_of_turn>model\n"
    )
    inputs = processor(images=_image(), text=text, return_tensors="pt")
    assert int(inputs["token_type_ids"].sum()) == 4


def test_unknown_kind_and_bad_token_count() -> None:
    with pytest.raises(ValueError, match="kind"):
        build_tiny_vlm("paligemma")
    with pytest.raises(ValueError, match="tile"):
        build_tiny_vlm("gemma3", mm_tokens_per_image=9)
