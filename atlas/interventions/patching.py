"""Supernode interventions and circuit patching, built on :mod:`atlas.interventions.core`.

A supernode intervention scales every member ``(layer, pos, feature)`` by one multiplier (value
``M * a_clean``, circuit-tracer's scale); ``M = -1`` is Anthropic's suppression. A supernode none of
whose members is active in the prompt is refused: the run could not show anything.

Circuit patching writes the activations of a donor prompt's features into a recipient prompt:
feature ``(layer, p, f)`` of the donor takes, in the recipient, the value ``scale * a_donor`` at
position ``position_map(p)``. Positions are those of the models' token sequences (image soft tokens
included). The default map is the identity when both prompts have the same length, else
alignment from the end (``p - P_donor + P_recipient``: the answer position maps onto the answer
position); a donor position that falls before the recipient's first position is refused. The
donor's activations carry the model and transcoder provenance they came from, so a donor from
another model or transcoder set is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from atlas.errors import InputError
from atlas.interventions.core import (
    CleanRun,
    FeatureEdit,
    Intervention,
    InterventionResult,
    check_feature,
    clean_run,
    feature_intervention,
)
from atlas.models.inputs import ModelInputs
from atlas.models.loading import LoadedModel
from atlas.transcoders.loading import TranscoderSet

Member = tuple[int, int, int]
"""A feature at a position: ``(layer, pos, feature)``."""


def supernode_edits(
    members: Sequence[Member], multiplier: float, clean: Tensor, name: str = "supernode"
) -> list[FeatureEdit]:
    """``scale`` edits of every member; :class:`InputError` when no member is active in the
    clean activations ``(L, P, d_tc)``."""
    if not members:
        raise InputError(f"{name}: a supernode needs at least one member")
    n_layers, n_pos, d_tc = clean.shape
    for layer, pos, feature in members:
        if not (0 <= layer < n_layers and -n_pos <= pos < n_pos and 0 <= feature < d_tc):
            raise InputError(f"{name}: member {layer}:{pos}:{feature} out of range")
    if not any(float(clean[lay, p, f]) != 0 for lay, p, f in members):
        raise InputError(f"{name}: no member of the supernode is active in this prompt")
    return [FeatureEdit(lay, p, f, "scale", multiplier) for lay, p, f in members]


def supernode_intervention(
    model: LoadedModel,
    tset: TranscoderSet,
    inputs: ModelInputs,
    members: Sequence[Member],
    multiplier: float,
    *,
    name: str = "supernode",
    clean: CleanRun | None = None,
    constrained: range | None = None,
    freeze_attention: bool = True,
) -> InterventionResult:
    """Scale every member of a supernode by ``multiplier`` (see the module docstring)."""
    clean = clean if clean is not None else clean_run(model, tset, inputs)
    edits = supernode_edits(members, multiplier, clean.activations, name)
    return feature_intervention(
        model,
        tset,
        inputs,
        edits,
        constrained=constrained,
        freeze_attention=freeze_attention,
        clean=clean,
    )


def supernode_fraction(activations: Tensor, clean: Tensor, members: Sequence[Member]) -> float:
    """A supernode's total activation as a fraction of its clean total (NaN when inactive)."""
    now = sum(float(activations[lay, p, f]) for lay, p, f in members)
    base = sum(float(clean[lay, p, f]) for lay, p, f in members)
    return now / base if base != 0 else float("nan")


@dataclass(frozen=True)
class DonorActivations:
    """A donor prompt's clean activations ``(L, P, d_tc)`` with the provenance they came from."""

    activations: Tensor
    model_revision: str | None
    transcoder_hash: str
    n_pos: int


def donor_activations(
    model: LoadedModel, tset: TranscoderSet, inputs: ModelInputs
) -> DonorActivations:
    """The donor's clean activations, tagged with its model and transcoder provenance."""
    clean = clean_run(model, tset, inputs)
    return DonorActivations(
        activations=clean.activations,
        model_revision=model.info.revision,
        transcoder_hash=tset.info.content_hash,
        n_pos=inputs.n_pos,
    )


def default_position_map(n_donor: int, n_recipient: int) -> Callable[[int], int]:
    """Identity for prompts of equal length, else alignment from the end."""
    if n_donor == n_recipient:
        return lambda p: p % n_donor
    return lambda p: (p % n_donor) - n_donor + n_recipient


def _table_map(table: dict[int, int]) -> Callable[[int], int]:
    def mapped(p: int) -> int:
        if p not in table:
            raise InputError(f"donor position {p} has no recipient position in the map")
        return table[p]

    return mapped


def patch_edits(
    donor: DonorActivations,
    features: Sequence[Member],
    n_recipient: int,
    *,
    scale: float = 1.0,
    position_map: Callable[[int], int] | dict[int, int] | None = None,
) -> list[Intervention]:
    """Interventions writing ``scale * a_donor`` of each donor feature at its mapped position."""
    if not features:
        raise InputError("circuit patching needs at least one donor feature")
    mapped: Callable[[int], int]
    if isinstance(position_map, dict):
        mapped = _table_map(dict(position_map))
    else:
        mapped = position_map or default_position_map(donor.n_pos, n_recipient)
    acts = donor.activations
    out = []
    for layer, pos, feature in features:
        what = f"donor feature {layer}:{pos}:{feature}"
        if not (0 <= layer < acts.shape[0] and 0 <= feature < acts.shape[2]):
            raise InputError(f"{what}: layer or feature out of range")
        if not -donor.n_pos <= pos < donor.n_pos:
            raise InputError(f"{what}: position outside the donor's {donor.n_pos} positions")
        target = mapped(pos)
        if not 0 <= target < n_recipient:
            raise InputError(f"{what}: maps to position {target}, outside the recipient")
        out.append(Intervention(layer, target, feature, scale * float(acts[layer, pos, feature])))
    return out


def circuit_patch(
    model: LoadedModel,
    tset: TranscoderSet,
    recipient: ModelInputs,
    donor: DonorActivations,
    features: Sequence[Member],
    *,
    scale: float = 1.0,
    position_map: Callable[[int], int] | dict[int, int] | None = None,
    extra: Sequence[FeatureEdit | Intervention] = (),
    constrained: range | None = None,
    freeze_attention: bool = True,
    clean: CleanRun | None = None,
) -> InterventionResult:
    """Write the donor's feature activations into ``recipient`` (see the module docstring);
    ``extra`` edits (say, ablating the recipient's own features) run in the same pass."""
    if donor.model_revision != model.info.revision:
        raise InputError("the donor's activations come from another model")
    if donor.transcoder_hash != tset.info.content_hash:
        raise InputError("the donor's activations come from another transcoder set")
    for layer, pos, feature in features:
        check_feature(tset, layer, pos, feature, donor.n_pos, f"donor feature {layer}:{pos}")
    edits: list[FeatureEdit | Intervention] = [
        *extra,
        *patch_edits(donor, features, recipient.n_pos, scale=scale, position_map=position_map),
    ]
    return feature_intervention(
        model,
        tset,
        recipient,
        edits,
        constrained=constrained,
        freeze_attention=freeze_attention,
        clean=clean,
    )


def active_members(clean: Tensor, layer: int | None = None) -> list[Member]:
    """Every active ``(layer, pos, feature)`` (optionally of one layer), for whole-prompt patches."""
    idx = torch.nonzero(clean if layer is None else clean[layer : layer + 1])
    if layer is not None:
        idx[:, 0] += layer
    return [tuple(int(v) for v in row) for row in idx]  # type: ignore[misc]
