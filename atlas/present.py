"""Results as tables and JSON: the printers the CLI, the demo and a web API share (no click).

Values come from :mod:`atlas.store.read` and :mod:`atlas.store.cypher` as plain dicts and lists.
JSON is exact: NaN and infinities become ``null`` (JSON has neither), Neo4j temporals their ISO
text, and characters a terminal would act on are written as ``\\uXXXX`` escapes, which decode to
the same string. Tables are for people: numbers to four significant digits, and control
characters in stored text (prompts, labels, tokens, names) shown escaped (``\\x1b``), so a
planted prompt cannot move the cursor, recolour or retitle the terminal. Cells are plain text,
never rich markup.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from rich.table import Table
from rich.text import Text

#: Characters a terminal interprets or that reorder what is shown: C0 and C1 controls, DEL,
#: zero-width and bidirectional formatting characters, line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")
#: The same characters, minus those JSON already escapes (C0).
_UNSAFE_IN_JSON = re.compile("[\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def safe_text(text: str) -> str:
    """``text`` with every :data:`_UNSAFE` character written as its Python escape."""
    return _UNSAFE.sub(lambda m: m.group().encode("unicode_escape").decode("ascii"), text)


def clean(obj: Any) -> Any:
    """``obj`` with non-finite floats replaced by None, recursively (JSON has no NaN)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def json_default(obj: Any) -> Any:
    """JSON for what ``json`` cannot write: Neo4j temporals as ISO text, sets sorted."""
    if hasattr(obj, "iso_format"):
        return obj.iso_format()
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    return str(obj)


def to_json(obj: Any, *, indent: int | None = 2) -> str:
    """``obj`` as JSON text, safe to print to a terminal and exact when parsed back."""
    text = json.dumps(clean(obj), default=json_default, ensure_ascii=False, indent=indent)
    return _UNSAFE_IN_JSON.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def fmt(value: Any) -> str:
    """One table cell: floats to four significant digits, lists joined, None empty, text made
    safe (:func:`safe_text`)."""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(fmt(x) for x in value)
    return "" if value is None else safe_text(str(value))


def table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None
) -> Table:
    """A rich table of ``rows`` (one column per key in ``columns``), cells as plain text."""
    out = Table(title=Text(safe_text(title)) if title else None)
    for column in columns:
        out.add_column(Text(safe_text(column)))
    for row in rows:
        out.add_row(*[Text(fmt(row.get(c))) for c in columns])
    return out
