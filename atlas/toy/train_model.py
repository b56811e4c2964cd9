"""Train the toy world's causal LM on CPU with plain torch.

The model is an ordinary :class:`transformers.LlamaForCausalLM` (4 layers, d_model 128, 4 heads,
2 KV heads, d_mlp 512, 64 positions), trained on streamed documents of
:class:`atlas.toy.corpus.ToyCorpus` and saved with ``save_pretrained`` next to the toy tokenizer,
so every loader treats the directory like a downloaded model.

Determinism: the corpus sampler, ``torch.manual_seed`` and a fixed thread count make a run a
pure function of its :class:`ModelTrainConfig` on a given machine and library version
(``torch.use_deterministic_algorithms`` is switched on for the duration of training).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from atlas.toy.build import write_json
from atlas.toy.corpus import Fact, ToyCorpus
from atlas.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, build_tokenizer, save_tokenizer
from atlas.transcoders.training import torch_threads

logger = logging.getLogger(__name__)


@dataclass
class ModelTrainConfig:
    """Shape and optimisation settings of the toy LM."""

    seed: int = 0
    """Seeds the corpus split, the document sampler and the weight initialisation."""
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    n_kv_heads: int = 2
    d_mlp: int = 512
    max_positions: int = 64
    seq_len: int = 48
    """Tokens per training sequence (BOS included)."""
    batch_size: int = 32
    steps: int = 3000
    lr: float = 3e-3
    warmup_steps: int = 100
    weight_decay: float = 0.01
    threads: int = 2
    """torch intra-op threads; fixed so results do not depend on the machine's core count."""

    def __post_init__(self) -> None:
        if self.seq_len > self.max_positions:
            raise ValueError("seq_len must not exceed max_positions")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError("d_model must divide by n_heads, n_heads by n_kv_heads")


@contextmanager
def deterministic_torch(seed: int, threads: int) -> Iterator[None]:
    """Seed torch, fix the thread count and require deterministic kernels inside the block."""
    old_det = torch.are_deterministic_algorithms_enabled()
    with torch_threads(threads):
        torch.manual_seed(seed)
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(old_det)


def make_config(cfg: ModelTrainConfig, vocab_size: int) -> Any:
    """The ``LlamaConfig`` of the toy model."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.d_model // cfg.n_heads,
        max_position_embeddings=cfg.max_positions,
        rms_norm_eps=1e-6,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )


def encode_documents(tokenizer: Any, docs: Sequence[str], seq_len: int) -> torch.Tensor:
    """Token ids ``(len(docs), seq_len)``: BOS + the document, truncated (or right-padded)."""
    out = torch.full((len(docs), seq_len), PAD_ID, dtype=torch.long)
    for i, doc in enumerate(docs):
        ids = tokenizer(doc).input_ids[:seq_len]
        out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def batch_stream(
    corpus: ToyCorpus,
    tokenizer: Any,
    seed: int,
    batch_size: int,
    seq_len: int,
    heldout: bool = False,
) -> Iterator[torch.Tensor]:
    """Endless batches of token ids from a seeded document sampler."""
    rng = random.Random(f"toy-batches-{corpus.seed}-{seed}-{heldout}")
    min_words = seq_len + 4
    while True:
        docs = [corpus.sample_document(rng, min_words, heldout=heldout) for _ in range(batch_size)]
        yield encode_documents(tokenizer, docs, seq_len)


def _lr_at(step: int, cfg: ModelTrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_model(
    corpus: ToyCorpus, tokenizer: Any, cfg: ModelTrainConfig, progress: bool = True
) -> Any:
    """Train a fresh ``LlamaForCausalLM`` on ``corpus``; returns it in eval mode."""
    from tqdm.auto import tqdm
    from transformers import LlamaForCausalLM

    with deterministic_torch(cfg.seed, cfg.threads):
        config = make_config(cfg, vocab_size=len(tokenizer))
        model = LlamaForCausalLM(config)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
        opt = torch.optim.AdamW(
            [
                {"params": decay, "weight_decay": cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0},
            ],
            lr=cfg.lr,
            betas=(0.9, 0.98),
        )
        stream = batch_stream(corpus, tokenizer, cfg.seed, cfg.batch_size, cfg.seq_len)
        bar = tqdm(range(cfg.steps), desc="toy model", disable=not progress, mininterval=2.0)
        ema: float | None = None
        for step in bar:
            ids = next(stream)
            labels = ids.clone()
            labels[labels == PAD_ID] = -100
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, cfg)
            out = model(input_ids=ids, labels=labels)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            loss = float(out.loss.detach())
            ema = loss if ema is None else 0.98 * ema + 0.02 * loss
            if step % 50 == 0:
                bar.set_postfix(loss=f"{ema:.3f}")
            if step % 500 == 0:
                logger.info("toy model step %d loss %.4f", step, ema)
        model.eval()
    return model


@torch.no_grad()
def fact_accuracy(model: Any, tokenizer: Any, facts: Sequence[Fact]) -> dict[str, float]:
    """Top-1 accuracy of the answer word after each fact's prompt, overall and per family.

    Returns ``{"all": acc, "<family>": acc, ..., "n": count}``.
    """
    by_len: dict[int, list[tuple[list[int], int, str]]] = {}
    for fact in facts:
        ids = tokenizer(fact.prompt).input_ids
        answer = tokenizer.convert_tokens_to_ids(fact.answer)
        by_len.setdefault(len(ids), []).append((ids, answer, fact.family))
    hits: dict[str, list[int]] = {}
    for items in by_len.values():
        for start in range(0, len(items), 256):
            chunk = items[start : start + 256]
            ids_t = torch.tensor([ids for ids, _, _ in chunk], dtype=torch.long)
            pred = model(input_ids=ids_t).logits[:, -1].argmax(-1)
            for (_, answer, family), p in zip(chunk, pred.tolist(), strict=True):
                ok = int(p == answer)
                hits.setdefault(family, []).append(ok)
                hits.setdefault("all", []).append(ok)
    result = {k: sum(v) / len(v) for k, v in sorted(hits.items())}
    result["n"] = float(len(facts))
    return result


def save_model(model: Any, tokenizer: Any, out_dir: Path) -> None:
    """``save_pretrained`` the model and tokenizer into one directory, loadable by older
    transformers too (adds ``rope_theta`` at top level and names the tokenizer class)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir))
    save_tokenizer(tokenizer, out_dir)
    cfg_path = out_dir / "config.json"
    config = json.loads(cfg_path.read_text())
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    config.setdefault("torch_dtype", config.get("dtype", "float32"))
    write_json(cfg_path, config)
    tok_cfg_path = out_dir / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    write_json(tok_cfg_path, tok_cfg)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o644)


def train_and_save(
    out_dir: Path, cfg: ModelTrainConfig, progress: bool = True
) -> tuple[Any, Any, ToyCorpus, dict[str, Any]]:
    """Build corpus + tokenizer, train, save to ``out_dir``; returns (model, tokenizer, corpus,
    metrics) with held-out accuracies in ``metrics``."""
    corpus = ToyCorpus(cfg.seed)
    tokenizer = build_tokenizer(corpus.vocabulary())
    model = train_model(corpus, tokenizer, cfg, progress=progress)
    save_model(model, tokenizer, out_dir)
    metrics: dict[str, Any] = {"config": asdict(cfg)}
    with deterministic_torch(cfg.seed, cfg.threads):
        for split in ("train", "heldout_pair", "heldout_template"):
            metrics[f"accuracy_{split}"] = fact_accuracy(model, tokenizer, corpus.split(split))
    return model, tokenizer, corpus, metrics
