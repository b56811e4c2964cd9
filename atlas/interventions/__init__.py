"""Interventions on the real model: feature steering, supernodes, circuit patching, steering
vectors, and the graph's predictions for them (compute core: torch and transformers only).

Public API::

    FeatureEdit(layer, pos, feature, mode="set"|"scale"|"add"|"ablate", amount)
    Intervention(layer, pos, feature, value)            value = the absolute target activation
    clean_run(model, tset, inputs) -> CleanRun
    feature_intervention(model, tset, inputs, edits, *, constrained=None,
                         freeze_attention=True, apply_activation_function=True,
                         clean=None) -> InterventionResult
    generate(model, tset, inputs, edits, n_tokens, *, constrained=None,
             freeze_attention=True, clean=None) -> InterventionResult
    supernode_intervention(model, tset, inputs, members, multiplier, ...) -> InterventionResult
    donor_activations(model, tset, donor_inputs) -> DonorActivations
    circuit_patch(model, tset, recipient, donor, features, *, scale=1.0,
                  position_map=None, extra=(), ...) -> InterventionResult
    build_vector(model, positive, negative, layer, token_rule="last"|"mean") -> SteeringVector
    steer(model, inputs, vector, alpha, *, span=slice(1, None), mode="add"|"ablate",
          generate=0) -> SteeringResult
    alpha_sweep(model, inputs, vector, alphas, *, span, tokens) -> list[dict]
    decoder_cosines(vector, tset, layer) -> (d_tc,) cosines
    graph_view(AttributionResult | Graph) -> GraphView   (what predictions read)
    direct_effect(graph, changes) -> (N,)        graph_influence(adjacency) -> (N, N)
    logit_influence(graph) -> (N,)               measured_effect(model, graph, run)
    target_rows(graph) -> node indices measured_effect reads
    activation_fractions(run, features)          supernode_fraction(acts, clean, members)
    faithfulness(model, tset, inputs, result, *, n_sources=10, span=2) -> FaithfulnessReport
"""

from atlas.interventions.core import (
    CleanRun,
    FeatureEdit,
    Intervention,
    InterventionResult,
    clean_run,
    feature_intervention,
    generate,
    open_ended,
    resolve,
    validate,
)
from atlas.interventions.patching import (
    DonorActivations,
    active_members,
    circuit_patch,
    default_position_map,
    donor_activations,
    patch_edits,
    supernode_edits,
    supernode_fraction,
    supernode_intervention,
)
from atlas.interventions.predict import (
    FaithfulnessReport,
    GraphView,
    activation_fractions,
    demeaned_logits,
    direct_effect,
    faithfulness,
    feature_nodes,
    graph_influence,
    graph_view,
    logit_influence,
    measured_effect,
    pearson,
    spearman,
    target_rows,
)
from atlas.interventions.steering import (
    SteeringResult,
    SteeringVector,
    alpha_sweep,
    build_vector,
    decoder_cosines,
    residuals,
    steer,
)

__all__ = [
    "CleanRun",
    "DonorActivations",
    "FaithfulnessReport",
    "FeatureEdit",
    "GraphView",
    "Intervention",
    "InterventionResult",
    "SteeringResult",
    "SteeringVector",
    "activation_fractions",
    "active_members",
    "alpha_sweep",
    "build_vector",
    "circuit_patch",
    "clean_run",
    "decoder_cosines",
    "default_position_map",
    "demeaned_logits",
    "direct_effect",
    "donor_activations",
    "faithfulness",
    "feature_intervention",
    "feature_nodes",
    "generate",
    "graph_influence",
    "graph_view",
    "logit_influence",
    "measured_effect",
    "open_ended",
    "patch_edits",
    "pearson",
    "residuals",
    "resolve",
    "spearman",
    "steer",
    "supernode_edits",
    "supernode_fraction",
    "supernode_intervention",
    "target_rows",
    "validate",
]
