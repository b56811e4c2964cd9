"""Tiny, local, seeded models and transcoders for tests and benchmarks. No downloads.

Two builders, with a stable API:

``build_tiny_model(family, out_dir, ...) -> Path``
    Saves an ordinary Hugging Face model directory (``config.json``, ``model.safetensors`` and a
    ``tokenizers``-built tokenizer saved with ``PreTrainedTokenizerFast.save_pretrained``), so both
    ``transformers.AutoModelForCausalLM`` / ``AutoTokenizer`` and circuit-tracer's nnsight backend
    load it offline. The tokenizer is character level: every character is one token (printable
    ASCII; anything else is ``<unk>``), and it prepends ``<bos>`` (id 1) for every family except
    ``gpt2`` (which, like the real GPT-2, adds nothing, so the engine's BOS-prepend path runs).
    Weights are random but rescaled so residual activations are O(1) and logits are spread out.

``build_tiny_transcoders(model_dir, out_dir, ...) -> Path``
    Writes transcoders in circuit-tracer's on-disk layout (``config.yaml`` plus
    ``layer_{i}.safetensors``, or ``W_enc_{i}`` / ``W_dec_{i}`` files for a cross-layer
    transcoder), with hook names in circuit-tracer's convention for the model's family. Encoder
    thresholds/biases are calibrated on the model's own MLP inputs over random text so that about
    ``target_l0`` features fire per token.

Families: ``gemma2``, ``gemma3`` (text-only ``Gemma3ForCausalLM``), ``llama``, ``qwen2``, ``qwen3``,
``gpt2``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

FAMILIES = ("gemma2", "gemma3", "llama", "qwen2", "qwen3", "gpt2")
KINDS = ("jumprelu", "relu", "topk", "clt")

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
_SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
_CHARS = [c for c in string.printable if c.isprintable() or c == " "]  # 95 printable ASCII chars

#: (feature_input_hook, feature_output_hook) per family, in circuit-tracer's (TransformerLens) names.
HOOKS: dict[str, tuple[str, str]] = {
    "gemma2": ("ln2.hook_normalized", "hook_mlp_out"),
    "gemma3": ("mlp.hook_in", "hook_mlp_out"),
    "llama": ("mlp.hook_in", "mlp.hook_out"),
    "qwen2": ("mlp.hook_in", "mlp.hook_out"),
    "qwen3": ("mlp.hook_in", "mlp.hook_out"),
    "gpt2": ("ln2.hook_normalized", "hook_mlp_out"),
}

#: Sample text used for calibration (the tests' prompts look like this).
SAMPLE_TEXT = [
    "The cat sat on the mat.",
    "Fact: the capital of France is Paris",
    "1 + 2 = 3, 2 + 3 = 5",
    "When Mary and John went to the store, John gave a drink to",
    "hello world! 42",
]


def _calibration_text(n_seqs: int = 24, length: int = 64) -> list[str]:
    """Seeded pseudo-text (sample sentences re-cut and mixed): ~1.5k tokens for calibration."""
    gen = torch.Generator().manual_seed(1234)
    words = " ".join(SAMPLE_TEXT).split()
    out = list(SAMPLE_TEXT)
    for _ in range(n_seqs):
        idx = torch.randint(0, len(words), (length // 3,), generator=gen).tolist()
        out.append(" ".join(words[i] for i in idx)[:length])
    return out


def _vocab(vocab_size: int) -> dict[str, int]:
    vocab = {tok: i for i, tok in enumerate(_SPECIALS)}
    for ch in _CHARS:
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    return vocab


def _save_tokenizer(out_dir: Path, vocab_size: int, add_bos: bool, max_len: int) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    from atlas.toy.tokenizer import wrap_tokenizer

    tok = Tokenizer(models.WordLevel(vocab=_vocab(vocab_size), unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = wrap_tokenizer(tok, BOS_ID if add_bos else None, model_max_length=max_len)
    fast.save_pretrained(str(out_dir))
    # transformers 5 writes "TokenizersBackend", unknown to 4.x (circuit-tracer's venv pins 4.57)
    cfg_path = out_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2))


def _config(
    family: str,
    *,
    n_layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_mlp: int,
    vocab_size: int,
) -> Any:
    import transformers as tf

    head_dim = d_model // n_heads
    common: dict[str, Any] = {
        "vocab_size": vocab_size,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    llama_like: dict[str, Any] = {
        **common,
        "hidden_size": d_model,
        "intermediate_size": d_mlp,
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 256,
        "rms_norm_eps": 1e-6,
    }
    if family == "gemma2":
        return tf.Gemma2Config(
            **llama_like,
            query_pre_attn_scalar=head_dim,
            sliding_window=64,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            tie_word_embeddings=True,
        )
    if family == "gemma3":
        return tf.Gemma3TextConfig(
            **llama_like,
            query_pre_attn_scalar=head_dim,
            sliding_window=64,
            tie_word_embeddings=True,
        )
    if family == "llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=False)
    if family == "qwen3":
        return tf.Qwen3Config(**llama_like, tie_word_embeddings=False)
    if family == "gpt2":
        return tf.GPT2Config(
            **common,
            n_embd=d_model,
            n_layer=n_layers,
            n_head=n_heads,
            n_inner=d_mlp,
            n_positions=256,
            activation_function="gelu_new",
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            tie_word_embeddings=True,
        )
    raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")


@torch.no_grad()
def _rescale(model: torch.nn.Module, family: str, d_model: int, gen: torch.Generator) -> None:
    """Random weights with O(1) activations: linear ~ N(0, 1/fan_in), norms near 1."""
    for name, p in model.named_parameters():
        if "norm" in name or ".ln_" in name or name.endswith("ln_f.weight") or "ln_f" in name:
            if name.endswith("bias"):
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
            elif family.startswith("gemma"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))  # gemma scales by (1 + w)
            else:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
        elif name.endswith("bias"):
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        elif "embed_tokens" in name or name.endswith("wte.weight") or name.endswith("wpe.weight"):
            scale = 1.0 / d_model**0.5 if family.startswith("gemma") else 1.0
            if family == "gpt2":  # tied unembedding: keep logits spread, not one-hot
                scale = 0.2
            p.copy_(scale * torch.randn(p.shape, generator=gen))
        elif p.ndim == 2:
            # nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out)
            fan_in = p.shape[0] if family == "gpt2" and "lm_head" not in name else p.shape[1]
            p.copy_(torch.randn(p.shape, generator=gen) / fan_in**0.5)
        else:
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))


def build_tiny_model(
    family: str,
    out_dir: Path,
    *,
    seed: int = 0,
    n_layers: int = 2,
    d_model: int = 64,
    n_heads: int = 4,
    n_kv_heads: int | None = None,
    d_mlp: int = 128,
    vocab_size: int = 256,
) -> Path:
    """Build and save a tiny random causal LM of ``family`` under ``out_dir``; return the dir."""
    import transformers as tf

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {FAMILIES}")
    if vocab_size < len(_SPECIALS) + 16:
        raise ValueError("vocab_size too small for the tiny tokenizer")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = _config(
        family,
        n_layers=n_layers,
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads or n_heads,
        d_mlp=d_mlp,
        vocab_size=vocab_size,
    )
    torch.manual_seed(seed)
    cls = {
        "gemma2": tf.Gemma2ForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
        "llama": tf.LlamaForCausalLM,
        "qwen2": tf.Qwen2ForCausalLM,
        "qwen3": tf.Qwen3ForCausalLM,
        "gpt2": tf.GPT2LMHeadModel,
    }[family]
    model = cls(config).to(torch.float32).eval()
    gen = torch.Generator().manual_seed(seed)
    _rescale(model, family, d_model, gen)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    _save_tokenizer(out_dir, vocab_size, add_bos=family != "gpt2", max_len=256)
    return out_dir


# ---------------------------------------------------------------------- transcoders
def _family_of(config: Any) -> str:
    arch = (getattr(config, "architectures", None) or [""])[0]
    mt = getattr(config, "model_type", "")
    table = {
        "gemma2": "gemma2",
        "gemma3_text": "gemma3",
        "gemma3": "gemma3",
        "llama": "llama",
        "qwen2": "qwen2",
        "qwen3": "qwen3",
        "gpt2": "gpt2",
    }
    if mt in table:
        return table[mt]
    raise ValueError(f"tiny transcoders: unsupported model {arch or mt}")


def _layers(model: Any, family: str) -> list[Any]:
    if family == "gpt2":
        return list(model.transformer.h)
    return list(model.model.layers)


def _mlp_in_out_modules(layer: Any, family: str) -> tuple[Any, Any]:
    """(module whose output is the MLP input, module whose output is the MLP contribution)."""
    if family.startswith("gemma"):
        return layer.pre_feedforward_layernorm, layer.post_feedforward_layernorm
    if family == "gpt2":
        return layer.ln_2, layer.mlp
    return layer.post_attention_layernorm, layer.mlp


@torch.no_grad()
def _collect_mlp_io(model_dir: Path) -> tuple[str, list[torch.Tensor], list[torch.Tensor]]:
    """MLP inputs and outputs per layer over :data:`SAMPLE_TEXT` (BOS position dropped)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(str(model_dir))
    family = _family_of(config)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    layers = _layers(model, family)
    ins: list[list[torch.Tensor]] = [[] for _ in layers]
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    handles = []
    for i, layer in enumerate(layers):
        m_in, m_out = _mlp_in_out_modules(layer, family)
        handles.append(m_in.register_forward_hook(lambda _m, _a, o, i=i: ins[i].append(o[0, 1:])))
        handles.append(m_out.register_forward_hook(lambda _m, _a, o, i=i: outs[i].append(o[0, 1:])))
    try:
        for text in _calibration_text():
            ids = tok(text, return_tensors="pt")["input_ids"]
            if ids[0, 0].item() != BOS_ID:
                ids = torch.cat([torch.tensor([[BOS_ID]]), ids], dim=1)
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    return family, [torch.cat(x) for x in ins], [torch.cat(x) for x in outs]


def build_tiny_transcoders(
    model_dir: Path,
    out_dir: Path,
    *,
    kind: str = "jumprelu",
    d_transcoder: int = 256,
    skip: bool = False,
    seed: int = 0,
    target_l0: int = 12,
) -> Path:
    """Write tiny transcoders for the model in ``model_dir`` (circuit-tracer layout); return the dir.

    ``kind``: ``jumprelu`` (threshold file entry), ``relu`` (negative encoder bias), ``topk``
    (config ``activation: topk``, ``k: target_l0``) or ``clt`` (cross-layer transcoder with JumpReLU
    thresholds). ``skip`` adds ``W_skip`` to per-layer transcoders (not supported for ``clt``, as in
    circuit-tracer's CLT file format).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown transcoder kind {kind!r}; choose one of {KINDS}")
    if skip and kind == "clt":
        raise ValueError("circuit-tracer's CLT file layout has no W_skip")
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    family, ins, outs = _collect_mlp_io(model_dir)
    n_layers = len(ins)
    d_model = ins[0].shape[-1]
    gen = torch.Generator().manual_seed(seed)
    frac = min(max(target_l0 / d_transcoder, 1e-4), 0.5)

    def encoder(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w_enc = torch.randn(d_transcoder, d_model, generator=gen) / d_model**0.5
        pre = x @ w_enc.T
        # per-feature (1 - frac) quantile of the pre-activation, so ~target_l0 fire per token
        thr = torch.quantile(pre, 1.0 - frac, dim=0).clamp_min(1e-3)
        b_enc = 0.01 * torch.randn(d_transcoder, generator=gen)
        return w_enc, b_enc, thr

    def decoder_scale(y: torch.Tensor) -> float:
        return float(y.norm(dim=-1).mean()) / max(target_l0, 1) ** 0.5 / d_model**0.5

    in_hook, out_hook = HOOKS[family]
    config: dict[str, Any] = {
        "model_name": str(model_dir),
        "feature_input_hook": in_hook,
        "feature_output_hook": out_hook,
        "scan": f"tiny-{family}-{kind}",
    }
    if kind == "clt":
        config["model_kind"] = "cross_layer_transcoder"
        for i in range(n_layers):
            w_enc, b_enc, thr = encoder(ins[i])
            scale = decoder_scale(outs[i])
            w_dec = scale * torch.randn(d_transcoder, n_layers - i, d_model, generator=gen)
            b_dec = 0.02 * torch.randn(d_model, generator=gen)
            save_file(
                {
                    f"W_enc_{i}": w_enc.contiguous(),
                    f"b_enc_{i}": b_enc,
                    f"b_dec_{i}": b_dec,
                    f"threshold_{i}": thr,
                },
                str(out_dir / f"W_enc_{i}.safetensors"),
            )
            save_file({f"W_dec_{i}": w_dec.contiguous()}, str(out_dir / f"W_dec_{i}.safetensors"))
    else:
        config["model_kind"] = "transcoder_set"
        if kind == "topk":
            config["activation"] = "topk"
            config["k"] = int(target_l0)
        paths = []
        for i in range(n_layers):
            w_enc, b_enc, thr = encoder(ins[i])
            scale = decoder_scale(outs[i])
            tensors = {
                "W_enc": w_enc.contiguous(),
                "W_dec": (scale * torch.randn(d_transcoder, d_model, generator=gen)).contiguous(),
                "b_enc": b_enc,
                "b_dec": 0.02 * torch.randn(d_model, generator=gen),
            }
            if kind == "jumprelu":
                tensors["activation_function.threshold"] = thr
            elif kind == "relu":
                tensors["b_enc"] = b_enc - thr
            else:  # topk: positive bias so the top-k are mostly positive
                tensors["b_enc"] = b_enc
            if skip:
                tensors["W_skip"] = (
                    0.1 * torch.randn(d_model, d_model, generator=gen) / d_model**0.5
                ).contiguous()
            name = f"layer_{i}.safetensors"
            save_file(tensors, str(out_dir / name))
            paths.append(str((out_dir / name).resolve()))
        config["transcoders"] = paths
    (out_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (out_dir / "tiny.json").write_text(
        json.dumps({"family": family, "kind": kind, "d_transcoder": d_transcoder, "seed": seed})
    )
    return out_dir


# ----------------------------------------------------------------------------- portability
def portable_model_dir(model_dir: Path) -> None:
    """Make the saved tokenizer loadable by transformers 4.57 (circuit-tracer's pin) as well.

    transformers 5 writes ``"tokenizer_class": "TokenizersBackend"``, which 4.x does not know;
    ``PreTrainedTokenizerFast`` loads the same ``tokenizer.json`` in both.
    """
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("tokenizer_class") == "TokenizersBackend":
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def portable_transcoder_dir(tc_dir: Path, case: str) -> None:
    """Drop absolute paths from config.yaml (layer files are found next to it)."""
    cfg_path = tc_dir / "config.yaml"
    cfg = yaml.safe_load(cfg_path.read_text())
    cfg.pop("transcoders", None)
    cfg["model_name"] = case
    cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
