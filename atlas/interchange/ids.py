"""Node ids, feature types, the ``feature`` field (Cantor pairing) and image soft tokens of the
interchange format."""

from __future__ import annotations

import math
import re

from atlas.graph import Graph, NodeKind

SCHEMA_VERSION = 1
"""``metadata.schema_version`` written by :func:`graph_to_json` (Cantor-paired ``feature``)."""

FEATURE_TYPE_FEATURE = NodeKind.FEATURE.feature_type
FEATURE_TYPE_ERROR = NodeKind.ERROR.feature_type
FEATURE_TYPE_TOKEN = NodeKind.TOKEN.feature_type
FEATURE_TYPE_LOGIT = NodeKind.LOGIT.feature_type

#: feature_type strings read as transcoder features (the frontend draws all of them the same way).
FEATURE_TYPES_READ = {FEATURE_TYPE_FEATURE, "transcoder", "per layer transcoder", "plt", "clt"}

FEATURE_ID_RE = re.compile(r"^(-?\d+)_(-?\d+)_(-?\d+)$")
TOKEN_ID_RE = re.compile(r"^E_(-?\d+)_(-?\d+)$")

GENERATOR_NAME = "circuit-atlas"


def cantor_pair(layer: int, feature: int) -> int:
    """Cantor pairing of (layer, feature), the ``feature`` field under schema_version 1."""
    s = layer + feature
    return s * (s + 1) // 2 + feature


def cantor_unpair(z: int) -> tuple[int, int]:
    """Inverse of :func:`cantor_pair`: ``z -> (layer, feature)``."""
    w = (math.isqrt(8 * z + 1) - 1) // 2
    feature = z - w * (w + 1) // 2
    return w - feature, feature


#: The viewer's token text of an image soft token (the paper's Gemma-3 token).
IMAGE_SOFT_TOKEN = "<image_soft_token>"


def image_index(graph: Graph) -> dict[int, tuple[int, int, int]]:
    """Position -> ``(k, row, col)`` of each image soft token of ``graph`` (empty for text)."""
    if graph.image_positions is None or graph.image_grid is None:
        return {}
    grid = graph.image_grid.tolist()
    return {p: (k, grid[k][0], grid[k][1]) for k, p in enumerate(graph.image_positions.tolist())}
