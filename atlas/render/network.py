"""Small node-link pictures: a prompt's supernode graph, a paths query's routes, a global circuit.

Each is a weighted directed graph laid out in layers (networkx): a node's layer is the length of the
longest path reaching it, so sources sit at the bottom and sinks on top; edges are blue when
positive and red when negative, wider with ``|w|`` relative to the strongest edge.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import networkx as nx
from matplotlib.patches import FancyArrowPatch

from atlas.render._figure import Drawn, edge_style, new_figure, save, short


def draw_network(
    edges: Iterable[tuple[str, str, float]],
    out: str | Path,
    *,
    title: str = "",
    names: Mapping[str, str] | None = None,
    edge_notes: Mapping[tuple[str, str], str] | None = None,
) -> Drawn:
    """Write the layered picture of ``(source, target, weight)`` edges to ``out``.

    ``names``: the label of each node (default: the node itself); ``edge_notes``: a short text
    written at an edge's middle (e.g. its prompt count). Parallel edges are summed.
    """
    g: nx.DiGraph = nx.DiGraph()
    for s, t, w in edges:
        if s == t:
            continue
        old = g.edges[s, t]["weight"] if g.has_edge(s, t) else 0.0
        g.add_edge(s, t, weight=old + float(w))
    layer = _layers(g)
    for n in g.nodes:
        g.nodes[n]["layer"] = layer[n]
    width = max((sum(1 for v in layer.values() if v == k) for k in set(layer.values())), default=1)
    depth = max(layer.values(), default=0) + 1
    fig = new_figure(max(6.0, 1.8 * width + 1.5), max(4.0, 1.3 * depth + 1.5))
    ax = fig.add_axes((0.03, 0.03, 0.94, 0.88))
    ax.set_axis_off()
    pos = nx.multipartite_layout(g, subset_key="layer", align="horizontal") if g else {}
    biggest = max((abs(d["weight"]) for _, _, d in g.edges(data=True)), default=1.0) or 1.0
    drawn: list[tuple[str, str]] = []
    placed: list[tuple[float, float]] = []
    span = _span(pos)
    for s, t, d in sorted(g.edges(data=True), key=lambda e: abs(e[2]["weight"])):
        colour, lw, alpha = edge_style(d["weight"], biggest * 0.4)
        rad = 0.08 + 0.35 * (layer[t] - layer[s] - 1)
        arrow = FancyArrowPatch(
            pos[s],
            pos[t],
            arrowstyle="-|>",
            mutation_scale=8 + 2 * lw,
            color=colour,
            lw=lw,
            alpha=alpha,
            shrinkA=12,
            shrinkB=12,
            connectionstyle=f"arc3,rad={rad:.2f}",
            zorder=1,
        )
        ax.add_patch(arrow)
        arrow.set_gid(f"edge-{s}-{t}")
        drawn.append((str(s), str(t)))
        note = (edge_notes or {}).get((s, t))
        if note:
            x, y = _note_spot(pos[s], pos[t], rad, placed, 0.07 * span)
            placed.append((x, y))
            ax.text(
                x,
                y,
                note,
                fontsize=6,
                color="#4a5568",
                ha="center",
                va="center",
                zorder=2,
                bbox={"boxstyle": "round,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.7},
            )
    for n in g.nodes:
        x, y = pos[n]
        dot = ax.scatter([x], [y], s=160, c="#f6ad55", edgecolors="#2d3748", lw=0.7, zorder=3)
        dot.set_gid(f"node-{n}")
        ax.annotate(
            short((names or {}).get(n, n), 28),
            (x, y),
            xytext=(0, 9),
            textcoords="offset points",
            ha="center",
            fontsize=7,
            zorder=4,
            bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8},
        )
    if g:
        xs, ys = zip(*pos.values(), strict=True)
        ax.set_xlim(min(xs) - 0.3, max(xs) + 0.3)
        ax.set_ylim(min(ys) - 0.2, max(ys) + 0.3)
    fig.suptitle(short(title, 100) if title else "", fontsize=9)
    return save(fig, out, nodes=[str(n) for n in g.nodes], edges=drawn)


def _span(pos: Mapping[Any, Any]) -> float:
    """The larger side of the nodes' bounding box (1 for fewer than two nodes)."""
    if len(pos) < 2:
        return 1.0
    xs, ys = zip(*pos.values(), strict=True)
    return float(max(max(xs) - min(xs), max(ys) - min(ys))) or 1.0


def _note_spot(
    a: Sequence[float],
    b: Sequence[float],
    rad: float,
    placed: Sequence[tuple[float, float]],
    min_gap: float,
) -> tuple[float, float]:
    """Where an edge's note goes: the first point along the drawn arc (matplotlib's ``arc3``: a
    quadratic Bezier through the control point ``mid + rad * (dy, -dx)``), from the middle
    outwards, that is at least ``min_gap`` from every note already placed; the middle when none
    is."""
    (x0, y0), (x1, y1) = a, b
    cx, cy = (x0 + x1) / 2 + rad * (y1 - y0), (y0 + y1) / 2 - rad * (x1 - x0)

    def at(u: float) -> tuple[float, float]:
        v = 1 - u
        return (
            v * v * x0 + 2 * u * v * cx + u * u * x1,
            v * v * y0 + 2 * u * v * cy + u * u * y1,
        )

    for u in (0.5, 0.35, 0.65, 0.25, 0.75, 0.2, 0.8):
        x, y = at(u)
        if all((x - px) ** 2 + (y - py) ** 2 >= min_gap**2 for px, py in placed):
            return x, y
    return at(0.5)


def _layers(g: nx.DiGraph) -> dict[Any, int]:
    """Longest-path layer of each node (a cycle's nodes share their component's layer)."""
    dag = nx.condensation(g)
    depth: dict[int, int] = {}
    for c in nx.topological_sort(dag):
        depth[c] = max((depth[p] + 1 for p in dag.predecessors(c)), default=0)
    return {n: depth[c] for n, c in dag.graph["mapping"].items()}


def draw_supernode_graph(
    rows: Sequence[Mapping[str, Any]], out: str | Path, *, title: str = ""
) -> Drawn:
    """A prompt collapsed to supernodes: the rows of ``read.prompt_supernode_graph``
    (``source``, ``target``, ``weight``, ``n_edges``)."""
    return draw_network(
        ((r["source"], r["target"], r["weight"]) for r in rows),
        out,
        title=title or "supernode graph",
        names={n: n.removeprefix("supernode:") for r in rows for n in (r["source"], r["target"])},
    )


def draw_paths(result: Mapping[str, Any], out: str | Path, *, title: str = "") -> Drawn:
    """The routes of a paths query (``read.paths``'s ``aggregate``) as one layered graph: each
    route's consecutive steps are edges weighted by the route's summed score."""
    edges: list[tuple[str, str, float]] = []
    for route in result.get("aggregate", []):
        steps = list(route["route"])
        edges.extend((a, b, float(route["sum_score"])) for a, b in itertools.pairwise(steps))
    return draw_network(edges, out, title=title or "paths")


def draw_global_circuit(
    edges: Iterable[tuple[str, str, float, int]],
    out: str | Path,
    *,
    title: str = "",
    names: Mapping[str, str] | None = None,
) -> Drawn:
    """A circuit across prompts: ``(source, target, weight, n_prompts)`` edges, each marked with
    its prompt count."""
    rows = list(edges)
    notes = {(s, t): f"n={n}" for s, t, _, n in rows}
    return draw_network(
        ((s, t, w) for s, t, w, _ in rows),
        out,
        title=title or "global circuit",
        names=names,
        edge_notes=notes,
    )
