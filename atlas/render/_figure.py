"""What every picture shares: the Agg figure, the output format from the file suffix, edge styles."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

from matplotlib.figure import Figure

from atlas.errors import InputError

#: File suffixes a picture can be written as.
FORMATS = {".svg": "svg", ".png": "png"}
DPI = 100
POSITIVE = "#2b6cb0"
NEGATIVE = "#c53030"
#: Edge colour saturates at this share of the target's summed |input weight|.
SHARE_SCALE = 0.4


@dataclass(frozen=True)
class Drawn:
    """A written picture: where it is, its size in pixels (PNG) and the ids it drew."""

    path: Path
    size: tuple[int, int]
    nodes: list[str] = field(default_factory=list)
    edges: list[tuple[str, str]] = field(default_factory=list)


def output_format(path: str | Path, allowed: tuple[str, ...] = (".svg", ".png")) -> str:
    """``svg`` or ``png`` from the suffix of ``path``; :class:`InputError` for any other."""
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        raise InputError(f"cannot write {Path(path).name!r}: use a {' or '.join(allowed)} file")
    return FORMATS[suffix]


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure of that size on the Agg canvas (no pyplot state, no display)."""
    return Figure(figsize=(width_in, height_in), dpi=DPI)


def save(fig: Figure, path: str | Path, **drawn: object) -> Drawn:
    """Write ``fig`` at its own size (no tight crop: the PNG is ``figsize * DPI`` pixels). SVG
    text stays text (searchable, selectable), and its generated ids are stable."""
    path = Path(path)
    fmt = output_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "atlas"}):
        fig.savefig(path, format=fmt, dpi=DPI)
    width, height = fig.get_size_inches() * DPI
    return Drawn(path=path, size=(round(width), round(height)), **drawn)  # type: ignore[arg-type]


def edge_style(weight: float, scale: float) -> tuple[str, float, float]:
    """``(colour, line width, alpha)`` of an edge: colour by sign, width and opacity by
    ``|weight| / scale`` (``scale``: the target's summed |input weight|)."""
    share = min(abs(weight) / scale, SHARE_SCALE) / SHARE_SCALE if scale > 0 else 0.0
    colour = POSITIVE if weight >= 0 else NEGATIVE
    return colour, 0.4 + 3.0 * math.sqrt(share), 0.25 + 0.6 * share


def short(text: str, limit: int = 18) -> str:
    """One line of at most ``limit`` characters (an ellipsis marks a cut)."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def token_text(text: str) -> str:
    """A token as a label: visible spaces and newlines, never empty."""
    shown = text.replace("\n", "\\n").replace(" ", "·")
    return shown or "∅"
