"""Concept vectors in the atlas: built from two prompt sets, stored as ``(:SteeringVector)``
with their closest transcoder features, applied to prompts.

The projection of each prompt on the vector's unit direction (the residual at the vector's
layer, reduced by its token rule) is computed when the vector is built (its own prompt sets)
and each time it is applied, and kept on the node (``projections``: prompt text -> value), so
``atlas query vector NAME`` can list the prompts where it is largest without rerunning the model.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.engine import PROCESS_ENGINES, Engine, EngineCache, resolve_refs
from atlas.errors import InputError

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings

#: How many closest decoder directions are linked (``CLOSE_TO``).
TOP_K = 10


def read_prompts(path: Path) -> list[str]:
    """One prompt per non-empty line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InputError(f"{path}: {exc.strerror or exc}") from exc
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise InputError(f"{path}: no prompts in it")
    return prompts


def _projection(engine: Engine, vector: Any, prompt: str) -> float:
    from atlas.interventions import residuals

    resid = residuals(engine.model, engine.model.inputs(prompt))[vector.layer]
    reduced = resid[-1] if vector.token_rule == "last" or resid.shape[0] == 1 else resid[1:].mean(0)
    return float(reduced @ vector.unit.to(reduced.dtype))


def build_step(
    name: str,
    *,
    model: str | None,
    transcoders: str | None,
    layer: int,
    positive: list[str],
    negative: list[str],
    token_rule: str,
    settings: AtlasSettings,
    engines: EngineCache | None = None,
) -> dict[str, Any]:
    """The vector and what is stored of it (see :func:`atlas.store.interventions.store_vector`)."""
    from atlas.interventions import build_vector, decoder_cosines

    model_ref, tc_ref = resolve_refs(model, transcoders, settings)
    engine = (engines or PROCESS_ENGINES).get(model_ref, tc_ref, settings)
    m = engine.model
    vec = build_vector(
        m,
        [m.inputs(p) for p in positive],
        [m.inputs(p) for p in negative],
        layer,
        token_rule,  # type: ignore[arg-type]
    )
    cos = decoder_cosines(vec, engine.transcoders, layer).float().cpu()
    top = cos.topk(min(TOP_K, cos.numel()))
    close = [
        {"layer": layer, "feature": int(i), "cosine": float(c)}
        for c, i in zip(top.values, top.indices, strict=True)
    ]
    projections = {p: _projection(engine, vec, p) for p in [*positive, *negative]}
    return {
        "name": name,
        "model": model_ref,
        "transcoders": tc_ref,
        "tset": engine.transcoder_info.content_hash,
        "layer": layer,
        "token_rule": token_rule,
        "vector": [float(x) for x in vec.vector.float().cpu()],
        "norm": float(vec.vector.norm()),
        "positive": positive,
        "negative": negative,
        "close": close,
        "projections": projections,
    }


def apply_step(
    stored: dict[str, Any],
    prompt: str,
    alpha: float,
    *,
    generate: int,
    settings: AtlasSettings,
    engines: EngineCache | None = None,
) -> dict[str, Any]:
    """Steer ``prompt`` with a stored vector: ``h += alpha * v`` after BOS at its layer."""
    import torch

    from atlas.interventions import SteeringVector, steer

    engine = (engines or PROCESS_ENGINES).get(stored["model"], stored["transcoders"], settings)
    device = engine.model.device
    vec = SteeringVector(
        torch.tensor(stored["vector"], dtype=engine.model.dtype, device=device),
        int(stored["layer"]),
        stored["token_rule"],
        0,
        0,
    )
    res = steer(engine.model, engine.model.inputs(prompt), vec, alpha, generate=generate)
    clean_p, steered_p = res.projection(vec, vec.layer)
    p_c = torch.softmax(res.base_logits[-1].double(), -1)
    p_s = torch.softmax(res.logits[-1].double(), -1)
    ids = p_s.topk(min(10, p_s.numel())).indices.tolist()
    tok = engine.model.tokenizer
    return {
        "name": stored["name"],
        "prompt": prompt,
        "alpha": alpha,
        "kl": res.kl(),
        "projection": {"clean": clean_p, "steered": steered_p},
        "top": [
            {
                "token": tok.decode([i]),
                "token_id": i,
                "base": float(p_c[i]),
                "steered": float(p_s[i]),
            }
            for i in ids
        ],
        "generated": res.generated_text if generate else None,
    }
