"""Pluggable sources of feature labels (pure Python).

A label source turns the evidence the atlas holds about features (:class:`FeatureEvidence`: the
tokens and contexts of their strongest activations, the image cells where they fire, their
logit-lens tokens) into one-line labels, a batch at a time (so an explainer behind a model or a
service can batch its calls). The default, ``heuristic``, is :func:`atlas.circuits.labels.
short_label`. Another source registers a factory under a name
(:func:`register_label_source`) and is chosen by ``atlas annotate --label-source NAME``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from atlas.circuits.labels import short_label
from atlas.errors import InputError


@dataclass(frozen=True)
class FeatureEvidence:
    """What the atlas knows about one feature, strongest activation first."""

    fid: str
    lens_tokens: list[str] = field(default_factory=list)
    activating_tokens: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)
    """The prompt's tokens around each top activation, the active one in brackets."""
    activations: list[float] = field(default_factory=list)
    image_regions: list[str] = field(default_factory=list)
    """``"row,col"`` grid cells of its top activations at image soft tokens."""
    image_tags: list[list[str]] = field(default_factory=list)
    """Per top activation, the tags of its prompt's image (empty for a text prompt)."""


class LabelSource(Protocol):
    """Labels for a batch of features (``None``: no label)."""

    name: str

    def labels(self, evidence: Sequence[FeatureEvidence]) -> list[str | None]: ...


class HeuristicLabels:
    """``"images: hand → sees: image 3,1 → on: ? → says: 5"`` from the evidence alone."""

    name = "heuristic"

    def labels(self, evidence: Sequence[FeatureEvidence]) -> list[str | None]:
        return [
            short_label(
                e.lens_tokens,
                e.activating_tokens,
                image_regions=e.image_regions,
                image_tags=e.image_tags,
            )
            for e in evidence
        ]


_SOURCES: dict[str, Callable[[], LabelSource]] = {"heuristic": HeuristicLabels}


def register_label_source(name: str, factory: Callable[[], LabelSource]) -> None:
    """Make ``factory()`` available as the label source ``name``."""
    if not name or not name.isidentifier():
        raise InputError(f"bad label source name {name!r}")
    _SOURCES[name] = factory


def label_source(name: str = "heuristic") -> LabelSource:
    """The registered label source ``name``; :class:`InputError` for an unknown one."""
    factory = _SOURCES.get(name)
    if factory is None:
        raise InputError(f"unknown label source {name!r}: use one of {', '.join(sorted(_SOURCES))}")
    return factory()


def label_sources() -> list[str]:
    """Names of the registered label sources."""
    return sorted(_SOURCES)


def context(tokens: Sequence[str], pos: int, before: int = 6, after: int = 2) -> str:
    """The tokens around ``pos`` with the one at ``pos`` in brackets."""
    here = f"[{tokens[pos]}]" if 0 <= pos < len(tokens) else "[?]"
    return "".join(
        [*tokens[max(0, pos - before) : max(0, pos)], here, *tokens[pos + 1 : pos + 1 + after]]
    )
