"""Helpers for tests and benchmarks that ship with the package (no downloads, seeded).

``atlas.testing.tiny`` builds tiny local models and transcoders of every supported family.
"""
