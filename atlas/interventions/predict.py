"""What a graph predicts for an intervention, what the model does, and how well they agree.

Predictions, from an attribution graph's dense adjacency ``A`` (rows = targets, columns = sources,
the layout of :class:`atlas.attribution.AttributionResult`):

* direct effect: ``A[:, s] @ (delta / a_s)`` for the changes ``delta`` of the intervened features'
  activations ``a_s`` (an edge is the effect of the source's whole vector ``a_s W_dec``). It is exact when every layer is constrained (attention, norms and MLPs frozen:
  the local replacement model), and it is what the graph claims edge by edge.
* graph influence: ``B = (I - Â)^-1 - I`` with ``Â = |A|`` row-normalised (circuit-tracer's
  pruning normalisation, :func:`atlas.attribution.pruning.row_sums`): the unsigned multi-hop
  influence of every source on every target; the logit influence of a node is ``w B`` with ``w``
  the logit probabilities (:func:`atlas.attribution.pruning.compute_influence`).

Measured effects of an :class:`~atlas.interventions.core.InterventionResult`: the change of every
feature node's activation (pre-activations when the run did not apply the activation function)
and of the demeaned logit of each logit target (``h . (W_U[t] - mean_v W_U[v])`` on the
unembedding's input, before any softcap: the quantity the graph's logit rows attribute).

:func:`faithfulness` is Anthropic's validation: ablate each top-influence feature in turn under
constrained patching over ``[layer, layer + 2]`` with frozen attention, then the Spearman
correlation between ``B[t, s]`` and the measured ``|delta a_t| / a_t`` over downstream active
feature nodes, and the Pearson correlation of ``log`` logit influence against ``log`` ablation KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atlas.attribution.pruning import compute_influence, row_sums
from atlas.attribution.result import AttributionResult
from atlas.errors import InputError
from atlas.interventions.core import (
    FeatureEdit,
    InterventionResult,
    clean_run,
    feature_intervention,
)
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel
from atlas.transcoders.loading import TranscoderSet

Change = tuple[int, int, int, float]
"""``(layer, pos, feature, delta a)``: a feature node's change of activation."""


def feature_nodes(result: AttributionResult) -> dict[tuple[int, int, int], int]:
    """``(layer, pos, feature)`` -> its node index (= adjacency column) in the graph."""
    feats = result.active_features[result.selected_features].tolist()
    return {(lay, p, f): i for i, (lay, p, f) in enumerate(feats)}


def _node(result: AttributionResult, index: dict, layer: int, pos: int, feature: int) -> int:
    key = (layer, pos % result.n_pos, feature)
    if key not in index:
        raise InputError(f"feature {layer}:{pos}:{feature} is not a node of the graph")
    return int(index[key])


def direct_effect(result: AttributionResult, changes: Sequence[Change]) -> Tensor:
    """``A[:, s] @ (delta / a_s)``: the graph's direct-effect prediction for every node, ``(N,)``.

    An edge is the effect of its source's whole vector ``a_s * W_dec``, so a change ``delta`` of
    the activation moves the targets by ``A[t, s] * delta / a_s`` (doubling: ``A[t, s]``)."""
    index = feature_nodes(result)
    cols = torch.tensor([_node(result, index, lay, p, f) for lay, p, f, _ in changes])
    acts = result.activation_values[result.selected_features].double().cpu()[cols]
    delta = torch.tensor([float(d) for *_, d in changes], dtype=torch.float64) / acts
    adj = result.adjacency
    return (adj[:, cols.to(adj.device)].double().cpu() @ delta).float()


def graph_influence(adjacency: Tensor) -> Tensor:
    """``B = (I - Â)^-1 - I`` (unsigned, rows = targets), ``Â`` = row-normalised ``|A|``."""
    rs = row_sums(adjacency)
    inv = torch.where(rs > 0, 1.0 / rs.clamp_min(1e-30), torch.zeros_like(rs))
    a_hat = adjacency.abs().double() * inv.double()[:, None]
    eye = torch.eye(a_hat.shape[0], dtype=torch.float64, device=a_hat.device)
    return (torch.linalg.solve(eye - a_hat, eye) - eye).float()


def logit_influence(result: AttributionResult) -> Tensor:
    """Every node's influence on the logits, ``w B`` (``(N,)``, circuit-tracer's)."""
    influence, _ = compute_influence(result.adjacency, result.logit_weights())
    return influence


def demeaned_logits(model: LoadedModel, hidden: Tensor, tokens: Tensor) -> Tensor:
    """``h . (W_U[t] - mean_v W_U[v])`` of the last position for each target token."""
    unembed = model.adapter.unembed_weight(model.hf).detach().double()
    directions = unembed[tokens.to(unembed.device)] - unembed.mean(0, keepdim=True)
    return (directions @ hidden[-1].double().to(unembed.device)).float().cpu()


def measured_effect(
    model: LoadedModel, result: AttributionResult, run: InterventionResult
) -> Tensor:
    """Measured change of every target row of the graph: feature nodes' activations, then the
    demeaned logits, ``(n_features + n_logits,)``."""
    feats = result.active_features[result.selected_features].cpu()
    lay, pos, f = feats[:, 0], feats[:, 1], feats[:, 2]
    delta = run.activations.cpu() - _clean_like(run)
    feat_delta = delta[lay, pos, f]
    logit_delta = demeaned_logits(model, run.final_hidden, result.logit_tokens) - demeaned_logits(
        model, run.base_final_hidden, result.logit_tokens
    )
    return torch.cat([feat_delta.float(), logit_delta])


def _clean_like(run: InterventionResult) -> Tensor:
    """The clean counterpart of ``run.activations`` (pre-activations when those are shown)."""
    base = run.clean_pre_activations
    return (base if base is not None else run.clean_activations).cpu()


def target_rows(result: AttributionResult) -> Tensor:
    """The adjacency rows :func:`measured_effect` measures (feature nodes, then logits)."""
    n = result.n_nodes
    return torch.cat([torch.arange(result.n_features), torch.arange(n - result.n_logits, n)])


def activation_fractions(
    run: InterventionResult, features: Sequence[tuple[int, int, int]]
) -> Tensor:
    """Each feature's steered activation as a fraction of its clean one (NaN when inactive)."""
    now = torch.tensor([float(run.activations[lay, p, f]) for lay, p, f in features])
    base = torch.tensor([float(run.clean_activations[lay, p, f]) for lay, p, f in features])
    return torch.where(base != 0, now / base, torch.full_like(base, float("nan")))


# ---------------------------------------------------------------------- correlations
def _ranks(x: Tensor) -> Tensor:
    """Ranks 1..n with ties given their average rank."""
    order = torch.argsort(x)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks[order] = torch.arange(1, x.numel() + 1, dtype=torch.float64)
    values, inverse = torch.unique(x, return_inverse=True)
    sums = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(values.numel(), dtype=torch.float64).index_add_(
        0, inverse, torch.ones_like(ranks)
    )
    return (sums / counts)[inverse]


def pearson(x: Tensor, y: Tensor) -> float:
    """Pearson correlation (NaN with fewer than 3 points or no spread)."""
    if x.numel() < 3:
        return float("nan")
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denom = float(x.norm() * y.norm())
    return float(x @ y) / denom if denom > 0 else float("nan")


def spearman(x: Tensor, y: Tensor) -> float:
    """Spearman rank correlation (Pearson on average ranks)."""
    return pearson(_ranks(x.double()), _ranks(y.double()))


@dataclass
class FaithfulnessReport:
    """Anthropic's graph validation on one prompt.

    sources          the ablated feature nodes ``(layer, pos, feature)``, by logit influence
    influence        (n_pairs,) graph influence ``B[t, s]`` of each (source, downstream target)
    effect           (n_pairs,) measured ``|a_t(ablated) - a_t| / a_t``
    logit_influence  (n_sources,) each source's influence on the logits
    kl               (n_sources,) KL(ablated || clean) of each ablation
    spearman         rank correlation of ``influence`` and ``effect``
    log_log_pearson  Pearson of log logit influence and log KL (pairs with both > 0)
    """

    sources: list[tuple[int, int, int]]
    influence: Tensor
    effect: Tensor
    logit_influence: Tensor
    kl: Tensor
    spearman: float
    log_log_pearson: float


def faithfulness(
    model: LoadedModel,
    tset: TranscoderSet,
    inputs: ModelInputs,
    result: AttributionResult,
    *,
    n_sources: int = 10,
    span: int = 2,
) -> FaithfulnessReport:
    """Ablate each of the ``n_sources`` feature nodes of highest logit influence (below the top
    layer) in turn, constrained over ``[layer, layer + span]`` (see the module docstring)."""
    if inputs.n_pos != result.n_pos or not torch.equal(inputs.input_ids.cpu(), result.input_ids):
        raise InputError("the graph was computed on another prompt")
    clean = clean_run(model, tset, inputs)
    b = graph_influence(result.adjacency).cpu()
    li = logit_influence(result).cpu()
    feats = result.active_features[result.selected_features].cpu()
    n_feat, top = result.n_features, model.n_layers - 1
    candidates = [i for i in range(n_feat) if int(feats[i, 0]) < top]
    candidates.sort(key=lambda i: -float(li[i]))
    chosen = candidates[:n_sources]
    xs, ys, kls = [], [], []
    acts_c = clean.activations.cpu()
    for s in chosen:
        lay, pos, f = (int(v) for v in feats[s])
        rng = range(lay, min(lay + span, top) + 1)
        run = feature_intervention(
            model, tset, inputs, [FeatureEdit(lay, pos, f, "ablate")], constrained=rng, clean=clean
        )
        kls.append(run.kl())
        acts = run.activations.cpu()
        for t in range(n_feat):
            tl, tp, tf = (int(v) for v in feats[t])
            a = float(acts_c[tl, tp, tf])
            if tl <= lay or a <= 0:
                continue
            xs.append(float(b[t, s]))
            ys.append(abs(float(acts[tl, tp, tf]) - a) / a)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    lis = li[chosen].double()
    kl = torch.tensor(kls, dtype=torch.float64)
    ok = (lis > 0) & (kl > 0)
    return FaithfulnessReport(
        sources=[tuple(int(v) for v in feats[s]) for s in chosen],  # type: ignore[misc]
        influence=x,
        effect=y,
        logit_influence=lis,
        kl=kl,
        spearman=spearman(x, y) if x.numel() else float("nan"),
        log_log_pearson=pearson(lis[ok].log(), kl[ok].log()),
    )
