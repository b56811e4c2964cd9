"""Read-only execution of user Cypher (``atlas cypher``).

Layers of defence, each enough to refuse the usual attempts:

1. text: ``LOAD CSV``, ``CALL { } IN TRANSACTIONS`` and ``USING PERIODIC COMMIT`` are refused
   outright (file and URL access; they are not writes, so the query type would not catch them);
2. ``EXPLAIN`` first: the summary's ``query_type`` must be ``"r"`` and no plan operator may load
   files or call a procedure outside a read-only allow list (``db.*`` schema/label listings);
   admin commands do not plan as ``"r"`` and are refused;
3. the query then runs in a READ transaction (the server rejects writes in it), with a server
   timeout (``settings.query_timeout_s``) and a row cap (``settings.cypher_row_cap``).

READ routing alone is not access control; the point is the combination.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import neo4j
import neo4j.exceptions

from atlas.errors import CypherRefused, InputError
from atlas.store.ingest import translate_neo4j_error

log = logging.getLogger(__name__)

_TEXT_REFUSALS = [
    (re.compile(r"\bLOAD\s+CSV\b", re.IGNORECASE), "LOAD CSV (file/URL access) is not allowed"),
    (
        re.compile(r"\bIN\s+TRANSACTIONS\b", re.IGNORECASE),
        "CALL ... IN TRANSACTIONS is not allowed",
    ),
    (re.compile(r"\bPERIODIC\s+COMMIT\b", re.IGNORECASE), "PERIODIC COMMIT is not allowed"),
]

#: procedures a read-only query may call (prefix match on the fully qualified name)
ALLOWED_PROCEDURES = (
    "db.labels",
    "db.relationshiptypes",
    "db.propertykeys",
    "db.schema.visualization",
    "db.schema.nodetypeproperties",
    "db.schema.reltypeproperties",
    "db.indexes",
    "db.constraints",
    "db.ping",
)

_PROC_IN_DETAILS = re.compile(r"([A-Za-z_][\w]*(?:\.[A-Za-z_`][\w`]*)+)\s*\(")


@dataclass
class CypherResult:
    """Rows of a raw query (at most the row cap), their keys, and whether the cap cut them."""

    keys: list[str]
    rows: list[dict[str, Any]]
    truncated: bool


def _walk(plan: Any) -> list[dict[str, Any]]:
    if not plan:
        return []
    out = [plan]
    for child in plan.get("children", []) if isinstance(plan, dict) else []:
        out.extend(_walk(child))
    return out


def _check_plan(plan: Any) -> None:
    for op in _walk(plan):
        op_type = str(op.get("operatorType", ""))
        base = op_type.split("@")[0].lower()
        if "loadcsv" in base:
            raise CypherRefused("refused: LOAD CSV (file/URL access) is not allowed")
        if "procedurecall" in base or "procedure" in base:
            details = str(op.get("args", {}).get("Details", ""))
            names = [n.replace("`", "").lower() for n in _PROC_IN_DETAILS.findall(details)]
            if not names:
                raise CypherRefused("refused: procedure calls are not allowed")
            for name in names:
                if not name.startswith(ALLOWED_PROCEDURES):
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
    """Raise :class:`CypherRefused` unless ``text`` plans as a read-only query."""
    if not text.strip():
        raise CypherRefused("refused: empty query")
    for pattern, message in _TEXT_REFUSALS:
        if pattern.search(text):
            raise CypherRefused(f"refused: {message}")
    if re.match(r"^\s*(EXPLAIN|PROFILE)\b", text, re.IGNORECASE):
        raise CypherRefused("refused: write the query without EXPLAIN/PROFILE")
    try:
        with driver.session(database=database, default_access_mode=neo4j.READ_ACCESS) as session:
            summary = session.run("EXPLAIN " + text, params or {}).consume()
    except neo4j.exceptions.ClientError as exc:
        raise CypherRefused(
            f"refused: Neo4j cannot plan it as a read query: {exc.message}"
        ) from exc
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError) as exc:
        raise translate_neo4j_error(exc, "planning query") from exc
    if summary.query_type != "r":
        raise CypherRefused(
            f"refused: only read-only queries may run (query type {summary.query_type!r})"
        )
    _check_plan(summary.plan)


def run_cypher(
    driver: neo4j.Driver,
    text: str,
    params: dict[str, Any] | None = None,
    *,
    database: str | None = None,
    timeout_s: float = 30.0,
    row_cap: int = 10_000,
) -> CypherResult:
    """Check that ``text`` is read-only, then run it in a READ transaction with a timeout."""
    check_read_only(driver, text, params, database=database)

    @neo4j.unit_of_work(timeout=timeout_s)
    def work(tx: neo4j.ManagedTransaction) -> CypherResult:
        result = tx.run(text, params or {})
        keys = list(result.keys())
        rows: list[dict[str, Any]] = []
        truncated = False
        for rec in result:
            if len(rows) >= row_cap:
                truncated = True
                break
            rows.append(rec.data())
        return CypherResult(keys, rows, truncated)

    try:
        with driver.session(database=database, default_access_mode=neo4j.READ_ACCESS) as session:
            return session.execute_read(work)
    except neo4j.exceptions.ClientError as exc:
        if "AccessMode" in (exc.code or "") or "Forbidden" in (exc.code or ""):
            raise CypherRefused(f"refused: {exc.message}") from exc
        raise translate_neo4j_error(exc, "cypher") from exc
    except (neo4j.exceptions.Neo4jError, neo4j.exceptions.DriverError) as exc:
        raise translate_neo4j_error(exc, "cypher") from exc


def parse_params(pairs: list[str]) -> dict[str, Any]:
    """``k=v`` pairs from the CLI; values are parsed as JSON when possible, else kept as text."""
    import json

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
