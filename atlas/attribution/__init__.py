"""Attribution graphs on transformers + transcoders (no infrastructure imports).

Public API::

    attribute(prompt | ModelInputs, model, transcoders, *, image=None, rollout=True,
              settings=None, max_n_logits=None, desired_logit_prob=None,
              max_feature_nodes=None, batch_size=64, explicit_logit_tokens=None,
              max_seq_len=None, progress=None, memory_limit_bytes=None,
              update_interval=4) -> AttributionResult
    AttributionResult.to_graph(prune=None, node_threshold=None, edge_threshold=None, *,
                               settings=None) -> Graph
    AttributionResult.scores() -> (replacement, completeness)
    prune(adj, logit_weights, n_tokens, n_logits, n_features, ...) -> PruneResult
    compute_influence, graph_scores, find_threshold

The knobs and their defaults are :class:`atlas.graph.AttributionSettings`; a keyword left at
``None`` takes its value from ``settings`` (or the defaults).
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
