"""SAELens-format transcoders: one directory per layer with ``cfg.json`` + ``sae_weights.safetensors``.

SAELens stores ``W_enc`` as ``(d_in, d_sae)`` and ``W_dec`` as ``(d_sae, d_out)``; the engine's
canonical layout is ``W_enc (d_tc, d_model)``, ``W_dec (d_tc, d_model)``, so the encoder is
transposed here. ``apply_b_dec_to_input`` (the encoder sees ``x - b_dec``) is folded into the
encoder bias, ``b_enc - W_enc^T b_dec``, which is exact and keeps the engine's
``x @ W_enc.T + b_enc``. Layers come from ``hook_layer`` (else the ``blocks.{L}.`` prefix of
``hook_name``); hooks from ``hook_name`` / ``hook_name_out`` without that prefix, with SAELens'
``hook_mlp_in`` read as ``mlp.hook_in``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from atlas.errors import TranscoderError

_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")
#: SAELens hook names -> the engine's (the adapter refuses what it does not support)
_HOOK_ALIASES = {"hook_mlp_in": "mlp.hook_in", "hook_resid_mid": "ln2.hook_normalized"}


def _read_cfg(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise TranscoderError(f"{path}: not a readable SAELens cfg.json ({exc})") from exc
    if not isinstance(cfg, dict):
        raise TranscoderError(f"{path}: cfg.json must hold an object")
    for key in ("d_in", "d_sae", "hook_name"):
        if key not in cfg:
            raise TranscoderError(f"{path}: cfg.json lacks {key!r}")
    return cfg


def _layer_and_hook(cfg: dict[str, Any], path: Path) -> tuple[int, str]:
    """The layer a SAELens transcoder reads and its input hook in the engine's terms."""
    m = _BLOCK.match(str(cfg["hook_name"]))
    layer = cfg.get("hook_layer", int(m.group(1)) if m else None)
    if not isinstance(layer, int) or layer < 0:
        raise TranscoderError(f"{path}: no layer (hook_layer or blocks.L. in hook_name)")
    hook = m.group(2) if m else str(cfg["hook_name"])
    return layer, _HOOK_ALIASES.get(hook, hook)


def _output_hook(cfg: dict[str, Any]) -> str:
    out = str(cfg.get("hook_name_out") or "hook_mlp_out")
    m = _BLOCK.match(out)
    return m.group(2) if m else out


def _activation(cfg: dict[str, Any], path: Path, has_threshold: bool) -> tuple[str, int | None]:
    arch = str(cfg.get("architecture") or "standard")
    fn = str(cfg.get("activation_fn") or cfg.get("activation_fn_str") or "relu")
    if arch == "jumprelu" or has_threshold:
        return "jumprelu", None
    if arch == "topk" or fn == "topk":
        kwargs = cfg.get("activation_fn_kwargs") or {}
        k = kwargs.get("k", cfg.get("k"))
        if not isinstance(k, int) or k <= 0:
            raise TranscoderError(f"{path}: a TopK SAELens transcoder needs a positive k")
        return "relu_topk", k
    if fn != "relu":
        raise TranscoderError(f"{path}: unsupported SAELens activation {fn!r}")
    return "relu", None


def _one(directory: Path) -> dict[str, Any]:
    """One layer's tensors in the canonical layout, with its cfg-derived facts."""
    from safetensors.torch import load_file

    cfg_path, weights = directory / "cfg.json", directory / "sae_weights.safetensors"
    cfg = _read_cfg(cfg_path)
    if not weights.is_file():
        raise TranscoderError(f"missing SAELens weights {weights}")
    try:
        raw = load_file(str(weights))
    except Exception as exc:
        raise TranscoderError(f"corrupted or unreadable transcoder file {weights}: {exc}") from exc
    missing = [k for k in ("W_enc", "W_dec", "b_enc", "b_dec") if k not in raw]
    if missing:
        raise TranscoderError(f"{weights.name} in {directory}: missing {', '.join(missing)}")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    d_out = int(cfg.get("d_out", d_in))
    shapes = {
        "W_enc": (d_in, d_sae),
        "W_dec": (d_sae, d_out),
        "b_enc": (d_sae,),
        "b_dec": (d_out,),
    }
    for name, shape in shapes.items():
        if tuple(raw[name].shape) != shape:
            got = tuple(raw[name].shape)
            raise TranscoderError(f"{directory.name}: {name} has shape {got}, expected {shape}")
    if d_in != d_out:
        raise TranscoderError(f"{directory.name}: d_in {d_in} and d_out {d_out} differ")
    w_enc = raw["W_enc"].T.contiguous()
    b_enc = raw["b_enc"]
    if cfg.get("apply_b_dec_to_input"):
        b_enc = b_enc - w_enc @ raw["b_dec"]
    layer, in_hook = _layer_and_hook(cfg, cfg_path)
    threshold = raw.get("threshold")
    activation, k = _activation(cfg, cfg_path, threshold is not None)
    return {
        "layer": layer,
        "in_hook": in_hook,
        "out_hook": _output_hook(cfg),
        "activation": activation,
        "k": k,
        "W_enc": w_enc,
        "b_enc": b_enc,
        "W_dec": raw["W_dec"],
        "b_dec": raw["b_dec"],
        "threshold": threshold,
        "W_skip": raw.get("W_skip"),
        "files": [cfg_path, weights],
    }


def load_saelens(
    root: Path, n_layers: int | None, device: str | torch.device, dtype: torch.dtype
) -> Any:
    """A :class:`~atlas.transcoders.loading.TranscoderSet` from SAELens layer directories."""
    from atlas.transcoders.loading import _PENDING_INFO, TranscoderSet

    layers = [_one(d) for d in sorted(p.parent for p in root.glob("*/cfg.json"))]
    layers.sort(key=lambda x: x["layer"])
    found = [x["layer"] for x in layers]
    want = list(range(n_layers if n_layers is not None else len(layers)))
    if found != want:
        raise TranscoderError(f"{root}: SAELens transcoders for layers {found}, need {want}")
    first = layers[0]
    for x in layers:
        same = all(x[key] == first[key] for key in ("in_hook", "out_hook", "activation", "k"))
        if not same or (x["W_skip"] is None) != (first["W_skip"] is None):
            raise TranscoderError(f"{root}: SAELens layers disagree on hooks or activation")
        if tuple(x["W_enc"].shape) != tuple(first["W_enc"].shape):
            raise TranscoderError(f"{root}: SAELens layers differ in shape")

    def cast(name: str) -> list[torch.Tensor]:
        return [x[name].to(device=device, dtype=dtype).contiguous() for x in layers]

    return TranscoderSet(
        kind="transcoder_set",
        activation=first["activation"],
        w_enc=cast("W_enc"),
        b_enc=cast("b_enc"),
        w_dec=cast("W_dec"),
        b_dec=cast("b_dec"),
        threshold=cast("threshold") if first["threshold"] is not None else None,
        w_skip=cast("W_skip") if first["W_skip"] is not None else None,
        k=first["k"],
        feature_input_hook=first["in_hook"],
        feature_output_hook=first["out_hook"],
        info=_PENDING_INFO,
        files=[f for x in layers for f in x["files"]],
    )
