"""The replacement context: one real forward pass, one frozen forward pass, batched backwards.

:func:`precompute` runs the model once (no grad) and reads, per layer, the transcoder input and
the MLP's residual contribution; from them it derives the active features, their activations,
the error vectors and the token vectors.

:class:`ReplacementContext` then runs the *frozen* model once (batch 1): attention patterns and
norm scales detached (:func:`atlas.models.frozen`), every MLP output replaced by
``skip + detach(mlp_out - skip)`` plus a zero "delta" leaf per layer, and a zero delta leaf where
the embedding nodes enter the residual stream (:func:`atlas.models.embedding_point`). The
residual stream is then linear in the deltas, and the gradient of a target with respect to a
delta is the target's direct-effect read-out at that layer. :meth:`ReplacementContext.rows`
injects one target per cotangent of a batched backward (an encoder row at a feature's
layer/position, or a demeaned unembedding row at the last position) and contracts the gradients
with the source vectors:

* feature sources per layer, grouped by position into a padded ``(n_pos, c_max, d_model)`` block,
  contracted with one batched matmul over positions (no gather of ``batch x n_active x d_model``),
  restricted to the positions the batch's targets depend on (:meth:`ModelInputs.prefix_for`:
  up to the last target position under causal attention);
* autograd only traverses the layers below the deepest target layer of the batch;
* error and token sources: one ``einsum`` each.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass
from typing import Any

import torch

from atlas.errors import AttributionError, OutOfMemory
from atlas.models.freezing import frozen
from atlas.models.hooks import embedding_point, layer_hooks
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel
from atlas.transcoders.loading import TranscoderSet

log = logging.getLogger(__name__)


@dataclass
class Precomputed:
    """Everything the real forward pass yields (shapes with ``P = n_pos``, ``D = d_model``).

    inputs          ModelInputs       what the model was run on (ids, images, attention switch)
    token_vectors   (P, D)            embedding nodes' vectors as the residual stream sees them
    mlp_in          (L, P, D)         transcoder inputs
    mlp_out         (L, P, D)         MLP residual contributions
    errors          (L, P, D)         mlp_out - reconstruction (zeroed at the ignored positions)
    logits          (V,)              final logits at the last position (after any softcap)
    active          (F, 3)            int64 [layer, pos, feature], sorted
    values          (F,)              activations of the active features
    """

    inputs: ModelInputs
    token_vectors: torch.Tensor
    mlp_in: torch.Tensor
    mlp_out: torch.Tensor
    errors: torch.Tensor
    logits: torch.Tensor
    active: torch.Tensor
    values: torch.Tensor

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs.input_ids


def zero_positions(model: LoadedModel, inputs: ModelInputs | None = None) -> int:
    """How many leading positions have their features and errors zeroed (gemma-3-it: 4).

    circuit-tracer zeroes positions 0-3 of text gemma-3-it; the VLM paper's code zeroes only
    position 0 (BOS) of an image prompt (position 3 is already the first image soft token), and
    so does an image prompt here. A text prompt follows the text rule on any model, so a
    vision-language model without an image gives its language model's text graph.
    """
    if inputs is not None and inputs.n_image_tokens:
        return 1
    name = model.info.name.lower()
    return 4 if ("gemma-3" in name and name.rstrip("/").endswith("-it")) else 1


def _forward_kwargs(hf: Any) -> dict[str, Any]:
    params = inspect.signature(hf.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


@torch.no_grad()
def precompute(model: LoadedModel, tset: TranscoderSet, inputs: ModelInputs) -> Precomputed:
    """Run the real model once and derive features, errors and token vectors."""
    hf = model.hf
    n_layers = model.n_layers
    store: dict[Any, torch.Tensor] = {}
    handles = []

    def save(key: Any, transform: Any = None) -> Any:
        def keep(value: torch.Tensor) -> None:
            val = value[0].detach()
            store[key] = transform(val) if transform is not None else val

        return keep

    handles.append(embedding_point(model).capture(save("emb")))
    for layer, hooks in enumerate(layer_hooks(model, tset)):
        handles.append(hooks.feature_input.capture(save(("in", layer), hooks.to_input)))
        handles.append(hooks.feature_output.capture(save(("out", layer))))
    try:
        out = hf(**inputs.forward_kwargs(model.device), use_cache=False, **_forward_kwargs(hf))
    except torch.OutOfMemoryError as exc:
        raise OutOfMemory(f"out of memory in the forward pass: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    logits = out.logits[0, -1].float()
    mlp_in = torch.stack([store[("in", i)] for i in range(n_layers)])
    mlp_out = torch.stack([store[("out", i)] for i in range(n_layers)])
    n_zero = zero_positions(model, inputs)

    acts = []
    for layer in range(n_layers):
        a = tset.encode(layer, mlp_in[layer])
        a[:n_zero] = 0
        acts.append(a)
    recon = tset.reconstruct(acts, list(mlp_in))
    errors = (mlp_out.to(recon[0].dtype) - torch.stack(recon)).to(mlp_out.dtype)
    errors[:, :n_zero] = 0
    active_list, values_list = [], []
    for layer, a in enumerate(acts):
        nz = torch.nonzero(a, as_tuple=False)  # row-major: sorted by pos, then feature
        active_list.append(
            torch.cat([torch.full((nz.shape[0], 1), layer, device=nz.device), nz], dim=1)
        )
        values_list.append(a[nz[:, 0], nz[:, 1]])
    return Precomputed(
        inputs=inputs.cpu(),
        token_vectors=store["emb"],
        mlp_in=mlp_in,
        mlp_out=mlp_out,
        errors=errors,
        logits=logits,
        active=torch.cat(active_list).to(torch.long),
        values=torch.cat(values_list),
    )


@dataclass
class _SourceBlock:
    """Feature sources of one (source layer, write layer) pair, padded per position."""

    write_layer: int
    vectors: torch.Tensor  # (P, c_max, D), zero padded
    flat: torch.Tensor  # (n,) index of each feature in the flattened (P * c_max) grid
    cols: torch.Tensor  # (n,) its column; both sorted by position
    upto: torch.Tensor  # (P + 1,) number of features at positions < p
    c_max: int


def build_blocks(
    model: LoadedModel, tset: TranscoderSet, pre: Precomputed
) -> list[list[_SourceBlock]]:
    """``blocks[w]``: feature-source blocks that write into layer ``w``'s MLP output."""
    n_pos, n_layers = int(pre.input_ids.shape[0]), model.n_layers
    blocks: list[list[_SourceBlock]] = [[] for _ in range(n_layers)]
    layers = pre.active[:, 0]
    device = pre.values.device
    for src in range(n_layers):
        idx = torch.nonzero(layers == src).flatten()
        if idx.numel() == 0:
            continue
        pos = pre.active[idx, 1]
        feat = pre.active[idx, 2]
        counts = torch.bincount(pos, minlength=n_pos)
        c_max = int(counts.max())
        # slot of each feature within its position (features are sorted by pos)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(idx.numel(), device=device) - starts[pos]
        flat = pos * c_max + slot
        upto = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.cumsum(counts, 0)])
        vals = pre.values[idx][:, None]
        targets = range(src, n_layers) if tset.is_clt else [src]
        for write in targets:
            dec = tset.w_dec[src][feat, write - src] if tset.is_clt else tset.w_dec[src][feat]
            vec = torch.zeros(n_pos, c_max, dec.shape[-1], dtype=dec.dtype, device=device)
            vec[pos, slot] = dec * vals
            blocks[write].append(_SourceBlock(write, vec, flat, idx, upto.cpu(), c_max))
    return blocks


def _zeros_like_input(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """Stand-in MLP forward in the frozen pass: its output is replaced by the clean value."""
    return torch.zeros_like(x)


class ReplacementContext:
    """One frozen forward pass of the prompt, kept for many batched backward passes.

    The forward runs once (batch 1); each backward carries up to ``batch`` cotangents at once
    (``is_grads_batched``), one per target. Use as a context manager (it holds the frozen model
    state)::

        with ReplacementContext(model, tset, pre, batch=64) as ctx:
            rows = ctx.rows(layers, positions, vectors)   # (b, n_feat + L*P + P)

    ``prefix`` runs only the first positions; every target must depend on no later position
    (see :meth:`ModelInputs.prefix_for`).
    """

    def __init__(
        self,
        model: LoadedModel,
        tset: TranscoderSet,
        pre: Precomputed,
        *,
        batch: int,
        prefix: int | None = None,
        blocks: list[list[_SourceBlock]] | None = None,
    ) -> None:
        self.model, self.tset, self.pre, self.batch = model, tset, pre, batch
        self.n_layers = model.n_layers
        self.n_pos = int(pre.input_ids.shape[0])
        self.prefix = prefix or self.n_pos
        """Positions this context runs (targets must depend on none after it)."""
        self.n_feat = int(pre.active.shape[0])
        self.n_cols = self.n_feat + (self.n_layers + 1) * self.n_pos
        self.blocks = blocks if blocks is not None else build_blocks(model, tset, pre)
        self._frozen: Any = None
        self.final: torch.Tensor | None = None

    # ------------------------------------------------------------------ frozen forward
    def __enter__(self) -> ReplacementContext:
        model, tset = self.model, self.tset
        hf, adapter = model.hf, model.adapter
        b = 1  # one forward; the batch lives in the cotangents
        p, d = self.prefix, model.d_model
        dev, dt = model.device, model.dtype
        self.delta_emb = torch.zeros(b, p, d, device=dev, dtype=dt, requires_grad=True)
        self.deltas = [
            torch.zeros(b, p, d, device=dev, dtype=dt, requires_grad=True)
            for _ in range(self.n_layers)
        ]
        self.targets_in: list[torch.Tensor | None] = [None] * self.n_layers
        self._patched_mlps: list[Any] = []
        handles: list[Any] = []

        def add_delta_emb(value: torch.Tensor) -> torch.Tensor:
            return value + self.delta_emb

        handles.append(embedding_point(model).replace(add_delta_emb))
        for layer, hooks in enumerate(layer_hooks(model, tset)):

            def keep_input(
                value: torch.Tensor, layer: int = layer, to_input: Any = hooks.to_input
            ) -> None:
                self.targets_in[layer] = to_input(value)

            def pin_output(value: torch.Tensor, layer: int = layer) -> torch.Tensor:
                # the MLP output is pinned to its clean value (the MLP itself is not even run)
                new = self.pre.mlp_out[layer, :p].to(value.dtype) + self.deltas[layer]
                if tset.has_skip:
                    x = self.targets_in[layer]
                    assert x is not None
                    s = tset.skip(layer, x).to(value.dtype)
                    new = new + (s - s.detach())
                return new

            handles.append(hooks.feature_input.capture(keep_input))
            handles.append(hooks.feature_output.replace(pin_output))

        for block in adapter.layers(hf):
            mlp = getattr(block, adapter.mlp_attr)
            mlp.forward = _zeros_like_input
            self._patched_mlps.append(mlp)
        self._frozen = frozen(model)
        self._frozen.__enter__()
        try:
            kwargs = self.pre.inputs.forward_kwargs(dev, p)
            with torch.enable_grad():
                self.final = adapter.final_hidden(hf, kwargs)
        except torch.OutOfMemoryError as exc:
            self.__exit__(None, None, None)
            raise OutOfMemory(
                f"out of memory in the frozen forward pass (batch {b}); lower the batch size"
            ) from exc
        finally:
            for h in handles:
                h.remove()
            for mlp in self._patched_mlps:
                del mlp.forward
            self._patched_mlps = []
        return self

    def __exit__(self, *exc: object) -> None:
        if self._frozen is not None:
            self._frozen.__exit__(None, None, None)
            self._frozen = None
        self.final = None
        self.targets_in = [None] * self.n_layers

    # ------------------------------------------------------------------ backward
    def rows(
        self, layers: torch.Tensor, positions: torch.Tensor, vectors: torch.Tensor
    ) -> torch.Tensor:
        """Direct effects of every source on ``len(layers) <= batch`` targets.

        ``layers[i] == n_layers`` means a logit target (``vectors[i]`` a demeaned unembedding
        row, read at the final residual, ``positions[i]`` the last position); otherwise the
        target is the pre-activation ``vectors[i] . x`` of the transcoder input at
        ``(layers[i], positions[i])``. Returns float32 ``(len(layers), n_cols)`` with columns
        ``[features | errors (layer-major) | tokens]``.
        """
        n = int(layers.shape[0])
        if n > self.batch or n == 0:
            raise AttributionError(f"batch of {n} targets for a context of {self.batch}")
        if int(positions.max()) >= self.prefix:
            raise AttributionError("target position outside this context's prefix")
        n_layers, n_pos = self.n_layers, self.n_pos
        layers_l = layers.tolist()
        positions_l = positions.tolist()
        vectors = vectors.to(self.model.device, self.model.dtype)
        outputs, grads_out = [], []
        for lay in sorted(set(layers_l)):
            sel = [i for i, x in enumerate(layers_l) if x == lay]
            tensor = self.final if lay == n_layers else self.targets_in[lay]
            assert tensor is not None
            pos_sel = [positions_l[i] for i in sel]
            g = tensor.new_zeros((n, *tensor.shape))  # one cotangent per target
            g[sel, 0, pos_sel] = vectors[sel].to(g.dtype)
            outputs.append(tensor)
            grads_out.append(g)
        top = max(layers_l)
        inputs = [self.delta_emb, *self.deltas[:top]]
        grads = torch.autograd.grad(
            outputs,
            inputs,
            grads_out,
            retain_graph=True,
            allow_unused=True,
            is_grads_batched=True,
        )
        grads = tuple(None if g is None else g[:, 0] for g in grads)
        p_max = self.pre.inputs.prefix_for(max(positions_l))
        out = torch.zeros(n, self.n_cols, dtype=torch.float32, device=self.model.device)
        g_emb = grads[0]
        if g_emb is not None:
            tok = torch.einsum("bpd,pd->bp", g_emb[:n, :p_max], self.pre.token_vectors[:p_max])
            start = self.n_feat + n_layers * n_pos
            out[:, start : start + p_max] = tok.float()
        for w, g in enumerate(grads[1:]):
            if g is None:
                continue
            g = g[:n, :p_max]
            err = torch.einsum("bpd,pd->bp", g, self.pre.errors[w, :p_max])
            start = self.n_feat + w * n_pos
            out[:, start : start + p_max] = err.float()
            gt = g.transpose(0, 1)  # (p, b, d)
            for blk in self.blocks[w]:
                m = int(blk.upto[p_max])
                if m == 0:
                    continue
                vals = torch.bmm(gt, blk.vectors[:p_max].transpose(1, 2))  # (p, b, c)
                vals = vals.transpose(0, 1).reshape(n, p_max * blk.c_max)
                contrib = vals.index_select(1, blk.flat[:m]).float()  # (b, m)
                out.index_add_(1, blk.cols[:m], contrib)
        return out
