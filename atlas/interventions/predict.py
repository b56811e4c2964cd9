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
correlation between ``B[t, s]`` and the measured ``|delta a_t| / a_t`` over the active feature
nodes the source can reach (a later layer, and a position that sees the source's: causal, or
inside the same bidirectional image block), and the Pearson correlation of ``log`` logit influence against ``log`` ablation KL.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atlas.attribution.pruning import compute_influence, row_sums
from atlas.attribution.result import AttributionResult
from atlas.errors import InputError
from atlas.graph import Graph, NodeKind
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


@dataclass(frozen=True)
class GraphView:
    """What predictions read from a graph, from an :class:`AttributionResult` or a (possibly
    pruned) :class:`atlas.graph.Graph` (``N`` nodes, ``F`` feature nodes, ``k`` logits).

    adjacency      (N, N) float32  rows = targets, columns = sources
    feature_index  (F,) int64      node index of each feature node
    features       (F, 3) int64    their ``[layer, pos, feature]``
    activations    (F,) float32    their activations
    logit_index    (k,) int64      node index of each logit target
    logit_tokens   (k,) int64      their token ids
    logit_probs    (k,) float32    their probabilities
    input_ids      (P,) int64      the prompt's tokens
    """

    adjacency: Tensor
    feature_index: Tensor
    features: Tensor
    activations: Tensor
    logit_index: Tensor
    logit_tokens: Tensor
    logit_probs: Tensor
    input_ids: Tensor

    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[0])

    def logit_weights(self) -> Tensor:
        w = torch.zeros(self.adjacency.shape[0], dtype=torch.float32)
        w[self.logit_index] = self.logit_probs.float().cpu()
        return w.to(self.adjacency.device)


GraphLike = AttributionResult | Graph | GraphView


def graph_view(graph: GraphLike) -> GraphView:
    """The :class:`GraphView` of an attribution result or a graph."""
    if isinstance(graph, GraphView):
        return graph
    if isinstance(graph, AttributionResult):
        n, k, f = graph.n_nodes, graph.n_logits, graph.n_features
        return GraphView(
            adjacency=graph.adjacency,
            feature_index=torch.arange(f),
            features=graph.active_features[graph.selected_features].cpu(),
            activations=graph.activation_values[graph.selected_features].float().cpu(),
            logit_index=torch.arange(n - k, n),
            logit_tokens=graph.logit_tokens.cpu(),
            logit_probs=graph.logit_probabilities.float().cpu(),
            input_ids=graph.input_ids.cpu(),
        )
    feats = torch.nonzero(graph.kind == int(NodeKind.FEATURE)).flatten()
    logits = torch.nonzero(graph.kind == int(NodeKind.LOGIT)).flatten()
    return GraphView(
        adjacency=graph.dense_adjacency(),
        feature_index=feats,
        features=torch.stack(
            [graph.layer[feats], graph.pos[feats], graph.feature[feats]], 1
        ).long(),
        activations=graph.activation[feats],
        logit_index=logits,
        logit_tokens=graph.token_id[logits],
        logit_probs=graph.logit_prob[logits],
        input_ids=graph.input_ids,
    )


def feature_nodes(graph: GraphLike) -> dict[tuple[int, int, int], int]:
    """``(layer, pos, feature)`` -> its position among the graph's feature nodes."""
    view = graph_view(graph)
    return {(lay, p, f): i for i, (lay, p, f) in enumerate(view.features.tolist())}


def _feature_number(view: GraphView, index: dict, layer: int, pos: int, feature: int) -> int:
    key = (layer, pos % view.n_pos, feature)
    if key not in index:
        raise InputError(f"feature {layer}:{pos}:{feature} is not a node of the graph")
    return int(index[key])


def direct_effect(graph: GraphLike, changes: Sequence[Change]) -> Tensor:
    """``A[:, s] @ (delta / a_s)``: the graph's direct-effect prediction for every node, ``(N,)``.

    An edge is the effect of its source's whole vector ``a_s * W_dec``, so a change ``delta`` of
    the activation moves the targets by ``A[t, s] * delta / a_s`` (doubling: ``A[t, s]``)."""
    view = graph_view(graph)
    index = feature_nodes(view)
    nums = torch.tensor([_feature_number(view, index, lay, p, f) for lay, p, f, _ in changes])
    acts = view.activations.double()[nums]
    delta = torch.tensor([float(d) for *_, d in changes], dtype=torch.float64) / acts
    adj = view.adjacency
    cols = view.feature_index[nums].to(adj.device)
    return (adj[:, cols].double().cpu() @ delta).float()


def graph_influence(adjacency: Tensor) -> Tensor:
    """``B = (I - Â)^-1 - I`` (unsigned, rows = targets), ``Â`` = row-normalised ``|A|``."""
    rs = row_sums(adjacency)
    inv = torch.where(rs > 0, 1.0 / rs.clamp_min(1e-30), torch.zeros_like(rs))
    a_hat = adjacency.abs().double() * inv.double()[:, None]
    eye = torch.eye(a_hat.shape[0], dtype=torch.float64, device=a_hat.device)
    return (torch.linalg.solve(eye - a_hat, eye) - eye).float()


def logit_influence(graph: GraphLike) -> Tensor:
    """Every node's influence on the logits, ``w B`` (``(N,)``, circuit-tracer's)."""
    view = graph_view(graph)
    influence, _ = compute_influence(view.adjacency, view.logit_weights())
    return influence


def demeaned_logits(model: LoadedModel, hidden: Tensor, tokens: Tensor) -> Tensor:
    """``h . (W_U[t] - mean_v W_U[v])`` of the last position for each target token."""
    unembed = model.adapter.unembed_weight(model.hf).detach().double()
    directions = unembed[tokens.to(unembed.device)] - unembed.mean(0, keepdim=True)
    return (directions @ hidden[-1].double().to(unembed.device)).float().cpu()


def measured_effect(model: LoadedModel, graph: GraphLike, run: InterventionResult) -> Tensor:
    """Measured change of every target row of the graph (:func:`target_rows`): feature nodes'
    activations, then the demeaned logits, ``(F + k,)``."""
    view = graph_view(graph)
    lay, pos, f = view.features[:, 0], view.features[:, 1], view.features[:, 2]
    delta = run.activations.cpu() - _clean_like(run)
    feat_delta = delta[lay, pos, f]
    tokens = view.logit_tokens
    logit_delta = demeaned_logits(model, run.final_hidden, tokens) - demeaned_logits(
        model, run.base_final_hidden, tokens
    )
    return torch.cat([feat_delta.float(), logit_delta])


def _clean_like(run: InterventionResult) -> Tensor:
    """The clean counterpart of ``run.activations`` (pre-activations when those are shown)."""
    base = run.clean_pre_activations
    return (base if base is not None else run.clean_activations).cpu()


def target_rows(graph: GraphLike) -> Tensor:
    """The node indices :func:`measured_effect` measures (feature nodes, then logits)."""
    view = graph_view(graph)
    return torch.cat([view.feature_index, view.logit_index])


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
    graph: GraphLike,
    *,
    n_sources: int = 10,
    span: int = 2,
) -> FaithfulnessReport:
    """Ablate each of the ``n_sources`` feature nodes of highest logit influence (below the top
    layer) in turn, constrained over ``[layer, layer + span]`` (see the module docstring)."""
    view = graph_view(graph)
    if inputs.n_pos != view.n_pos or not torch.equal(inputs.input_ids.cpu(), view.input_ids):
        raise InputError("the graph was computed on another prompt")
    clean = clean_run(model, tset, inputs)
    b = graph_influence(view.adjacency).cpu()
    li = logit_influence(view).cpu()[view.feature_index]
    feats = view.features
    n_feat, top = feats.shape[0], model.n_layers - 1
    candidates = [i for i in range(n_feat) if int(feats[i, 0]) < top]
    candidates.sort(key=lambda i: -float(li[i]))
    chosen = candidates[:n_sources]
    node = view.feature_index.tolist()
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
            if tl <= lay or a <= 0 or pos >= inputs.prefix_for(tp):
                continue
            xs.append(float(b[node[t], node[s]]))
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
