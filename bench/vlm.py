"""Image + text attribution: seconds and peak memory per graph on Gemma-3-shaped random models.

Each case runs in a FRESH subprocess: it loads the model and transcoders (built once under
``bench/out/vlm/<shape>``, gitignored), attributes one image + text prompt (warm-up excluded
with ``--repeats`` > 1) and converts it to a pruned graph. We report the wall time of
``attribute()`` (the forward pass, the rollout and every backward row) plus ``to_graph()``, the
rollout alone, and the child's peak RSS (``os.wait4`` rusage of that child alone); on CUDA also
the peak allocated GPU memory.

Shapes (transcoders: the paper's format, ReLU then top-k per position, random weights):
  tiny       the test suite's tiny Gemma-3 (2 layers, d_model 64, 16 image tokens; 128-wide)
  small      4 layers, d_model 256, d_mlp 1024; SigLIP 4 layers, 128 px / 8 px patches pooled to
             64 image tokens; 2048-wide transcoders, top_k 16
  gemma3-4b  Gemma-3-4B's shape: 34 layers, d_model 2560, d_mlp 10240, 8 heads (4 KV, head_dim
             256), vocab 262208, sliding window 1024 every 6th layer global; SigLIP-So400m tower
             (27 layers, 1152 wide, 896 px / 14 px patches) pooled to 256 image tokens; 16384-wide
             transcoders, top_k 48 (the paper's); bfloat16; for ``--device cuda``

Usage::

    .venv/bin/python bench/vlm.py                              # tiny and small on this CPU
    .venv/bin/python bench/vlm.py --shapes small --repeats 2
    .venv/bin/python bench/vlm.py --device cuda --shape gemma3-4b
    .venv/bin/python bench/vlm.py --shape gemma3-4b --dry-run  # configs and sizes only (no weights)

The prompt is the image (the processor places it before the text) and ``--text-tokens`` words.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "vlm"


@dataclass(frozen=True)
class Shape:
    """A Gemma-3-shaped vision-language model and its transcoders."""

    n_layers: int
    d_model: int
    d_mlp: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    sliding_window: int
    global_every: int
    vision_layers: int
    vision_width: int
    vision_mlp: int
    vision_heads: int
    image_size: int
    patch: int
    image_tokens: int
    d_transcoder: int
    top_k: int
    dtype: str


SHAPES: dict[str, Shape] = {
    "small": Shape(4, 256, 1024, 4, 2, 64, 2048, 512, 2, 4, 128, 256, 4, 128, 8, 64, 2048, 16, "float32"),
    "gemma3-4b": Shape(
        34, 2560, 10240, 8, 4, 256, 262208, 1024, 6, 27, 1152, 4304, 16, 896, 14, 256, 16384, 48,
        "bfloat16",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------- building
def vlm_config(shape: Shape) -> Any:
    """The transformers ``Gemma3Config`` of ``shape`` (ids from the tiny tokenizer)."""
    import transformers as tf

    from atlas.testing import tiny_vlm as tv

    vision = tf.SiglipVisionConfig(
        hidden_size=shape.vision_width,
        intermediate_size=shape.vision_mlp,
        num_hidden_layers=shape.vision_layers,
        num_attention_heads=shape.vision_heads,
        image_size=shape.image_size,
        patch_size=shape.patch,
        vision_use_head=False,
        layer_norm_eps=1e-6,
    )
    layer_types = [
        "full_attention" if (i + 1) % shape.global_every == 0 else "sliding_attention"
        for i in range(shape.n_layers)
    ]
    text = tf.Gemma3TextConfig(
        vocab_size=shape.vocab,
        hidden_size=shape.d_model,
        intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.head_dim,
        query_pre_attn_scalar=shape.head_dim,
        max_position_embeddings=4096,
        sliding_window=shape.sliding_window,
        layer_types=layer_types,
        bos_token_id=tv.BOS_ID,
        eos_token_id=tv.EOS_ID,
        pad_token_id=tv.PAD_ID,
        tie_word_embeddings=True,
    )
    config = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=shape.image_tokens,
        boi_token_index=tv.BOI_ID,
        eoi_token_index=tv.EOI_ID,
        image_token_index=tv.IMAGE_SOFT_ID,
        tie_word_embeddings=True,
    )
    config._attn_implementation = "eager"
    return config


def _processor(shape: Shape) -> Any:
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor

    from atlas.testing import tiny_vlm as tv

    image_processor = Gemma3ImageProcessorPil(
        size={"height": shape.image_size, "width": shape.image_size},
        resample=2,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pan_and_scan=False,
    )
    return Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tv.build_tokenizer("<image_soft_token>"),
        chat_template=tv.GEMMA_CHAT_TEMPLATE,
        image_seq_length=shape.image_tokens,
    )


def _transcoders(shape: Shape, out: Path, seed: int = 0) -> Path:
    """Random transcoders in the paper's layout (config.yaml with top_k, one file per layer)."""
    import torch
    import yaml
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    d, w = shape.d_model, shape.d_transcoder
    files = []
    for layer in range(shape.n_layers):
        tensors = {
            "W_enc": torch.randn(w, d, generator=gen) / d**0.5,
            "W_dec": torch.randn(w, d, generator=gen) / w**0.5,
            "b_enc": torch.zeros(w),
            "b_dec": torch.zeros(d),
        }
        name = f"layer_{layer}.safetensors"
        save_file({k: v.to(getattr(torch, shape.dtype)) for k, v in tensors.items()}, out / name)
        files.append(name)
    config = {
        "model_kind": "transcoder_set",
        "feature_input_hook": "mlp.hook_in",
        "feature_output_hook": "mlp.hook_out",
        "top_k": shape.top_k,
        "layers": list(range(shape.n_layers)),
        "num_model_layers": shape.n_layers,
        "transcoders": files,
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    return out


def build(name: str) -> tuple[Path, Path, Path]:
    """(model dir, transcoder dir, image) of a shape, built once."""
    from atlas.testing.vlm_case import picture, tiny_vlm_case

    root = OUT / name
    if name == "tiny":
        case = tiny_vlm_case(root)
        return case.model_dir, case.tc_dir, case.image
    shape = SHAPES[name]
    model_dir, tc_dir, image = root / "vlm", root / "tc", root / "picture.png"
    if not (root / ".built").is_file():
        import torch
        import transformers as tf

        from atlas.testing.tiny_vlm import _init_weights

        torch.manual_seed(0)
        model = tf.Gemma3ForConditionalGeneration(vlm_config(shape)).eval()
        with torch.no_grad():
            _init_weights(model, 0)
        model.to(getattr(torch, shape.dtype)).save_pretrained(str(model_dir))
        _processor(shape).save_pretrained(str(model_dir))
        cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
        cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2))
        _transcoders(shape, tc_dir)
        picture(image, seed=1, size=(640, 480))
        (root / ".built").write_text("ok\n")
    return model_dir, tc_dir, image


# ---------------------------------------------------------------------- one case (child process)
def _prompt(n_words: int) -> str:
    from atlas.testing.tiny_vlm import WORDS

    plain = [w for w in WORDS if w.isalpha()]
    return " ".join(plain[i % len(plain)] for i in range(n_words))


def run_case(args: argparse.Namespace) -> dict[str, Any]:
    """Load, attribute ``--repeats`` times, report the last run (child process)."""
    import torch

    from atlas.attribution import attribute
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    model_dir, tc_dir, image = build(args.shape)
    dtype = getattr(torch, "float32" if args.shape == "tiny" else SHAPES[args.shape].dtype)
    model = load_model(model_dir, device=args.device, dtype=dtype)
    tset = load_transcoders(tc_dir, model, device=args.device, dtype=dtype)
    prompt = _prompt(args.text_tokens)
    out: dict[str, Any] = {}
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        result = attribute(prompt, model, tset, image=image, batch_size=args.batch_size)
        graph = result.to_graph()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
            out["peak_cuda_bytes"] = torch.cuda.max_memory_allocated()
        out |= {
            "graph_s": time.perf_counter() - t0,
            "rollout_s": result.stats.get("rollout_s"),
            "n_pos": result.n_pos,
            "n_image_tokens": result.image.n_tokens if result.image else 0,
            "n_active": int(result.active_features.shape[0]),
            "n_nodes": graph.n_nodes,
            "n_edges": graph.n_edges,
        }
    return out


# ---------------------------------------------------------------------- driver
def _child(args: argparse.Namespace, shape: str) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", "--shape", shape, "--device", args.device,
        "--repeats", str(args.repeats), "--text-tokens", str(args.text_tokens),
        "--batch-size", str(args.batch_size),
    ]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True)
    stdout = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{shape}: child failed with status {status}")
    result: dict[str, Any] = json.loads(stdout.strip().splitlines()[-1])
    result |= {
        "shape": shape,
        "process_s": time.perf_counter() - t0,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
    }
    return result


def dry_run(shape_name: str) -> dict[str, Any]:
    """The configs and parameter counts of a shape, built on the meta device (no weights)."""
    import torch
    import transformers as tf

    shape = SHAPES[shape_name]
    config = vlm_config(shape)
    with torch.device("meta"):
        model = tf.Gemma3ForConditionalGeneration(config)
    n_params = sum(p.numel() for p in model.parameters())
    n_tc = shape.n_layers * (2 * shape.d_transcoder * shape.d_model)
    bytes_per = 2 if shape.dtype == "bfloat16" else 4
    patches = (shape.image_size // shape.patch) ** 2
    return {
        "shape": shape_name,
        **asdict(shape),
        "patches": patches,
        "pool_block": int((patches**0.5) // (shape.image_tokens**0.5)),
        "model_params": n_params,
        "transcoder_params": n_tc,
        "weights_gb": (n_params + n_tc) * bytes_per / 1e9,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["tiny", "small"])
    ap.add_argument("--shape", default=None, help="One shape (overrides --shapes).")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--text-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shapes = [args.shape] if args.shape else args.shapes
    if args.child:
        print(json.dumps(run_case(args)))
        return
    for shape in shapes:
        if args.dry_run:
            if shape == "tiny":
                continue
            print(json.dumps(dry_run(shape)))
            continue
        print(json.dumps(_child(args, shape)), flush=True)


if __name__ == "__main__":
    main()
