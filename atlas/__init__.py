"""Circuit Atlas: attribution graphs for many prompts, stored and queried in Neo4j.

The compute core (``atlas.models``, ``atlas.transcoders``, ``atlas.attribution``, ``atlas.graph``)
imports torch and transformers only. ``atlas.store``, ``workers`` and ``atlas.cli`` are adapters
around it and import it, never the reverse.
"""

__version__ = "0.1.0"
