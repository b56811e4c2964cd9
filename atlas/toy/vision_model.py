"""The toy vision-language model: LLaVA with a tiny CLIP tower trained from scratch, on CPU.

Architecture (an ordinary :class:`transformers.LlavaForConditionalGeneration`, saved with
``save_pretrained`` next to a ``LlavaProcessor``, so :func:`atlas.models.load_model` loads it as
it loads a hub LLaVA):

* vision tower: CLIP, 48 x 48 pixels, patch 8 (36 patches plus CLS), 3 layers of width 64;
  the language model reads the last layer's patch features (CLS dropped);
* projector: LLaVA's two-layer GELU MLP, 64 -> 128 -> 128;
* language model: the toy world's Llama (4 layers, d_model 128) with its word-level tokenizer
  extended by the vision words (:data:`atlas.toy.vision_data.VISION_WORDS`) and ``<image>``;
  its weights start from the shipped text model, new vocabulary rows from the mean embedding.

A prompt is ``<bos> <image> x 36`` then the question's words; the answer is the next word.
Training: every step one batch of image questions (cross-entropy on the answer word), a batch
of captions (the image alone, the next word its object's name, as in a VLM's caption
pre-training) and a small batch of toy-corpus text (the LM loss, so text facts survive), all
weights trained, from a fixed pool of generated images. Determinism as in
:mod:`atlas.toy.train_model`.

The tower is deliberately shallow (one layer): what an image shows is worked out by the
language model at the image positions (the captioning task asks it to name the object at the
last image token), so the attribution graphs have visual features at image tokens, as the
VLM paper finds in Gemma-3, rather than a tower that hands the answer to the text positions.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from atlas.toy.build import write_json
from atlas.toy.vision_data import IMAGE_SIZE, VISION_WORDS, VisionSample, VisionWorld

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PATCH = 8
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH) ** 2
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionTrainConfig:
    """Shape and optimisation settings of the toy VLM."""

    seed: int = 0
    tower_width: int = 64
    tower_layers: int = 1
    tower_heads: int = 4
    steps: int = 2000
    batch_size: int = 32
    text_batch: int = 4
    """Toy-corpus documents per step (LM loss), 0 for none."""
    caption_batch: int = 8
    """Captioning items per step (the image alone; the next word names the object), 0 for none."""
    caption_weight: float = 0.5
    text_seq_len: int = 40
    text_weight: float = 0.5
    pool: int = 9600
    """Distinct training images (drawn once, reused across steps)."""
    lr: float = 3e-3
    lm_lr: float = 1e-3
    warmup_steps: int = 40
    weight_decay: float = 0.01
    threads: int = 1


# ---------------------------------------------------------------------- tokenizer / processor
def build_vision_tokenizer(text_tokenizer_dir: Path) -> Any:
    """The toy text tokenizer with the vision words appended (same ids for every old word) and
    ``<image>`` as a special token after them."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

    from atlas.toy.tokenizer import BOS_ID, wrap_tokenizer

    data = json.loads((text_tokenizer_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = dict(data["model"]["vocab"])
    for word in VISION_WORDS:
        if word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)])
    return wrap_tokenizer(
        tok,
        BOS_ID,
        model_max_length=64,
        clean_up_tokenization_spaces=False,
        extra_special_tokens={"image_token": IMAGE_TOKEN},
    )


def build_processor(tokenizer: Any) -> Any:
    """``LlavaProcessor``: CLIP image processing at 48 x 48, one ``<image>`` per patch."""
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE},
        crop_size=square,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
    )


def make_vlm_config(
    cfg: VisionTrainConfig, text_config: Any, vocab_size: int, image_id: int
) -> Any:
    """The ``LlavaConfig``: the toy Llama's config (vocabulary extended) and a CLIP tower."""
    import transformers as tf

    text = tf.LlamaConfig(**{**text_config.to_dict(), "vocab_size": vocab_size})
    vision = tf.CLIPVisionConfig(
        hidden_size=cfg.tower_width,
        intermediate_size=2 * cfg.tower_width,
        num_hidden_layers=cfg.tower_layers,
        num_attention_heads=cfg.tower_heads,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=cfg.tower_width,
    )
    return tf.LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=image_id,
        image_seq_length=N_IMAGE_TOKENS,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )


def init_vlm(cfg: VisionTrainConfig, text_model_dir: Path) -> tuple[Any, Any]:
    """A fresh LLaVA whose language model is the toy text model; returns (model, processor)."""
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    tokenizer = build_vision_tokenizer(text_model_dir)
    processor = build_processor(tokenizer)
    text = AutoModelForCausalLM.from_pretrained(str(text_model_dir), dtype=torch.float32)
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = make_vlm_config(cfg, text.config, len(tokenizer), image_id)
    config._attn_implementation = "eager"
    torch.manual_seed(cfg.seed)
    model: Any = LlavaForConditionalGeneration(config)
    model = model.float()
    lm = model.model.language_model
    state = {k: v for k, v in text.model.state_dict().items() if "embed_tokens" not in k}
    missing = lm.load_state_dict(state, strict=False)
    assert set(missing.missing_keys) == {"embed_tokens.weight"}, missing
    old_n = text.config.vocab_size
    with torch.no_grad():
        emb_old = text.model.embed_tokens.weight
        gen = torch.Generator().manual_seed(cfg.seed)
        emb = lm.embed_tokens.weight
        emb[:old_n] = emb_old
        noise = torch.randn(emb.shape[0] - old_n, emb.shape[1], generator=gen)
        emb[old_n:] = emb_old.mean(0) + 0.5 * emb_old.std() * noise
        head = model.lm_head.weight
        head[:old_n] = text.lm_head.weight
        head[old_n:] = 0.02 * torch.randn(head.shape[0] - old_n, head.shape[1], generator=gen)
    return model, processor


# ---------------------------------------------------------------------- data
def prompt_ids(tokenizer: Any, question: str, image_id: int) -> list[int]:
    """What the processor makes of ``"<image>\\n" + question``: BOS, the image tokens, the words."""
    from atlas.toy.tokenizer import BOS_ID

    words = tokenizer(question, add_special_tokens=False).input_ids
    return [BOS_ID] + [image_id] * N_IMAGE_TOKENS + list(words)


def pixels_u8(samples: Sequence[VisionSample]) -> torch.Tensor:
    """``(N, 3, H, W)`` uint8 pixels of the samples' images."""
    import numpy as np

    arr = np.stack([np.asarray(s.image, dtype=np.uint8) for s in samples])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def normalise(u8: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation of uint8 pixels (what the processor does to a 48 x 48 image)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (u8.float() / 255.0 - mean) / std


def batch_tensors(
    tokenizer: Any, samples: Sequence[VisionSample], image_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(ids (B, T) right-padded, attention mask, last position per row, answer ids)``."""
    from atlas.toy.tokenizer import PAD_ID

    rows = [prompt_ids(tokenizer, s.question, image_id) for s in samples]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    last = torch.tensor([len(r) - 1 for r in rows])
    answers = torch.tensor([tokenizer.convert_tokens_to_ids(s.answer) for s in samples])
    return ids, mask, last, answers


def _lr_factor(step: int, cfg: VisionTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vlm(
    model: Any, processor: Any, cfg: VisionTrainConfig, progress: bool = True
) -> dict[str, float]:
    """Train ``model`` in place (see the module docstring); returns the final loss averages."""
    import random

    from tqdm.auto import tqdm

    from atlas.toy.corpus import ToyCorpus
    from atlas.toy.tokenizer import PAD_ID
    from atlas.toy.train_model import batch_stream, deterministic_torch

    tokenizer = processor.tokenizer
    image_id = int(model.config.image_token_id)
    world = VisionWorld(cfg.seed)
    with deterministic_torch(cfg.seed, cfg.threads):
        samples = list(world.train_samples(cfg.pool))
        u8 = pixels_u8(samples)
        ids_all, mask_all, last_all, ans_all = batch_tensors(tokenizer, samples, image_id)
        cap_ids = torch.tensor([tokenizer.convert_tokens_to_ids(s.caption) for s in samples])
        cap_rows = torch.tensor([prompt_ids(tokenizer, "", image_id)] * cfg.caption_batch)
        cap_rng = torch.Generator().manual_seed(cfg.seed + 2)
        tasks = sorted({s.task for s in samples})
        task_all = torch.tensor([tasks.index(s.task) for s in samples])
        ema_task: dict[str, float] = {**dict.fromkeys(tasks, 0.0), "caption": 0.0}
        text_stream = batch_stream(
            ToyCorpus(cfg.seed), tokenizer, cfg.seed + 1, max(1, cfg.text_batch), cfg.text_seq_len
        )
        lm_params = [
            p for n, p in model.named_parameters() if "language_model" in n or "lm_head" in n
        ]
        lm_ids = {id(p) for p in lm_params}
        vis_params = [p for p in model.parameters() if id(p) not in lm_ids]
        opt = torch.optim.AdamW(
            [
                {"params": vis_params, "lr": cfg.lr, "base": cfg.lr},
                {"params": lm_params, "lr": cfg.lm_lr, "base": cfg.lm_lr},
            ],
            betas=(0.9, 0.98),
            weight_decay=cfg.weight_decay,
        )
        order_rng = random.Random(f"toy-vision-order-{cfg.seed}")
        order: list[int] = []
        model.train()
        bar = tqdm(range(cfg.steps), desc="toy VLM", disable=not progress, mininterval=2.0)
        ema_img = ema_txt = 0.0
        for step in bar:
            if len(order) < cfg.batch_size:
                fresh = list(range(cfg.pool))
                order_rng.shuffle(fresh)
                order += fresh
            idx = torch.tensor(order[: cfg.batch_size])
            del order[: cfg.batch_size]
            for group in opt.param_groups:
                group["lr"] = group["base"] * _lr_factor(step, cfg)
            ids, mask = ids_all[idx], mask_all[idx]
            width = int(mask.sum(1).max())
            ids, mask = ids[:, :width], mask[:, :width]
            out = model(input_ids=ids, attention_mask=mask, pixel_values=normalise(u8[idx]))
            logits = out.logits[torch.arange(len(idx)), last_all[idx]]
            per = torch.nn.functional.cross_entropy(logits, ans_all[idx], reduction="none")
            loss_img = per.mean()
            with torch.no_grad():
                for k, name in enumerate(tasks):
                    sel = task_all[idx] == k
                    if bool(sel.any()):
                        ema_task[name] = 0.95 * ema_task[name] + 0.05 * float(per[sel].mean())
            loss = loss_img
            if cfg.caption_batch:
                cidx = torch.randint(0, cfg.pool, (cfg.caption_batch,), generator=cap_rng)
                cap = model(input_ids=cap_rows, pixel_values=normalise(u8[cidx])).logits[:, -1]
                loss_cap = torch.nn.functional.cross_entropy(cap, cap_ids[cidx])
                loss = loss + cfg.caption_weight * loss_cap
                ema_task["caption"] = 0.95 * ema_task["caption"] + 0.05 * float(loss_cap.detach())
            loss_txt = torch.zeros(())
            if cfg.text_batch:
                tids = next(text_stream)
                labels = tids.clone()
                labels[labels == PAD_ID] = -100
                loss_txt = model(input_ids=tids, labels=labels).loss
                loss = loss + cfg.text_weight * loss_txt
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            a, b = float(loss_img.detach()), float(loss_txt.detach())
            ema_img = a if step == 0 else 0.98 * ema_img + 0.02 * a
            ema_txt = b if step == 0 else 0.98 * ema_txt + 0.02 * b
            if step % 25 == 0:
                bar.set_postfix(img=f"{ema_img:.3f}", txt=f"{ema_txt:.3f}")
            if step % 200 == 0:
                logger.info(
                    "toy VLM step %d image loss %.4f text loss %.4f (%s)",
                    step,
                    ema_img,
                    ema_txt,
                    " ".join(f"{k} {v:.3f}" for k, v in ema_task.items()),
                )
        model.eval()
    return {"image_loss": ema_img, "text_loss": ema_txt}


def save_vlm(model: Any, processor: Any, out_dir: Path) -> None:
    """``save_pretrained`` model and processor into one directory (hub layout)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    processor.save_pretrained(str(out_dir))
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(tok_cfg_path, tok_cfg)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o644)
