"""Feature labels in the atlas: logit lens and top activations stored on ``Feature`` nodes.

``store_logit_lens`` computes the lens (pure torch, :mod:`atlas.circuits.lens`) once for the
features of one transcoder set that the atlas holds (``store_lens`` takes the inputs
:func:`atlas.circuits.lens.logit_lens_for` builds); ``label_features`` derives each feature's top
activating tokens from the ingested prompts (Cypher) and writes a short label. Features seen in
image prompts are labelled from images too: their top activations at image soft tokens, with the
image (sha256) and the grid cell recorded (``top_image_regions``, ``"<sha[:12]>@row,col"``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import neo4j
import torch

from atlas.circuits.label_sources import FeatureEvidence, LabelSource, context, label_source
from atlas.circuits.lens import LensInputs, logit_lens
from atlas.store import queries as Q
from atlas.store.connection import read_rows, write_rows

log = logging.getLogger(__name__)


def store_lens(
    driver: neo4j.Driver,
    lens: LensInputs,
    *,
    k: int = 10,
    database: str | None = None,
    batch_size: int = 2000,
) -> int:
    """:func:`store_logit_lens` with the inputs of :func:`atlas.circuits.lens.logit_lens_for`."""
    return store_logit_lens(
        driver,
        lens.tset_hash,
        lens.w_dec,
        lens.w_u,
        lens.decode,
        k=k,
        database=database,
        batch_size=batch_size,
    )


def store_logit_lens(
    driver: neo4j.Driver,
    tset_hash: str,
    w_dec: Sequence[torch.Tensor],
    w_u: torch.Tensor,
    decode: Callable[[int], str],
    *,
    k: int = 10,
    norm_weight: torch.Tensor | None = None,
    database: str | None = None,
    batch_size: int = 2000,
) -> int:
    """Logit lens of every stored feature of ``tset_hash``; returns how many were written.

    ``w_dec[layer]`` is that layer's decoder (``(d_tc, d_model)`` or a CLT's 3-D decoder),
    ``w_u`` the unembedding ``(d_model, vocab)``, ``decode`` token id -> text.
    """
    feats = read_rows(
        driver, Q.FEATURES_OF_TSET, {"tset": tset_hash}, database=database, what="listing features"
    )
    by_layer: dict[int, list[tuple[str, int]]] = {}
    for f in feats:
        by_layer.setdefault(int(f["layer"]), []).append((f["fid"], int(f["index"])))
    rows: list[dict[str, Any]] = []
    for layer, items in sorted(by_layer.items()):
        if layer >= len(w_dec):
            log.warning("no decoder for layer %d; skipping %d features", layer, len(items))
            continue
        idx = torch.tensor([i for _, i in items], dtype=torch.long)
        lens = logit_lens(w_dec[layer][idx], w_u, k=k, norm_weight=norm_weight)
        for j, (fid, _) in enumerate(items):
            rows.append(
                {
                    "fid": fid,
                    "top_tokens": [decode(int(t)) for t in lens.top_ids[j].tolist()],
                    "top_values": [float(v) for v in lens.top_values[j].tolist()],
                    "bottom_tokens": [decode(int(t)) for t in lens.bottom_ids[j].tolist()],
                    "bottom_values": [float(v) for v in lens.bottom_values[j].tolist()],
                }
            )
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        write_rows(
            driver, Q.SET_FEATURE_LENS, {"rows": batch}, database=database, what="logit lens"
        )
    log.info("logit lens stored for %d features of %s", len(rows), tset_hash)
    return len(rows)


def label_features(
    driver: neo4j.Driver,
    fids: Sequence[str] | None = None,
    *,
    top_k: int = 10,
    database: str | None = None,
    batch_size: int = 500,
    on_batch: Callable[[int], None] | None = None,
    source: LabelSource | None = None,
) -> int:
    """Top activations (from the ingested prompts) and a short label for each feature, from
    ``source`` (:mod:`atlas.circuits.label_sources`; default: the heuristic).

    ``fids`` None: every feature. Returns the number of features labelled.
    """
    source = source or label_source()
    if fids is None:
        fids = [
            r["fid"]
            for r in read_rows(driver, Q.ALL_FEATURE_IDS, database=database, what="features")
        ]
    done = 0
    for start in range(0, len(fids), batch_size):
        chunk = list(fids[start : start + batch_size])
        recs = read_rows(
            driver,
            Q.TOP_ACTIVATIONS,
            {"fids": chunk, "limit": top_k},
            database=database,
            what="top activations",
        )
        images = _image_activations(driver, chunk, top_k, database)
        texts = _prompt_tokens(
            driver, [t["prompt"] for r in recs for t in r["top"] or []], database
        )
        evidence = []
        for r in recs:
            top = r["top"] or []
            evidence.append(
                FeatureEvidence(
                    fid=r["fid"],
                    lens_tokens=list(r["top_tokens"] or []),
                    activating_tokens=[t["token"] or "" for t in top],
                    contexts=[context(texts.get(t["prompt"], []), int(t["pos"])) for t in top],
                    activations=[float(t["activation"] or 0.0) for t in top],
                    image_regions=[f"{t['row']},{t['col']}" for t in images.get(r["fid"], [])],
                    image_tags=[list(t.get("image_tags") or []) for t in top],
                )
            )
        labels = source.labels(evidence)
        rows = []
        for r, ev, label in zip(recs, evidence, labels, strict=True):
            top = r["top"] or []
            tokens = ev.activating_tokens
            rows.append(
                {
                    "fid": r["fid"],
                    "label": label,
                    "tokens": tokens,
                    "values": [float(t["activation"] or 0.0) for t in top],
                    "prompts": [f"{t['prompt']}:{t['pos']}" for t in top],
                }
            )
        write_rows(
            driver, Q.SET_FEATURE_LABELS, {"rows": rows}, database=database, what="feature labels"
        )
        done += len(rows)
        if on_batch is not None:
            on_batch(len(rows))
    return done


def _prompt_tokens(
    driver: neo4j.Driver, prompt_ids: Sequence[str], database: str | None
) -> dict[str, list[str]]:
    """The decoded tokens of these prompts by id (for the contexts of top activations)."""
    if not prompt_ids:
        return {}
    rows = read_rows(
        driver,
        Q.PROMPT_TOKENS,
        {"ids": sorted(set(prompt_ids))},
        database=database,
        what="prompt tokens",
    )
    return {r["id"]: list(r["tokens"] or []) for r in rows}


def _image_activations(
    driver: neo4j.Driver, fids: Sequence[str], top_k: int, database: str | None
) -> dict[str, list[dict[str, Any]]]:
    """Each feature's strongest activations at image soft tokens (written on the feature as
    ``top_image_regions`` / ``_values`` / ``_prompts``); features never seen on an image get
    none."""
    recs = read_rows(
        driver,
        Q.TOP_IMAGE_ACTIVATIONS,
        {"fids": list(fids), "limit": top_k},
        database=database,
        what="top image activations",
    )
    found = {r["fid"]: r["top"] for r in recs if r["top"]}
    rows = [
        {
            "fid": fid,
            "regions": [f"{(t['image'] or '')[:12]}@{t['row']},{t['col']}" for t in top],
            "values": [float(t["activation"] or 0.0) for t in top],
            "prompts": [f"{t['prompt']}:{t['pos']}" for t in top],
        }
        for fid, top in found.items()
    ]
    if rows:
        write_rows(
            driver,
            Q.SET_FEATURE_IMAGE_LABELS,
            {"rows": rows},
            database=database,
            what="feature image labels",
        )
    return found
