"""Shim: the code lives in :mod:`atlas.store.labels` (re-export for callers not yet moved)."""

from atlas.store.labels import *  # noqa: F403
