"""The perturbation self-check: in the frozen replacement model, adding a source's vector moves
every target by exactly its adjacency entry.

The check model here is built independently of the engine's mechanism: instead of detaching
(which only changes gradients), it *replays* the clean run's attention patterns and norm scales
as constants (:func:`atlas.models.freezing.replayed`) and pins every MLP output to its clean
value (+ the live skip term), in float64.
Sources are perturbed by adding their full vector (the model is linear, so eps = 1 is exact):
a feature's ``a * W_dec[f]`` (= doubling its activation; a CLT feature writes into every later
layer), an error vector, a token's embedding output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from atlas.attribution import AttributionResult, attribute
from atlas.attribution.context import precompute
from atlas.models import LoadedModel, ModelInputs, load_model
from atlas.models.freezing import PatternReplay, replayed
from atlas.models.hooks import embedding_point, layer_hooks
from atlas.testing.tiny import build_tiny_model, build_tiny_transcoders
from atlas.transcoders import TranscoderSet, load_transcoders
from tests.helpers import FAMILY_CASES

PROMPT = "The cat sat on the mat"


class CheckModel:
    """Frozen replacement model with additive perturbation points, in float64."""

    def __init__(self, model_dir: Path, tc_dir: Path) -> None:
        self.model: LoadedModel = load_model(model_dir, dtype=torch.float64)
        self.tset: TranscoderSet = load_transcoders(tc_dir, self.model, dtype=torch.float64)
        self.replay = PatternReplay()

    def run(
        self,
        ids: torch.Tensor,
        mlp_clean: list[torch.Tensor] | None,
        in_clean: list[torch.Tensor] | None,
        add_emb: torch.Tensor | None = None,
        add_mlp: dict[int, torch.Tensor] | None = None,
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
        """Returns (transcoder inputs, mlp outputs, final hidden) per layer (P, D)."""
        model, tset = self.model, self.tset
        adapter, hf = model.adapter, model.hf
        ins: dict[int, torch.Tensor] = {}
        outs: dict[int, torch.Tensor] = {}
        handles = []

        def emb_hook(value: torch.Tensor) -> torch.Tensor:
            return value + add_emb if add_emb is not None else value

        handles.append(embedding_point(model).replace(emb_hook))
        for layer, hooks in enumerate(layer_hooks(model, tset)):

            def in_hook(value: torch.Tensor, layer: int = layer, to_input=hooks.to_input) -> None:
                ins[layer] = to_input(value[0])

            def out_hook(value: torch.Tensor, layer: int = layer) -> torch.Tensor:
                if mlp_clean is None:
                    outs[layer] = value[0]
                    return value
                new = mlp_clean[layer].clone()
                if tset.has_skip:
                    assert in_clean is not None
                    new = new + tset.skip(layer, ins[layer]) - tset.skip(layer, in_clean[layer])
                if add_mlp and layer in add_mlp:
                    new = new + add_mlp[layer]
                outs[layer] = new
                return new[None]

            handles.append(hooks.feature_input.capture(in_hook))
            handles.append(hooks.feature_output.replace(out_hook))
        try:
            with torch.no_grad(), replayed(model, self.replay):
                final = adapter.base(hf)(input_ids=ids[None], use_cache=False).last_hidden_state
        finally:
            for h in handles:
                h.remove()
        n = model.n_layers
        return [ins[i] for i in range(n)], [outs[i] for i in range(n)], final[0]


def _targets(
    check: CheckModel, res: AttributionResult, ins: list[torch.Tensor], final: torch.Tensor
) -> torch.Tensor:
    """Value of every target row (selected features' pre-activations, demeaned logits)."""
    tset = check.tset
    feats = res.active_features[res.selected_features]
    vals = [float(tset.w_enc[lay][f] @ ins[lay][p]) for lay, p, f in feats.tolist()]
    unembed = check.model.adapter.unembed_weight(check.model.hf).detach()
    demeaned = unembed[res.logit_tokens] - unembed.mean(0, keepdim=True)
    logit_vals = demeaned @ final[-1]
    return torch.cat([torch.tensor(vals, dtype=torch.float64), logit_vals])


def _check_graph(
    model_dir: Path, tc_dir: Path, res: AttributionResult, n_sources: int = 6, seed: int = 0
) -> None:
    check = CheckModel(model_dir, tc_dir)
    ids = res.input_ids
    check.replay.record()
    in_clean, mlp_clean, _ = check.run(ids, None, None)
    check.replay.replay()
    try:
        ins0, _, final0 = check.run(ids, mlp_clean, in_clean)
        # sanity: with nothing added, the replayed model reproduces the clean run
        for a, b in zip(ins0, in_clean, strict=True):
            torch.testing.assert_close(a, b)
        base = _targets(check, res, ins0, final0)
        pre = precompute(check.model, check.tset, ModelInputs(ids))
        n_feat, n_pos, n_layers = res.n_features, res.n_pos, res.n_layers
        adj = res.adjacency.double()
        rows = torch.cat(
            [torch.arange(n_feat), torch.arange(res.n_nodes - res.n_logits, res.n_nodes)]
        )
        gen = torch.Generator().manual_seed(seed)
        sources = []
        # features: prefer low layers (they have the most targets)
        low = torch.nonzero(
            res.active_features[res.selected_features][:, 0] < n_layers - 1
        ).flatten()
        pick = low[torch.randperm(low.numel(), generator=gen)[:n_sources]]
        sources += [("feature", int(i)) for i in pick]
        for _ in range(n_sources // 2):
            sources.append(
                (
                    "error",
                    int(torch.randint(0, n_layers - 1, (1,), generator=gen)) * n_pos
                    + int(torch.randint(1, n_pos, (1,), generator=gen)),
                )
            )
        sources += [
            ("token", int(p)) for p in torch.randperm(n_pos, generator=gen)[: n_sources // 2]
        ]
        for kind, i in sources:
            add_emb, add_mlp = None, {}
            if kind == "feature":
                col = i
                lay, p, f = res.active_features[res.selected_features[i]].tolist()
                a = float(res.activation_values[res.selected_features[i]])
                w_dec = check.tset.w_dec[lay]
                if check.tset.is_clt:
                    for w in range(lay, n_layers):
                        v = torch.zeros(n_pos, check.model.d_model, dtype=torch.float64)
                        v[p] = a * w_dec[f, w - lay]
                        add_mlp[w] = v
                else:
                    v = torch.zeros(n_pos, check.model.d_model, dtype=torch.float64)
                    v[p] = a * w_dec[f]
                    add_mlp[lay] = v
            elif kind == "error":
                col = n_feat + i
                lay, p = divmod(i, n_pos)
                v = torch.zeros(n_pos, check.model.d_model, dtype=torch.float64)
                v[p] = pre.errors[lay, p]
                add_mlp[lay] = v
            else:
                col = n_feat + n_layers * n_pos + i
                add_emb = torch.zeros(n_pos, check.model.d_model, dtype=torch.float64)
                add_emb[i] = pre.token_vectors[i]
            ins1, _, final1 = check.run(ids, mlp_clean, in_clean, add_emb, add_mlp or None)
            delta = _targets(check, res, ins1, final1) - base
            expected = adj[rows, col]
            scale = 1.0 + float(expected.abs().max())
            torch.testing.assert_close(
                delta,
                expected,
                atol=1e-4 * scale,
                rtol=1e-4,
                msg=lambda m, k=kind, c=col: f"{k} source col {c}: {m}",
            )
            # the source must matter somewhere, or the test proves nothing
            if kind != "error":
                assert float(delta.abs().max()) > 0 or float(expected.abs().max()) == 0
    finally:
        check.replay.record()


CASES = FAMILY_CASES


@pytest.mark.parametrize(("family", "kind", "skip"), CASES)
def test_perturbation_matches_adjacency(tmp_path: Path, family: str, kind: str, skip: bool) -> None:
    model_dir = build_tiny_model(family, tmp_path / "m", n_layers=3, n_kv_heads=2)
    tc_dir = build_tiny_transcoders(
        model_dir, tmp_path / "t", kind=kind, skip=skip, d_transcoder=128
    )
    model = load_model(model_dir)
    tset = load_transcoders(tc_dir, model)
    res = attribute(PROMPT, model, tset, batch_size=16)
    assert res.n_features > 10
    assert not torch.isnan(res.adjacency).any()
    _check_graph(model_dir, tc_dir, res)


def test_perturbation_resid_mid_input(tmp_path: Path) -> None:
    """Transcoders reading resid_mid (before the pre-MLP norm) instead of the norm output."""
    model_dir = build_tiny_model("llama", tmp_path / "m", n_layers=3)
    tc_dir = build_tiny_transcoders(model_dir, tmp_path / "t", kind="relu", skip=True)
    cfg = yaml.safe_load((tc_dir / "config.yaml").read_text())
    cfg["feature_input_hook"] = "hook_resid_mid"
    (tc_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    model = load_model(model_dir)
    res = attribute(PROMPT, model, load_transcoders(tc_dir, model), batch_size=8)
    assert res.n_features > 0
    _check_graph(model_dir, tc_dir, res, n_sources=4)


def test_perturbation_with_max_feature_nodes(tmp_path: Path) -> None:
    model_dir = build_tiny_model("gemma2", tmp_path / "m", n_layers=3)
    tc_dir = build_tiny_transcoders(model_dir, tmp_path / "t", d_transcoder=128)
    model = load_model(model_dir)
    tset = load_transcoders(tc_dir, model)
    full = attribute(PROMPT, model, tset, batch_size=8)
    part = attribute(PROMPT, model, tset, batch_size=8, max_feature_nodes=24)
    assert part.n_features == 24
    # selected rows equal the full graph's rows restricted to the selected columns
    sel = part.selected_features
    cols = torch.cat([sel, torch.arange(full.n_features, full.n_nodes)])
    rows_full = full.adjacency[sel][:, cols]
    torch.testing.assert_close(part.adjacency[:24], rows_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        part.adjacency[-part.n_logits :],
        full.adjacency[-full.n_logits :][:, cols],
        atol=1e-5,
        rtol=1e-5,
    )
    _check_graph(model_dir, tc_dir, part, n_sources=4)
