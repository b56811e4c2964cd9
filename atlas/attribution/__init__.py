"""Attribution graphs on transformers + transcoders (no infrastructure imports).

Public API::

    attribute(prompt, model, transcoders, *, image=None, rollout=True, max_n_logits=10,
              desired_logit_prob=0.95,
              max_feature_nodes=None, batch_size=64, explicit_logit_tokens=None,
              max_seq_len=None, progress=None, memory_limit_bytes=None) -> AttributionResult
    AttributionResult.to_graph(prune=True, node_threshold=0.8, edge_threshold=0.98) -> Graph
    AttributionResult.scores() -> (replacement, completeness)
    prune(adj, logit_weights, n_tokens, n_logits, n_features, ...) -> PruneResult
    compute_influence, graph_scores, find_threshold
"""

from atlas.attribution.attribute import attribute, select_logits
from atlas.attribution.context import Precomputed, ReplacementContext, precompute
from atlas.attribution.pruning import (
    PruneResult,
    compute_influence,
    find_threshold,
    graph_scores,
    prune,
)
from atlas.attribution.result import AttributionResult, ImageAttribution

__all__ = [
    "AttributionResult",
    "ImageAttribution",
    "Precomputed",
    "PruneResult",
    "ReplacementContext",
    "attribute",
    "compute_influence",
    "find_threshold",
    "graph_scores",
    "precompute",
    "prune",
    "select_logits",
]
