"""The shared printers: exact JSON, tables that cannot drive the terminal."""

from __future__ import annotations

import json
import math

from rich.console import Console

from atlas.present import clean, fmt, safe_text, table, to_json

HOSTILE = "\x1b]0;owned\x07\x1b[31mred\x1b[0m\u202eevil\x9b2J\x7f\ttab\nline"


def test_safe_text_escapes_every_control_and_reordering_character() -> None:
    shown = safe_text(HOSTILE)
    assert shown == ("\\x1b]0;owned\\x07\\x1b[31mred\\x1b[0m\\u202eevil\\x9b2J\\x7f\\ttab\\nline")
    assert safe_text("Austin, Texas → capital ✓") == "Austin, Texas → capital ✓"


def test_json_is_exact_and_safe_to_print() -> None:
    doc = {"text": HOSTILE, "w": math.nan, "xs": [1.5, math.inf, "é"]}
    text = to_json(doc)
    for raw in ("\x1b", "\x07", "\x9b", "\x7f", "\u202e"):
        assert raw not in text
    assert json.loads(text) == {"text": HOSTILE, "w": None, "xs": [1.5, None, "é"]}
    assert clean((math.nan, 1.0)) == [None, 1.0]


def test_tables_show_stored_text_escaped_and_never_as_markup() -> None:
    console = Console(width=200, record=True, force_terminal=False)
    rows = [{"text": HOSTILE, "label": "[bold red]x[/]", "n": 0.123456, "ids": [1, 2]}]
    console.print(table(rows, ["text", "label", "n", "ids"], title="t\x1b[2J"))
    out = console.export_text()
    assert "\x1b" not in out and "\u202e" not in out
    assert "\\x1b[31mred" in out and "[bold red]x[/]" in out
    assert "0.1235" in out and "1, 2" in out
    assert fmt(None) == "" and fmt(2.0) == "2"
