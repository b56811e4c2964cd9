"""Prompt filters: which stored prompts a cross-prompt question is asked over.

One parser shared by ``atlas supernode propose --prompts``, ``atlas query global --prompts`` and
``atlas query contrast --a / --b``. A filter is one or more terms joined by ``&`` (all must
hold); a term ``!TERM`` negates it:

    all                  every complete prompt
    text:REGEX           the prompt's text contains a match of REGEX (Python ``regex`` dialect)
    answer:TOKEN         the model's answer (the logit node of highest probability) is TOKEN
                         (whitespace-stripped, as ``logit:TEXT``)
    tag:TAG              the prompt's image carries the tag
    job:ID               the prompt was produced by job ID (its done items)
    supernode:NAME       an instance of one of the supernode's member features is in the prompt
    id:PREFIX            the prompt's id starts with PREFIX (hexadecimal)

e.g. ``tag:six-finger & answer:5`` or ``tag:hand & !tag:six-finger``. Unknown keys, bad
patterns, unknown supernodes or jobs, and filters that select no prompt are one-line
:class:`InputError`\\ s, raised before any question runs.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import neo4j

from atlas.errors import InputError
from atlas.store import queries as Q
from atlas.store.connection import read_rows, read_tx
from atlas.store.read import DEFAULT_TIMEOUT_S, normalise_token_text

#: runs one named read query: ``(query, params, what) -> rows``
Rows = Callable[[str, dict[str, Any], str], list[dict[str, Any]]]

KEYS = ("all", "text", "answer", "tag", "job", "supernode", "id")
MAX_FILTER_LEN = 1000


@dataclass(frozen=True)
class Term:
    """One term of a filter: ``key:value``, negated with ``!``."""

    key: str
    value: str
    negate: bool = False

    def __str__(self) -> str:
        body = self.key if self.key == "all" else f"{self.key}:{self.value}"
        return ("!" if self.negate else "") + body


@dataclass(frozen=True)
class PromptFilter:
    """A parsed filter (all terms must hold)."""

    text: str
    terms: tuple[Term, ...]

    def __str__(self) -> str:
        return " & ".join(str(t) for t in self.terms)


def parse_filter(text: str | None) -> PromptFilter:
    """Parse a filter (``None`` or empty: ``all``); :class:`InputError` names the fault."""
    if text is None or not text.strip():
        return PromptFilter("all", (Term("all", ""),))
    if len(text) > MAX_FILTER_LEN:
        raise InputError(f"prompt filter longer than {MAX_FILTER_LEN} characters")
    terms = []
    for raw in text.split("&"):
        part = raw.strip()
        negate = part.startswith("!")
        part = part[1:].strip() if negate else part
        if not part:
            raise InputError(f"empty term in prompt filter {text!r}")
        key, sep, value = part.partition(":")
        key = key.strip().lower()
        if key not in KEYS:
            raise InputError(
                f"unknown prompt filter {part!r}: use "
                + ", ".join(k if k == "all" else f"{k}:..." for k in KEYS)
                + " (joined with &, ! negates)"
            )
        if key == "all":
            if sep and value.strip():
                raise InputError(f"'all' takes no value in prompt filter {text!r}")
            terms.append(Term("all", "", negate))
            continue
        value = value.strip()
        if not sep or not value:
            raise InputError(f"prompt filter term {part!r} needs a value: {key}:VALUE")
        if key == "text":
            from atlas.store.supernodes import compile_pattern

            compile_pattern(value)
        if key == "id" and not re.fullmatch(r"[0-9a-f]+", value):
            raise InputError(f"bad prompt id prefix {value!r}: expected hexadecimal")
        if key == "supernode":
            from atlas.store.supernodes import validate_name

            value = validate_name(value)
        terms.append(Term(key, value, negate))
    return PromptFilter(text, tuple(terms))


def select_prompts(
    driver: neo4j.Driver,
    flt: PromptFilter | str | None,
    *,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    allow_empty: bool = False,
) -> list[str]:
    """Ids of the complete prompts the filter selects, sorted; an empty selection is an
    :class:`InputError` unless ``allow_empty``."""
    if not isinstance(flt, PromptFilter):
        flt = parse_filter(flt)

    def rows(query: str, params: dict[str, Any], what: str) -> list[dict[str, Any]]:
        return read_rows(driver, query, params, database=database, what=what, timeout_s=timeout_s)

    universe = {str(r["id"]) for r in rows(Q.PF_ALL_PROMPTS, {}, "listing prompts")}
    keep = set(universe)
    # cheap terms first; the model's answer is read only for the prompts still in
    order = sorted(flt.terms, key=lambda t: t.key == "answer")
    for term in order:
        if term.key == "answer":
            chosen = _answer(rows, sorted(keep), term.value)
        else:
            chosen = _term(driver, rows, term, universe, database, timeout_s)
        keep = keep - chosen if term.negate else keep & chosen
    if not keep and not allow_empty:
        raise InputError(f"prompt filter {str(flt)!r} selects no prompt")
    return sorted(keep)


def _answer(rows: Rows, ids: list[str], token: str) -> set[str]:
    token = normalise_token_text(token)
    found = rows(Q.PF_ANSWERS, {"ids": ids}, "reading answers")
    return {str(r["id"]) for r in found if r["answer"] == token}


def _term(
    driver: neo4j.Driver,
    run: Rows,
    term: Term,
    universe: set[str],
    database: str | None,
    timeout_s: float,
) -> set[str]:
    if term.key == "all":
        return set(universe)
    if term.key == "id":
        return {p for p in universe if p.startswith(term.value)}
    if term.key == "tag":
        return {str(r["id"]) for r in run(Q.PF_TAGGED, {"tag": term.value}, "image tags")}
    if term.key == "job":
        if not run(Q.PF_JOB_EXISTS, {"job_id": term.value}, "jobs"):
            raise InputError(f"no job {term.value!r}")
        return {str(r["id"]) for r in run(Q.PF_JOB_PROMPTS, {"job_id": term.value}, "jobs")}
    if term.key == "supernode":
        if not run(Q.SUPERNODE_EXISTS, {"name": term.value}, "supernodes"):
            raise InputError(f"no supernode named {term.value!r}")
        found = run(Q.PF_SUPERNODE_PROMPTS, {"name": term.value}, "supernode prompts")
        return {str(r["id"]) for r in found}
    if term.key == "text":
        return _text_matches(driver, term.value, database, timeout_s)
    raise InputError(f"unknown prompt filter key {term.key!r}")  # pragma: no cover


def _text_matches(
    driver: neo4j.Driver, pattern: str, database: str | None, timeout_s: float
) -> set[str]:
    """Prompts whose text contains a match of ``pattern`` (run in Python under a time budget)."""
    from atlas.store.supernodes import compile_pattern

    compiled = compile_pattern(pattern)
    deadline = time.monotonic() + timeout_s

    def work(tx: neo4j.ManagedTransaction) -> set[str]:
        out = set()
        for record in tx.run(Q.PF_PROMPT_TEXTS):
            left = deadline - time.monotonic()
            try:
                if left <= 0:
                    raise TimeoutError
                if compiled.search(record["text"] or "", timeout=left) is not None:
                    out.add(str(record["id"]))
            except TimeoutError:
                raise InputError(
                    f"text pattern {pattern!r} took longer than {timeout_s:g} s over the "
                    "prompts; simplify it"
                ) from None
        return out

    result: set[str] = read_tx(
        driver, work, database=database, what="matching prompt texts", timeout_s=timeout_s
    )
    return result
