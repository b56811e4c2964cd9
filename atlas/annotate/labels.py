"""Shim: the code lives in :mod:`atlas.circuits.labels` (re-export for callers not yet moved)."""

from atlas.circuits.labels import *  # noqa: F403
