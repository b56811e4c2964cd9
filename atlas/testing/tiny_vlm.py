"""Tiny, local, seeded vision-language models and processors for tests. No downloads.

``save_tiny_vlm(out_dir, kind, seed=0) -> Path`` writes an ordinary Hugging Face model directory
(``config.json``, ``model.safetensors``, tokenizer and processor files) that
``AutoModelForImageTextToText.from_pretrained`` and ``AutoProcessor.from_pretrained`` load offline.
``build_tiny_vlm(kind, seed=0)`` returns the same model and processor in memory.

Kinds (:data:`KINDS`):

``gemma3``
    ``Gemma3ForConditionalGeneration``: a SigLIP tower without head (32 x 32 pixels, patch 4, so
    8 patches per side and 64 patches), a pooled projector with ``mm_tokens_per_image`` soft tokens
    (16 by default: block 2; 4 gives block 4 as on real Gemma-3) and a 2-layer Gemma-3 text model
    with one sliding and one global layer. ``Gemma3Processor`` with ``Gemma3ImageProcessorPil``
    (resize to 32 x 32, bilinear, mean 0.5, std 0.5, pan-and-scan off).
``llava``
    ``LlavaForConditionalGeneration``: a CLIP tower (32 x 32 pixels, patch 8, 16 patches plus CLS;
    features from the second-to-last layer with CLS dropped, the LLaVA-1.5 defaults) and a 2-layer
    Llama. ``LlavaProcessor`` with ``CLIPImageProcessorPil``: 16 ``<image>`` tokens per image, one
    patch per token.
``llava_siglip``
    The same with a SigLIP tower (no CLS; all patches from the last layer) and a 2-layer Qwen2.

The tokenizer is word level (:data:`WORDS`, digits, punctuation, whitespace runs; anything else is
``<unk>``) and prepends ``<bos>``. Its ``tokenizer_class`` is written as ``PreTrainedTokenizerFast``
so that transformers 4.x (the VLM paper's fork) reads the same files.

What the processors do with a prompt and an image:

* Gemma-3: each ``<start_of_image>`` in the text becomes ``"\\n\\n<start_of_image>" +
  "<image_soft_token>" * mm_tokens_per_image + "<end_of_image>\\n\\n"``, ``<bos>`` is prepended and
  ``token_type_ids`` is 1 exactly at the soft tokens. A prompt WITHOUT ``<start_of_image>`` given
  an image is refused (``ValueError``: the number of ``<start_of_image>`` tokens must equal the
  number of images); it does not place the image itself. Only an empty text gets the placeholder
  added. Text with a placeholder and no image is refused too. The caller therefore puts
  ``<start_of_image>`` before the text when the prompt has none, as the chat template would.
* LLaVA: each ``<image>`` becomes ``<image>`` repeated once per image token (patches, minus CLS);
  the same count rule holds (no placeholder with an image is a ``ValueError``), and no
  ``token_type_ids`` are returned (LLaVA's language model is causal throughout).
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

KINDS = ("gemma3", "llava", "llava_siglip")

#: Special tokens in id order (the Gemma order for the first four).
SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
    "<image>",
    "<start_of_turn>",
    "<end_of_turn>",
]
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
BOI_ID, EOI_ID, IMAGE_SOFT_ID, LLAVA_IMAGE_ID = 4, 5, 6, 7

#: The word vocabulary (each also with a leading space).
_WORD_TEXT = (
    "the a an of to in on is are was and or what how many which where there this that it "
    "image picture photo shows show hand fingers finger count number color red green blue "
    "cat dog sat mat big small left right top bottom answer question user model yes no "
    "describe see one two three four five six seven eight nine ten"
)
WORDS = tuple(_WORD_TEXT.split())

IMAGE_SIZE = 32
GEMMA_PATCH = 4
LLAVA_PATCH = 8

#: Simplified Gemma-3 chat template: image items become ``<start_of_image>`` in place.
GEMMA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


# ---------------------------------------------------------------------- tokenizer
def _vocab() -> dict[str, int]:
    """Specials, whitespace runs, words (bare and with a leading space), digits, punctuation."""
    pieces = ["\n", "\n\n", " "]
    for word in WORDS:
        pieces += [word, " " + word]
    for ch in string.digits + string.punctuation:
        pieces += [ch, " " + ch]
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for piece in pieces:
        vocab.setdefault(piece, len(vocab))
    return vocab


def vocab_size() -> int:
    """Size of the tiny tokenizer's vocabulary (the text models' ``vocab_size``)."""
    return len(_vocab())


def build_tokenizer(image_token: str) -> Any:
    """A ``PreTrainedTokenizerFast`` over :func:`_vocab` that prepends ``<bos>``.

    ``image_token`` names the placeholder the processor repeats: ``<image_soft_token>`` for
    Gemma-3 (with ``boi_token``/``eoi_token`` set, which ``Gemma3Processor`` reads) or ``<image>``
    for LLaVA. All entries of :data:`SPECIALS` are special tokens, so they are never split.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    from atlas.toy.tokenizer import wrap_tokenizer

    tok = Tokenizer(models.WordLevel(vocab=_vocab(), unk_token="<unk>"))
    pattern = Regex(r"\n+| ?[A-Za-z]+| ?[0-9]| ?[^\sA-Za-z0-9]| +")
    tok.pre_tokenizer = pre_tokenizers.Split(pattern, behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    extra: dict[str, str] = {"image_token": image_token}
    if image_token == "<image_soft_token>":
        extra |= {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
    return wrap_tokenizer(tok, BOS_ID, model_max_length=512, extra_special_tokens=extra)


# ---------------------------------------------------------------------- configs
def _tower(patch_size: int, n_layers: int) -> dict[str, Any]:
    """The tiny vision tower's sizes (keyword arguments of a vision config)."""
    return {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": n_layers,
        "num_attention_heads": 4,
        "image_size": IMAGE_SIZE,
        "patch_size": patch_size,
    }


def _language_model() -> dict[str, Any]:
    """The tiny language model's sizes and special token ids (keyword arguments of a text
    config)."""
    return {
        "vocab_size": vocab_size(),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "max_position_embeddings": 512,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def _gemma3_config(mm_tokens_per_image: int, n_vision_layers: int) -> Any:
    import transformers as tf

    vision = tf.SiglipVisionConfig(
        **_tower(GEMMA_PATCH, n_vision_layers), vision_use_head=False, layer_norm_eps=1e-6
    )
    text = tf.Gemma3TextConfig(
        **_language_model(),
        query_pre_attn_scalar=16,
        sliding_window=64,
        layer_types=["sliding_attention", "full_attention"],
        tie_word_embeddings=True,
    )
    return tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=mm_tokens_per_image,
        boi_token_index=BOI_ID,
        eoi_token_index=EOI_ID,
        image_token_index=IMAGE_SOFT_ID,
        tie_word_embeddings=True,
    )


def _llava_config(kind: str, n_vision_layers: int) -> Any:
    import transformers as tf

    tower = _tower(LLAVA_PATCH, n_vision_layers)
    lm = {**_language_model(), "rms_norm_eps": 1e-6, "tie_word_embeddings": False}
    strategy: Literal["default", "full"]
    vision: Any
    if kind == "llava":
        vision = tf.CLIPVisionConfig(**tower, projection_dim=32)
        text: Any = tf.LlamaConfig(**lm)
        strategy, layer = "default", -2
    else:
        vision = tf.SiglipVisionConfig(**tower, vision_use_head=False)
        text = tf.Qwen2Config(**lm)
        strategy, layer = "full", -1
    n_patches = (IMAGE_SIZE // LLAVA_PATCH) ** 2
    return tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=LLAVA_IMAGE_ID,
        image_seq_length=n_patches,
        vision_feature_select_strategy=strategy,
        vision_feature_layer=layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


# ---------------------------------------------------------------------- weights
@torch.no_grad()
def _init_weights(model: nn.Module, seed: int) -> None:
    """Seeded random weights with O(1) activations everywhere.

    Linear and convolution weights ~ N(0, 1/fan_in); layer norms near 1; Gemma's zero-centred
    RMSNorms (applied as ``1 + w``) near 0; text embeddings scaled so Gemma's ``sqrt(d)`` factor
    gives unit rows; everything else small. A tied parameter is set once (its first owner).
    """
    gen = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for mod_name, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            p.copy_(_init_value(mod_name, module, name, p, gen))


def _init_value(
    mod_name: str, module: nn.Module, name: str, p: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """The initial value of one parameter (see :func:`_init_weights`)."""
    kind = type(module).__name__
    noise = torch.randn(p.shape, generator=gen)
    if name == "bias":
        return 0.05 * noise
    if "Norm" in kind:
        zero_centred = kind.startswith("Gemma")
        return 0.1 * noise if zero_centred else 1.0 + 0.1 * noise
    if isinstance(module, nn.Linear):
        return noise / p.shape[1] ** 0.5
    if isinstance(module, nn.Conv2d):
        return noise / (p[0].numel()) ** 0.5
    if isinstance(module, nn.Embedding):
        text = "embed_tokens" in mod_name
        return noise / p.shape[1] ** 0.5 if text and kind.startswith("Gemma") else 0.5 * noise
    if p.ndim == 2:  # Gemma-3's projector weight, used as x @ W: fan_in is the first axis
        return noise / p.shape[0] ** 0.5
    return 0.5 * noise


# ---------------------------------------------------------------------- processors
def _processor(kind: str, mm_tokens_per_image: int) -> Any:
    """The processor for ``kind`` with its tiny image processor and tokenizer."""
    from transformers import (
        CLIPImageProcessorPil,
        Gemma3ImageProcessorPil,
        Gemma3Processor,
        LlavaProcessor,
        SiglipImageProcessorPil,
    )

    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    if kind == "gemma3":
        image_processor = Gemma3ImageProcessorPil(
            size=square,
            resample=2,  # PIL bilinear
            image_mean=[0.5, 0.5, 0.5],
            image_std=[0.5, 0.5, 0.5],
            do_pan_and_scan=False,
        )
        return Gemma3Processor(
            image_processor=image_processor,
            tokenizer=build_tokenizer("<image_soft_token>"),
            chat_template=GEMMA_CHAT_TEMPLATE,
            image_seq_length=mm_tokens_per_image,
        )
    if kind == "llava":
        clip = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE}, crop_size=square)
        return LlavaProcessor(
            image_processor=clip,
            tokenizer=build_tokenizer("<image>"),
            patch_size=LLAVA_PATCH,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,
        )
    siglip = SiglipImageProcessorPil(size=square)
    return LlavaProcessor(
        image_processor=siglip,
        tokenizer=build_tokenizer("<image>"),
        patch_size=LLAVA_PATCH,
        vision_feature_select_strategy="full",
        num_additional_image_tokens=0,
    )


# ---------------------------------------------------------------------- public API
def build_tiny_vlm(
    kind: str, *, seed: int = 0, mm_tokens_per_image: int = 16, n_vision_layers: int = 5
) -> tuple[Any, Any]:
    """A tiny random vision-language model of ``kind`` (eval, float32, eager attention) and its
    processor.

    ``mm_tokens_per_image`` (Gemma-3 only) must be a square dividing the 8 x 8 patch grid into
    equal blocks (1, 4, 16 or 64). ``n_vision_layers`` defaults to 5 so the rollout's last 4
    layers are a strict subset.
    """
    import transformers as tf

    if kind not in KINDS:
        raise ValueError(f"unknown tiny VLM kind {kind!r}; choose one of {KINDS}")
    if kind == "gemma3":
        side = round(mm_tokens_per_image**0.5)
        per_side = IMAGE_SIZE // GEMMA_PATCH
        if side * side != mm_tokens_per_image or per_side % side:
            raise ValueError(f"mm_tokens_per_image {mm_tokens_per_image} does not tile 8 x 8")
        config = _gemma3_config(mm_tokens_per_image, n_vision_layers)
        cls: Any = tf.Gemma3ForConditionalGeneration
    else:
        config = _llava_config(kind, n_vision_layers)
        cls = tf.LlavaForConditionalGeneration
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).to(torch.float32).eval()
    _init_weights(model, seed)
    return model, _processor(kind, mm_tokens_per_image)


def save_tiny_vlm(
    out_dir: Path, kind: str, *, seed: int = 0, mm_tokens_per_image: int = 16
) -> Path:
    """Build the tiny VLM of ``kind`` and save it in the hub layout under ``out_dir``; return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_vlm(kind, seed=seed, mm_tokens_per_image=mm_tokens_per_image)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    _generic_tokenizer_class(out_dir)
    return out_dir


def _generic_tokenizer_class(out_dir: Path) -> None:
    """Name the generic fast tokenizer class, which transformers 4.x and 5.x both know."""
    path = out_dir / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(cfg, indent=2))


def save_language_model(vlm_dir: Path, out_dir: Path) -> Path:
    """Save the language model of the VLM in ``vlm_dir`` alone, as a text causal LM directory
    with the same weights and tokenizer (Gemma-3 -> ``Gemma3ForCausalLM``, LLaVA's Llama ->
    ``LlamaForCausalLM``, ...): the text twin that a prompt without an image must match, and the
    model tiny transcoders for the VLM are calibrated on (:func:`atlas.testing.tiny.
    build_tiny_transcoders`)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    vlm = AutoModelForImageTextToText.from_pretrained(str(vlm_dir), dtype=torch.float32)
    text_config = vlm.config.get_text_config()
    lm = AutoModelForCausalLM.from_config(text_config).to(torch.float32).eval()
    with torch.no_grad():
        lm.model.load_state_dict(vlm.model.language_model.state_dict())
        lm.lm_head.weight.copy_(vlm.lm_head.weight)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm.save_pretrained(str(out_dir), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(vlm_dir)).save_pretrained(str(out_dir))
    _generic_tokenizer_class(out_dir)
    return out_dir
