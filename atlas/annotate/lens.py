"""Shim: the code lives in :mod:`atlas.circuits.lens` (re-export for callers not yet moved)."""

from atlas.circuits.lens import *  # noqa: F403
