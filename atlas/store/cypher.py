"""Read-only execution of user Cypher (``atlas cypher``): queries over the graph, nothing else.

Layers of defence, each enough to refuse the usual attempts:

1. text (before anything is sent; string literals and comments are told apart from keywords):
   ``LOAD CSV``, ``CALL { } IN TRANSACTIONS``, ``USING PERIODIC COMMIT`` (file and URL access,
   not writes, so the query type would not catch them); ``SHOW ...`` and ``TERMINATE ...``
   commands (other clients' transactions, settings, users: not the graph); ``USE`` (the query
   runs on the configured database only); ``CALL`` of a procedure outside
   :data:`ALLOWED_PROCEDURES`; and ``=~`` with a pattern whose cost Neo4j cannot bound (see
   :func:`regex_risk`), because the server checks its timeout only between evaluations;
2. ``EXPLAIN`` first: the summary's ``query_type`` must be ``"r"`` and no plan operator may be a
   command (``Show*``, ``Terminate*``, administration), load files or call a procedure outside
   the allow list;
3. the query then runs in a READ transaction (the server rejects writes in it), with a server
   timeout, a row cap and a cap on the bytes of values received (a result over it stops as the
   records arrive, with one line).

READ routing alone is not access control; the point is the combination.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import neo4j
import neo4j.exceptions
import neo4j.graph

from atlas.errors import CypherRefused, InputError
from atlas.store.connection import read_tx, session, translate_neo4j_error

log = logging.getLogger(__name__)

#: Procedures a query may call: the graph's own vocabulary and schema, nothing about the server,
#: its settings, users or other clients. Exact names, plus everything under ``db.schema.``.
ALLOWED_PROCEDURES = frozenset({"db.labels", "db.relationshiptypes", "db.propertykeys"})
ALLOWED_PROCEDURE_PREFIXES = ("db.schema.",)

#: Longest ``=~`` pattern accepted, and most variable repetitions (``*``, ``+``, ``{n,m}``) in
#: one: each one multiplies the cost of a failing match by the subject's length.
MAX_REGEX_LEN = 200
MAX_REGEX_REPEATS = 3

#: Records the driver fetches per round trip for raw Cypher: small, so the byte cap stops a
#: result of large rows after little more than the cap has arrived.
FETCH_SIZE = 100

_PROC_IN_DETAILS = re.compile(r"([A-Za-z_][\w]*(?:\.[A-Za-z_`][\w`]*)+)\s*\(")
_COMMAND_OPERATORS = ("show", "terminate", "administrationcommand")


@dataclass
class CypherResult:
    """Rows of a raw query (at most the row cap), their keys, and whether the cap cut them."""

    keys: list[str]
    rows: list[dict[str, Any]]
    truncated: bool


class ResultTooLarge(InputError):
    """A raw query's values passed the byte cap (``settings.cypher_result_mb``)."""


# --------------------------------------------------------------------------- lexing
class Token(NamedTuple):
    """One lexical token of a Cypher text: ``kind`` is ``word`` (identifier or keyword),
    ``name`` (backticked), ``string`` (``value`` decoded), ``param``, ``number`` or ``op``."""

    kind: str
    value: str


_ESCAPES = {"\\": "\\", "'": "'", '"': '"', "n": "\n", "r": "\r", "t": "\t", "b": "\b", "f": "\f"}
_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_NUMBER = re.compile(r"[0-9][0-9A-Za-z_.]*")
_TWO_CHAR_OPS = ("=~", "<>", "<=", ">=", "->", "<-", "..", "::")


def tokens(text: str) -> Iterator[Token]:
    """The tokens of ``text``, comments and whitespace dropped. Lenient: the server parses for
    real; this only has to tell keywords from the inside of strings, names and comments."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif text.startswith("/*", i):
            end = text.find("*/", i + 2)
            i = n if end < 0 else end + 2
        elif c in "'\"":
            value, i = _string(text, i)
            yield Token("string", value)
        elif c == "`":
            value, i = _backticked(text, i)
            yield Token("name", value)
        elif c == "$":
            if text.startswith("`", i + 1):
                value, i = _backticked(text, i + 1)
            else:
                m = _WORD.match(text, i + 1) or _NUMBER.match(text, i + 1)
                value = m.group() if m else ""
                i = m.end() if m else i + 1
            yield Token("param", value)
        elif m := _WORD.match(text, i):
            yield Token("word", m.group())
            i = m.end()
        elif m := _NUMBER.match(text, i):
            yield Token("number", m.group())
            i = m.end()
        else:
            op = next((o for o in _TWO_CHAR_OPS if text.startswith(o, i)), c)
            yield Token("op", op)
            i += len(op)


def _string(text: str, start: int) -> tuple[str, int]:
    """The decoded value of the string literal at ``start`` and the index after it."""
    quote, i = text[start], start + 1
    out: list[str] = []
    while i < len(text):
        c = text[i]
        if c == quote:
            return "".join(out), i + 1
        if c == "\\" and i + 1 < len(text):
            e = text[i + 1]
            if e in "uU":
                width = 4 if e == "u" else 8
                digits = text[i + 2 : i + 2 + width]
                if re.fullmatch(r"[0-9A-Fa-f]+", digits or "x") and len(digits) == width:
                    out.append(chr(int(digits, 16)))
                    i += 2 + width
                    continue
            out.append(_ESCAPES.get(e, "\\" + e))
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out), i


def _backticked(text: str, start: int) -> tuple[str, int]:
    """The name inside the backticks at ``start`` (doubled backticks escape one)."""
    i = start + 1
    out: list[str] = []
    while i < len(text):
        if text[i] == "`":
            if text.startswith("``", i):
                out.append("`")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(text[i])
        i += 1
    return "".join(out), i


# --------------------------------------------------------------------------- text checks
def _keyword(toks: list[Token], j: int) -> str | None:
    """The upper-cased word at ``j`` when it stands as a keyword: not a property (``n.show``),
    a label or type (``:Show``), a map key (``{show: 1}``) or a procedure name part."""
    tok = toks[j]
    if tok.kind != "word":
        return None
    before = toks[j - 1].value if j > 0 and toks[j - 1].kind == "op" else ""
    after = toks[j + 1].value if j + 1 < len(toks) and toks[j + 1].kind == "op" else ""
    if before in (".", ":", "|", "&", "!") or after in (":", "."):
        return None
    return tok.value.upper()


def _next_word(toks: list[Token], j: int) -> str:
    return toks[j + 1].value.upper() if j + 1 < len(toks) and toks[j + 1].kind == "word" else ""


def _procedure_name(toks: list[Token], j: int) -> str | None:
    """The dotted name after ``CALL`` at ``j`` (None for a ``CALL { }`` / ``CALL () { }``)."""
    parts: list[str] = []
    k = j + 1
    while k < len(toks) and toks[k].kind in ("word", "name"):
        parts.append(toks[k].value)
        if k + 1 < len(toks) and toks[k + 1] == Token("op", "."):
            k += 2
            continue
        break
    return ".".join(parts).lower() if parts else None


def procedure_allowed(name: str) -> bool:
    """Whether a (lower-cased, fully qualified) procedure may be called."""
    return name in ALLOWED_PROCEDURES or name.startswith(ALLOWED_PROCEDURE_PREFIXES)


def check_text(text: str, params: dict[str, Any] | None = None) -> None:
    """Refuse (:class:`CypherRefused`, one line) what the text alone shows is not a query over
    the graph. Needs no database."""
    if not text.strip():
        raise CypherRefused("refused: empty query")
    toks = list(tokens(text))
    if not toks:
        raise CypherRefused("refused: empty query")
    for j in range(len(toks)):
        word = _keyword(toks, j)
        if word is None:
            if toks[j] == Token("op", "=~"):
                _check_regex_operand(toks, j, params or {})
            continue
        nxt = _next_word(toks, j)
        if j == 0 and word in ("EXPLAIN", "PROFILE"):
            raise CypherRefused("refused: write the query without EXPLAIN/PROFILE")
        if word == "LOAD" and nxt == "CSV":
            raise CypherRefused("refused: LOAD CSV (file/URL access) is not allowed")
        if word == "IN" and nxt == "TRANSACTIONS":
            raise CypherRefused("refused: CALL ... IN TRANSACTIONS is not allowed")
        if word == "PERIODIC" and nxt == "COMMIT":
            raise CypherRefused("refused: PERIODIC COMMIT is not allowed")
        if word in ("SHOW", "TERMINATE"):
            raise CypherRefused(
                f"refused: {word} {nxt or '...'} is a server command; atlas cypher runs queries "
                "over the graph only"
            )
        if word == "USE":
            raise CypherRefused(
                "refused: USE is not allowed; the query runs on the configured database"
            )
        if word == "CALL":
            name = _procedure_name(toks, j)
            if name is not None and not procedure_allowed(name):
                raise CypherRefused(f"refused: procedure {name} is not on the read-only allow list")


def _check_regex_operand(toks: list[Token], j: int, params: dict[str, Any]) -> None:
    """The right side of ``=~`` must be one string literal or one string parameter, and its
    pattern of bounded cost."""
    operand = toks[j + 1] if j + 1 < len(toks) else None
    follow = toks[j + 2] if j + 2 < len(toks) else None
    if operand is None or operand.kind not in ("string", "param"):
        raise CypherRefused("refused: =~ takes a string literal or a $parameter as its pattern")
    if follow is not None and follow.kind == "op" and follow.value in "+-*/%^[.(":
        raise CypherRefused("refused: =~ takes a single string literal or $parameter")
    pattern = operand.value
    if operand.kind == "param":
        value = params.get(pattern)
        if not isinstance(value, str):
            raise CypherRefused(f"refused: =~ ${pattern} must be given as a string parameter")
        pattern = value
    risk = regex_risk(pattern)
    if risk is not None:
        raise CypherRefused(f"refused: =~ pattern {pattern[:60]!r} {risk}")


# --------------------------------------------------------------------------- regex cost
@dataclass
class _Group:
    quantified: bool = False  # holds a quantifier (at any depth)
    alternation: bool = False  # holds a | (at any depth)


def regex_risk(pattern: str) -> str | None:
    """Why ``pattern`` may backtrack without bound in a backtracking engine (Java's, which runs
    ``=~``), or None. Dialect-neutral shape rules, not a parse:

    * longer than :data:`MAX_REGEX_LEN`;
    * a repeated group that holds a quantifier or an alternation (``(a+)+``, ``(a|aa)*``,
      ``(a?){30}``): exponential;
    * more than :data:`MAX_REGEX_REPEATS` variable repetitions (``.*.*.*.*x``): polynomial of
      that degree in the subject's length.
    """
    if len(pattern) > MAX_REGEX_LEN:
        return f"is longer than {MAX_REGEX_LEN} characters"
    stack = [_Group()]
    last: _Group | str | None = None  # the atom a quantifier would apply to
    repeats = 0
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "\\":
            i = _skip_escape(pattern, i)
            last = "atom"
        elif c == "[":
            i = _skip_class(pattern, i)
            last = "atom"
        elif c == "(":
            stack.append(_Group())
            i = _skip_group_flags(pattern, i + 1)
            last = None
        elif c == ")":
            group = stack.pop() if len(stack) > 1 else _Group()
            stack[-1].quantified |= group.quantified
            stack[-1].alternation |= group.alternation
            last = group
            i += 1
        elif c == "|":
            stack[-1].alternation = True
            last = None
            i += 1
        elif c in "*+?{" and last is not None:
            quant = _quantifier(pattern, i)
            if quant is None:  # a literal "{"
                last = "atom"
                i += 1
                continue
            low, high, i = quant
            if high > 1 and isinstance(last, _Group) and (last.quantified or last.alternation):
                return (
                    "repeats a group that holds a quantifier or |, which backtracks exponentially"
                )
            if high > low and high > 1:
                repeats += 1
            stack[-1].quantified = True
            last = None
        else:
            last = "atom"
            i += 1
    if repeats > MAX_REGEX_REPEATS:
        return f"has more than {MAX_REGEX_REPEATS} repetitions (*, +, {{n,m}}), which backtrack"
    return None


_INF = 1 << 30


def _quantifier(p: str, i: int) -> tuple[int, int, int] | None:
    """``(min, max, index after)`` of the quantifier at ``i`` (lazy and possessive suffixes
    included), or None when a ``{`` there is a literal."""
    c = p[i]
    if c == "{":
        m = re.match(r"\{(\d*)(,?)(\d*)\}", p[i:])
        if m is None or not (m.group(1) or m.group(3)):
            return None
        low = int(m.group(1) or 0)
        high = int(m.group(3)) if m.group(3) else (_INF if m.group(2) else low)
        j = i + m.end()
    else:
        low, high = {"*": (0, _INF), "+": (1, _INF), "?": (0, 1)}[c]
        j = i + 1
    if j < len(p) and p[j] in "?+":
        j += 1
    return low, high, j


def _skip_escape(p: str, i: int) -> int:
    """Index after the escape at ``i``: ``\\Q...\\E`` quotes, ``\\p{..}``-style braces."""
    if p.startswith("\\Q", i):
        end = p.find("\\E", i + 2)
        return len(p) if end < 0 else end + 2
    if i + 2 < len(p) and p[i + 1] in "pPNkxgu" and p[i + 2] == "{":
        end = p.find("}", i + 2)
        return len(p) if end < 0 else end + 1
    return i + 2


def _skip_class(p: str, i: int) -> int:
    """Index after the character class opening at ``i`` (nested classes, escapes)."""
    depth, j = 0, i
    while j < len(p):
        c = p[j]
        if c == "\\":
            j += 2
            continue
        if c == "[":
            depth += 1
            if p.startswith("^", j + 1):
                j += 1
            if p.startswith("]", j + 1):
                j += 1
        elif c == "]":
            depth -= 1
            if depth == 0:
                return j + 1
        j += 1
    return len(p)


def _skip_group_flags(p: str, i: int) -> int:
    """Index after a group's opening syntax (``?:``, ``?i``, ``?<name>``, ``?=``, ...)."""
    if not p.startswith("?", i):
        return i
    j = i + 1
    while j < len(p) and (p[j].isalpha() or p[j] == "-"):
        j += 1
    if p.startswith("<", j) and not p.startswith(("<=", "<!"), j):
        end = p.find(">", j)
        return len(p) if end < 0 else end + 1
    if p.startswith(("<=", "<!"), j):
        return j + 2
    if j < len(p) and p[j] in ":=!>":
        return j + 1
    return j


# --------------------------------------------------------------------------- plan checks
def _walk(plan: Any) -> list[dict[str, Any]]:
    if not plan:
        return []
    out = [plan]
    for child in plan.get("children", []) if isinstance(plan, dict) else []:
        out.extend(_walk(child))
    return out


def _check_plan(plan: Any) -> None:
    for op in _walk(plan):
        base = str(op.get("operatorType", "")).split("@")[0].lower()
        if base.startswith(_COMMAND_OPERATORS):
            raise CypherRefused(
                "refused: server commands are not allowed; atlas cypher runs queries over the "
                "graph only"
            )
        if "loadcsv" in base:
            raise CypherRefused("refused: LOAD CSV (file/URL access) is not allowed")
        if "procedure" in base:
            details = str(op.get("args", {}).get("Details", ""))
            names = [n.replace("`", "").lower() for n in _PROC_IN_DETAILS.findall(details)]
            if not names:
                raise CypherRefused("refused: procedure calls are not allowed")
            for name in names:
                if not procedure_allowed(name):
                    raise CypherRefused(
                        f"refused: procedure {name} is not on the read-only allow list"
                    )


def check_read_only(
    driver: neo4j.Driver,
    text: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None = None,
) -> None:
    """Raise :class:`CypherRefused` unless ``text`` is a read-only query over the graph."""
    check_text(text, params)
    try:
        with session(driver, database, read=True) as s:
            summary = s.run("EXPLAIN " + text, params or {}).consume()
    except neo4j.exceptions.ClientError as exc:
        message = " ".join(str(exc.message or exc).split())[:300]
        raise CypherRefused(f"refused: Neo4j cannot plan it as a read query: {message}") from exc
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError) as exc:
        raise translate_neo4j_error(exc, "planning query") from exc
    if summary.query_type != "r":
        raise CypherRefused(
            f"refused: only read-only queries may run (query type {summary.query_type!r})"
        )
    _check_plan(summary.plan)


# --------------------------------------------------------------------------- running
def value_size(value: Any, budget: int) -> int:
    """Approximate bytes of a result value (8 per number, the length of a string, the sum of a
    collection's parts); counting stops once past ``budget``."""
    if value is None or isinstance(value, bool):
        return 1
    if isinstance(value, int | float):
        return 8
    if isinstance(value, str | bytes | bytearray):
        return len(value) + 1
    if isinstance(value, neo4j.graph.Node | neo4j.graph.Relationship):
        extra = sum(len(x) for x in getattr(value, "labels", ())) + len(getattr(value, "type", ""))
        return 16 + extra + value_size(dict(value.items()), budget)
    if isinstance(value, neo4j.graph.Path):
        return value_size([*value.nodes, *value.relationships], budget)
    if isinstance(value, dict):
        total = 8
        for k, v in value.items():
            total += len(str(k)) + value_size(v, budget - total)
            if total > budget:
                break
        return total
    if isinstance(value, list | tuple | set | frozenset):
        total = 8
        for v in value:
            total += value_size(v, budget - total)
            if total > budget:
                break
        return total
    return len(str(value)) + 1


def run_cypher(
    driver: neo4j.Driver,
    text: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None = None,
    timeout_s: float = 30.0,
    row_cap: int = 10_000,
    max_bytes: int = 64 * 2**20,
) -> CypherResult:
    """Check that ``text`` is a read-only query over the graph, then run it in a READ
    transaction with a timeout, at most ``row_cap`` rows and ``max_bytes`` of values.

    Raises :class:`CypherRefused` for refused text and :class:`ResultTooLarge` once the values
    received pass ``max_bytes`` (the transaction stops there; nothing is returned).
    """
    check_read_only(driver, text, params, database=database)

    def work(tx: neo4j.ManagedTransaction) -> CypherResult:
        try:
            return _collect(tx.run(text, params or {}), row_cap, max_bytes)
        except neo4j.exceptions.ClientError as exc:
            if "AccessMode" in (exc.code or "") or "Forbidden" in (exc.code or ""):
                message = " ".join(str(exc.message or exc).split())[:300]
                raise CypherRefused(f"refused: {message}") from exc
            raise

    return read_tx(
        driver, work, database=database, what="cypher", timeout_s=timeout_s, fetch_size=FETCH_SIZE
    )


def _collect(result: neo4j.Result, row_cap: int, max_bytes: int) -> CypherResult:
    """The rows of ``result`` as they arrive, stopping at the row cap (truncated) or raising
    :class:`ResultTooLarge` past the byte cap (counted before a record is copied)."""
    keys = list(result.keys())
    rows: list[dict[str, Any]] = []
    size = 0
    for record in result:
        if len(rows) >= row_cap:
            return CypherResult(keys, rows, truncated=True)
        size += value_size(record.values(), max_bytes - size)
        if size > max_bytes:
            mb = max_bytes / 2**20
            raise ResultTooLarge(
                f"result over {mb:g} MB; narrow the query or raise CYPHER_RESULT_MB"
            )
        rows.append(record.data())
    return CypherResult(keys, rows, truncated=False)


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs from the CLI; values are parsed as JSON when possible, else kept as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not re.fullmatch(r"[A-Za-z_]\w*", key):
            raise InputError(f"bad parameter {pair!r}: use name=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out
