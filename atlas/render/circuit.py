"""One prompt's circuit in the layout researchers know.

x is the token position, y the layer: the embeddings (and image soft tokens) on row 0, feature and
error nodes of layer ``l`` on row ``l + 1``, the logits on the top row. Circles are features,
squares tokens and logits, diamonds errors; image soft tokens are thumbnails of their cell of the
image when the image is given. Edges are blue when positive and red when negative, wider and more
opaque with ``|w| / sum |w_in(target)|`` (saturating at 0.4). Supernodes are boxes around their
members.

The node cap keeps the ``max_nodes`` feature and error nodes with the largest edge mass (the sum of
``|w|`` over their edges in the whole graph), every logit, and the token nodes that feed a kept
node; the edges drawn are the ``max_edges`` edges between kept nodes with the largest share of
their target's input.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.offsetbox import AnnotationBbox, OffsetImage
from matplotlib.patches import Rectangle

from atlas.graph import Graph, NodeKind
from atlas.render._figure import (
    NEGATIVE,
    POSITIVE,
    Drawn,
    edge_style,
    new_figure,
    save,
    short,
    token_text,
)

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from PIL import Image

DEFAULT_MAX_NODES = 60
DEFAULT_MAX_EDGES = 300
_MARKERS = {
    NodeKind.FEATURE: ("o", "#f6ad55", 70),
    NodeKind.ERROR: ("D", "#a0aec0", 40),
    NodeKind.TOKEN: ("s", "#e2e8f0", 70),
    NodeKind.IMAGE: ("s", "#e2e8f0", 70),
    NodeKind.LOGIT: ("s", "#68d391", 90),
}
_THUMB_PX = 30


def select_nodes(graph: Graph, max_nodes: int = DEFAULT_MAX_NODES) -> list[int]:
    """The node indices a picture keeps under the cap (module docstring), in graph order."""
    if max_nodes < 1:
        from atlas.errors import InputError

        raise InputError("max nodes must be >= 1")
    kinds = graph.kind.tolist()
    mass = _edge_mass(graph)
    inner = [
        i for i, k in enumerate(kinds) if k in (NodeKind.FEATURE, NodeKind.ERROR) and mass[i] > 0
    ]
    inner.sort(key=lambda i: (-mass[i], i))
    keep = set(inner[:max_nodes]) | {i for i, k in enumerate(kinds) if k == NodeKind.LOGIT}
    sources = graph.edge_source.tolist()
    for t, s in zip(graph.edge_target.tolist(), sources, strict=True):
        if t in keep and kinds[s] in (NodeKind.TOKEN, NodeKind.IMAGE):
            keep.add(s)
    return sorted(keep)


def _edges_with_input_scale(
    graph: Graph,
) -> tuple[list[tuple[int, int, float]], dict[int, float]]:
    """Every ``(target, source, weight)`` edge, and each target's total ``|w|`` of input (the
    scale an edge's share is measured against)."""
    in_scale: dict[int, float] = defaultdict(float)
    edges = list(
        zip(
            graph.edge_target.tolist(),
            graph.edge_source.tolist(),
            graph.edge_weight.tolist(),
            strict=True,
        )
    )
    for t, _, w in edges:
        in_scale[t] += abs(w)
    return edges, in_scale


def select_edges(
    graph: Graph, kept: Sequence[int], max_edges: int = DEFAULT_MAX_EDGES
) -> list[tuple[int, int, float]]:
    """``(target, source, weight)`` of the edges drawn between ``kept`` nodes: the ``max_edges``
    with the largest ``|w| / sum |w_in(target)|``, weakest first (so the strong ones lie on top)."""
    edges, in_scale = _edges_with_input_scale(graph)
    keep = set(kept)
    inside = [e for e in edges if e[0] in keep and e[1] in keep]
    inside.sort(key=lambda e: (-abs(e[2]) / (in_scale[e[0]] or 1.0), e[0], e[1]))
    return inside[: max(max_edges, 0)][::-1]


def _edge_mass(graph: Graph) -> list[float]:
    mass = [0.0] * graph.n_nodes
    for t, s, w in zip(
        graph.edge_target.tolist(),
        graph.edge_source.tolist(),
        graph.edge_weight.tolist(),
        strict=True,
    ):
        mass[t] += abs(w)
        mass[s] += abs(w)
    return mass


_SLOT = 0.32


def columns(graph: Graph, kept: Sequence[int]) -> list[float]:
    """The x of each token position's centre: a position is one unit wide, or wider when one of
    its cells holds more than three nodes (``_SLOT`` per node), so crowded cells get room."""
    kinds, layers, poss = graph.kind.tolist(), graph.layer.tolist(), graph.pos.tolist()
    counts: dict[tuple[int, int], int] = defaultdict(int)
    for i in kept:
        counts[(poss[i], -2 if kinds[i] == NodeKind.LOGIT else layers[i])] += 1
    widths = [1.0] * len(graph.metadata.tokens)
    for (pos, _), k in counts.items():
        widths[pos] = max(widths[pos], _SLOT * k + 0.2)
    centres, edge = [], 0.0
    for w in widths:
        centres.append(edge + w / 2)
        edge += w
    return centres


def node_places(graph: Graph, kept: Sequence[int]) -> dict[int, tuple[float, float, int]]:
    """``(x, y, j)`` of each kept node: its position's column and its row, spread sideways inside
    a crowded cell (``j``: its rank in the cell, by edge mass)."""
    kinds, layers, poss = graph.kind.tolist(), graph.layer.tolist(), graph.pos.tolist()
    mass = _edge_mass(graph)
    top = graph.n_layers + 1
    centre = columns(graph, kept)
    cells: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i in kept:
        row = top if kinds[i] == NodeKind.LOGIT else layers[i] + 1
        cells[(poss[i], row)].append(i)
    places: dict[int, tuple[float, float, int]] = {}
    for (pos, row), members in cells.items():
        members.sort(key=lambda i: (-mass[i], i))
        k = len(members)
        step = min(0.8 / k, 0.28) if k <= 3 else _SLOT
        for j, i in enumerate(members):
            places[i] = (centre[pos] + (j - (k - 1) / 2) * step, float(row), j)
    return places


def draw_circuit(
    graph: Graph,
    out: str | Path,
    *,
    labels: Mapping[str, str] | None = None,
    token_texts: Mapping[int, str] | None = None,
    supernodes: Sequence[Sequence[str]] = (),
    max_nodes: int = DEFAULT_MAX_NODES,
    max_edges: int = DEFAULT_MAX_EDGES,
    image: Image.Image | None = None,
) -> Drawn:
    """Write the circuit of ``graph`` to ``out`` (``.svg`` or ``.png``).

    ``labels``: feature labels by node id; ``token_texts``: text of vocabulary ids (logits whose
    token is not in the prompt); ``supernodes``: ``[name, node_id, ...]`` lists; ``image``: the
    prompt's image, whose grid cells become the image tokens' thumbnails.
    """
    labels = labels or {}
    kept = select_nodes(graph, max_nodes)
    ids = graph.node_ids()
    placed = node_places(graph, kept)
    places = {i: (x, y) for i, (x, y, _) in placed.items()}
    kinds, layers = graph.kind.tolist(), graph.layer.tolist()
    features, tids, probs = (
        graph.feature.tolist(),
        graph.token_id.tolist(),
        graph.logit_prob.tolist(),
    )
    tokens = graph.metadata.tokens
    top = graph.n_layers + 1
    prompt_texts = dict(zip(graph.input_ids.tolist(), tokens, strict=True)) | dict(
        token_texts or {}
    )

    centre = columns(graph, kept)
    span = centre[-1] + 0.5 if centre else 1.0
    fig = new_figure(min(40.0, max(7.0, 0.75 * span + 2.5)), max(4.5, 0.6 * (top + 1) + 2.4))
    ax = fig.add_axes((0.07, 0.18, 0.9, 0.68))
    _, in_scale = _edges_with_input_scale(graph)
    drawn_edges: list[tuple[str, str]] = []
    for t, s, w in select_edges(graph, kept, max_edges):
        colour, width, alpha = edge_style(w, in_scale[t])
        (x0, y0), (x1, y1) = places[s], places[t]
        (line,) = ax.plot([x0, x1], [y0, y1], color=colour, lw=width, alpha=alpha, zorder=1)
        line.set_gid(f"edge-{ids[s]}-{ids[t]}")
        drawn_edges.append((ids[s], ids[t]))

    thumbs = _thumbnails(graph, image) if image is not None else {}
    for i in kept:
        kind = NodeKind(kinds[i])
        marker, colour, size = _MARKERS[kind]
        x, y = places[i]
        dot = ax.scatter(
            [x], [y], marker=marker, s=size, c=colour, edgecolors="#2d3748", lw=0.6, zorder=3
        )
        dot.set_gid(f"node-{ids[i]}")
        if i in thumbs:
            box = AnnotationBbox(
                OffsetImage(thumbs[i], zoom=_THUMB_PX / max(thumbs[i].shape[:2])),
                (x, y),
                frameon=True,
                pad=0.05,
                zorder=4,
            )
            box.set_gid(f"thumb-{ids[i]}")
            ax.add_artist(box)
        text = _node_text(kind, ids[i], layers[i], features[i], tids[i], probs[i], labels, tokens)
        if kind == NodeKind.LOGIT and tids[i] in prompt_texts:
            text = f"{token_text(prompt_texts[tids[i]])} {probs[i]:.2f}"
        if text:
            above = kind == NodeKind.LOGIT or placed[i][2] % 2 == 0
            slanted = kind == NodeKind.LOGIT
            ax.annotate(
                text,
                (x, y),
                xytext=(0, 7 if above else -9),
                textcoords="offset points",
                rotation=35 if slanted else 0,
                rotation_mode="anchor",
                ha="left" if slanted else "center",
                va="bottom" if above else "top",
                fontsize=5.5,
                color="#1a202c",
                zorder=5,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )

    _boxes(ax, supernodes, {ids[i]: places[i] for i in kept})
    _legend(ax)
    ax.set_xlim(-0.2, max(span, max((x for x, _ in places.values()), default=0) + 0.5))
    ax.set_ylim(-0.7, top + 0.7)
    ticks = [short(token_text(t), 10) for t in tokens]
    if graph.image_positions is not None and graph.image_grid is not None:
        for p, (r, c) in zip(
            graph.image_positions.tolist(), graph.image_grid.tolist(), strict=True
        ):
            ticks[p] = f"img {r},{c}"
    ax.set_xticks(centre, ticks, rotation=45, ha="right")
    ax.set_yticks(
        range(top + 1), ["emb"] + [f"L{lay}" for lay in range(graph.n_layers)] + ["logit"]
    )
    ax.tick_params(labelsize=7)
    ax.grid(axis="y", color="#edf2f7", lw=0.6, zorder=0)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.set_title(
        f"{short(graph.metadata.prompt, 80)}   ({len(kept)} nodes, {len(drawn_edges)} edges)",
        fontsize=8,
        loc="right",
    )
    return save(fig, out, nodes=[ids[i] for i in kept], edges=drawn_edges)


def _node_text(
    kind: NodeKind,
    nid: str,
    layer: int,
    feature: int,
    tid: int,
    prob: float,
    labels: Mapping[str, str],
    tokens: Sequence[str],
) -> str:
    if kind == NodeKind.FEATURE:
        return short(labels.get(nid) or f"{layer}/{feature}")
    if kind == NodeKind.ERROR:
        return "err"
    if kind == NodeKind.LOGIT:
        return f"#{tid} {prob:.2f}"
    return ""


def _boxes(
    ax: object, supernodes: Sequence[Sequence[str]], places: Mapping[str, tuple[float, float]]
) -> None:
    """A labelled box around the kept members of each supernode."""
    from matplotlib.axes import Axes

    assert isinstance(ax, Axes)
    for group in supernodes:
        if not group:
            continue
        name, members = group[0], [places[m] for m in group[1:] if m in places]
        if not members:
            continue
        xs, ys = [x for x, _ in members], [y for _, y in members]
        x0, y0 = min(xs) - 0.25, min(ys) - 0.3
        rect = Rectangle(
            (x0, y0),
            max(xs) - x0 + 0.25,
            max(ys) - y0 + 0.3,
            fill=False,
            ec="#6b46c1",
            lw=1.0,
            ls="--",
            zorder=2,
        )
        rect.set_gid(f"supernode-{name}")
        ax.add_patch(rect)
        ax.text(x0, max(ys) + 0.32, short(name, 24), fontsize=6, color="#6b46c1", zorder=5)


def _thumbnails(graph: Graph, image: Image.Image) -> dict[int, np.ndarray]:
    """The crop of ``image`` under each image token's cell of the pooled grid, by node index."""
    grid, positions = graph.image_grid, graph.image_positions
    if grid is None or positions is None or grid.shape[0] == 0:
        return {}
    cells = {int(p): (int(r), int(c)) for p, (r, c) in zip(positions, grid.tolist(), strict=True)}
    rows, cols = int(grid[:, 0].max()) + 1, int(grid[:, 1].max()) + 1
    crops = {cell: crop_cell(image, cell, (rows, cols)) for cell in set(cells.values())}
    out: dict[int, np.ndarray] = {}
    for i, (k, p) in enumerate(zip(graph.kind.tolist(), graph.pos.tolist(), strict=True)):
        if k == NodeKind.IMAGE and p in cells:
            out[i] = crops[cells[p]]
    return out


def crop_cell(image: Image.Image, cell: tuple[int, int], grid: tuple[int, int]) -> np.ndarray:
    """The pixels of ``image`` under one ``(row, col)`` cell of a ``(rows, cols)`` grid laid over
    the whole picture, as an RGB array."""
    (row, col), (rows, cols) = cell, grid
    w, h = image.size
    box = (
        col * w // cols,
        row * h // rows,
        max((col + 1) * w // cols, col * w // cols + 1),
        max((row + 1) * h // rows, row * h // rows + 1),
    )
    return np.asarray(image.convert("RGB").crop(box))


def _legend(ax: Axes) -> None:
    """What the shapes and colours mean, above the plot on the left (the title is on the right)."""
    from matplotlib.lines import Line2D

    def mark(kind: NodeKind, name: str) -> Line2D:
        marker, colour, _ = _MARKERS[kind]
        return Line2D([], [], ls="", marker=marker, mfc=colour, mec="#2d3748", label=name)

    handles = [
        mark(NodeKind.FEATURE, "feature"),
        mark(NodeKind.ERROR, "error"),
        mark(NodeKind.TOKEN, "token"),
        mark(NodeKind.LOGIT, "logit"),
        Line2D([], [], color=POSITIVE, lw=2, label="w > 0"),
        Line2D([], [], color=NEGATIVE, lw=2, label="w < 0"),
    ]
    ax.legend(
        handles=handles, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=6, fontsize=6,
        frameon=False, borderaxespad=0.2,
    )  # fmt: skip


def draw_prompt_circuit(
    found: Mapping[str, Any],
    out: str | Path,
    *,
    max_nodes: int = DEFAULT_MAX_NODES,
    max_edges: int = DEFAULT_MAX_EDGES,
    image: Image.Image | None = None,
) -> Drawn:
    """:func:`draw_circuit` of a stored prompt's circuit as ``read.prompt_circuit`` returns it
    (``graph``, ``labels``, ``token_texts``, ``supernodes``)."""
    return draw_circuit(
        found["graph"],
        out,
        labels=found["labels"],
        token_texts=found["token_texts"],
        supernodes=found["supernodes"],
        max_nodes=max_nodes,
        max_edges=max_edges,
        image=image,
    )
