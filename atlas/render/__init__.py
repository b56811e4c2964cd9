"""Pictures of circuits, server-side (matplotlib's Agg canvas, Pillow for images).

Pure: the functions take :class:`atlas.graph.Graph` objects and the plain results of the named
queries, never a driver. Each writes an SVG or PNG chosen by the file suffix and returns a
:class:`Drawn` (path, pixel size, the node and edge ids drawn). In the SVG every node is a group
with id ``node-<id>`` and every edge ``edge-<source>-<target>``; supernode boxes are
``supernode-<name>`` and image-token thumbnails ``thumb-<id>``.

    draw_circuit          one prompt's pruned circuit (token position x layer)
    draw_prompt_circuit   the same, from a stored prompt's circuit (``read.prompt_circuit``)
    draw_supernode_graph  a prompt collapsed to supernodes
    draw_paths            the routes of a paths query as a layered graph
    draw_global_circuit   (source, target, weight, n_prompts) edges across prompts
    draw_heatmap          an image with the rollout heat of selected image tokens
    draw_card             a feature card
"""

from atlas.render._figure import Drawn, output_format
from atlas.render.circuit import (
    DEFAULT_MAX_EDGES,
    DEFAULT_MAX_NODES,
    crop_cell,
    draw_circuit,
    draw_prompt_circuit,
    select_edges,
    select_nodes,
)
from atlas.render.image import draw_card, draw_heatmap
from atlas.render.network import (
    draw_global_circuit,
    draw_network,
    draw_paths,
    draw_supernode_graph,
)

__all__ = [
    "DEFAULT_MAX_EDGES",
    "DEFAULT_MAX_NODES",
    "Drawn",
    "crop_cell",
    "draw_card",
    "draw_circuit",
    "draw_global_circuit",
    "draw_heatmap",
    "draw_network",
    "draw_paths",
    "draw_prompt_circuit",
    "draw_supernode_graph",
    "output_format",
    "select_edges",
    "select_nodes",
]
