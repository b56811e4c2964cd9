"""The prompt-filter parser (no database): terms, negation, one-line refusals."""

from __future__ import annotations

import pytest

from atlas.errors import InputError
from atlas.store.prompt_filter import Term, parse_filter


def test_terms_and_negation() -> None:
    f = parse_filter(" tag:six-finger & answer:5 & !text:spider|dog ")
    assert f.terms == (
        Term("tag", "six-finger"),
        Term("answer", "5"),
        Term("text", "spider|dog", negate=True),
    )
    assert str(f) == "tag:six-finger & answer:5 & !text:spider|dog"
    assert parse_filter(None).terms == (Term("all", ""),)
    assert parse_filter("").terms == (Term("all", ""),)
    assert parse_filter("job:abc & supernode:Hand & id:0a").terms[1] == Term("supernode", "Hand")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("colour:red", "unknown prompt filter"),
        ("text:", "needs a value"),
        ("tag", "needs a value"),
        ("text:a & ", "empty term"),
        ("text:(", "bad regular expression"),
        ("id:xyz", "hexadecimal"),
        ("all:x", "takes no value"),
        ("x" * 2000, "longer than"),
    ],
)
def test_refusals_are_one_line(text: str, needle: str) -> None:
    with pytest.raises(InputError, match=needle) as exc:
        parse_filter(text)
    assert "\n" not in str(exc.value)
