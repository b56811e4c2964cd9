"""Logit lens of transcoder features: which output tokens a feature's decoder row promotes.

Pure torch (no database): ``scores = W_dec[f] @ W_U`` for every feature, then the top and bottom
``k`` vocabulary entries. Computed once per feature and stored on the ``Feature`` node by
:mod:`atlas.store.labels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from atlas.errors import InputError

if TYPE_CHECKING:
    from atlas.models.loading import LoadedModel
    from atlas.transcoders.loading import TranscoderSet


@dataclass(frozen=True)
class LensResult:
    """Top / bottom ``k`` tokens of each feature, all tensors shaped ``(n_features, k)``."""

    top_ids: torch.Tensor
    top_values: torch.Tensor
    bottom_ids: torch.Tensor
    bottom_values: torch.Tensor


def decoder_rows(w_dec: torch.Tensor) -> torch.Tensor:
    """``(n_features, d_model)`` decoder directions: a CLT's ``(d_tc, n_targets, d_model)``
    decoder is summed over its target layers (the feature's total write to the residual)."""
    if w_dec.ndim == 3:
        return w_dec.sum(dim=1)
    if w_dec.ndim != 2:
        raise InputError(f"decoder must be 2-D or 3-D, got shape {tuple(w_dec.shape)}")
    return w_dec


def logit_lens(
    w_dec: torch.Tensor,
    w_u: torch.Tensor,
    *,
    k: int = 10,
    norm_weight: torch.Tensor | None = None,
    chunk: int = 2048,
) -> LensResult:
    """Top/bottom-``k`` tokens of ``decoder_rows(w_dec) @ w_u`` per feature.

    Args:
        w_dec: ``(n_features, d_model)`` (or a CLT's ``(n_features, n_targets, d_model)``).
        w_u: unembedding ``(d_model, vocab)``.
        k: how many tokens each side.
        norm_weight: optional ``(d_model,)`` scale of the final norm, applied to the rows first.
        chunk: features per matrix product (bounds memory for wide transcoders).
    """
    rows = decoder_rows(w_dec)
    if w_u.ndim != 2 or rows.shape[1] != w_u.shape[0]:
        raise InputError(
            f"decoder rows {tuple(rows.shape)} do not match unembedding {tuple(w_u.shape)}"
        )
    k = min(k, w_u.shape[1])
    if k < 1:
        raise InputError("k must be >= 1")
    w_u = w_u.float()
    tops, topv, bots, botv = [], [], [], []
    for start in range(0, rows.shape[0], chunk):
        r = rows[start : start + chunk].float()
        if norm_weight is not None:
            r = r * norm_weight.float()
        scores = r @ w_u
        v, i = torch.topk(scores, k, dim=1)
        tops.append(i)
        topv.append(v)
        v, i = torch.topk(scores, k, dim=1, largest=False)
        bots.append(i)
        botv.append(v)
    if not tops:
        empty = torch.zeros(0, k)
        return LensResult(empty.long(), empty, empty.long(), empty)
    return LensResult(torch.cat(tops), torch.cat(topv), torch.cat(bots), torch.cat(botv))


@dataclass(frozen=True)
class LensInputs:
    """What the logit lens of one transcoder set needs: its decoders (one per layer), the
    model's unembedding ``(d_model, vocab)``, a token decoder, and the set's content hash (the
    ``Feature.tset`` the results belong to)."""

    tset_hash: str
    w_dec: list[torch.Tensor]
    w_u: torch.Tensor
    decode: Callable[[int], str]


def logit_lens_for(model: LoadedModel, transcoders: TranscoderSet) -> LensInputs:
    """The lens inputs of a loaded model and transcoder set, on whatever device and dtype they
    were loaded with (the entry point chose them from the settings)."""
    w_u = model.hf.get_output_embeddings().weight.detach().T
    tokenizer = model.tokenizer

    def decode(token_id: int) -> str:
        return str(tokenizer.decode([token_id]))

    return LensInputs(
        tset_hash=transcoders.info.content_hash,
        w_dec=[w.detach() for w in transcoders.w_dec],
        w_u=w_u,
        decode=decode,
    )
