"""Old home of the feature-label code, kept as a shim until its callers move.

atlas.annotate.apply   -> atlas.store.labels
atlas.annotate.lens    -> atlas.circuits.lens
atlas.annotate.labels  -> atlas.circuits.labels
"""
