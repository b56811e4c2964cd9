"""Applying the versioned schema (``schema/*.cypher``) to Neo4j.

Files are applied in name order. Statements end with ``;`` at the end of a line; ``//``
comments are allowed (whole lines or trailing). Every statement should be idempotent
(``CREATE ... IF NOT EXISTS``), so applying the schema twice changes nothing. A file that ran to
the end is recorded in the database (``(:SchemaMigration {name, sha256})``) and skipped next
time unless its text changed: a backfill that scans every aggregate runs once, not on every
``atlas import``. After the last file we wait until every index is ONLINE
(``CALL db.awaitIndexes``).
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from atlas.errors import ConfigError
from atlas.store import queries
from atlas.store.connection import session as open_session
from atlas.store.connection import translate_neo4j_error

if TYPE_CHECKING:
    import neo4j

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchemaReport:
    """What :func:`apply_schema` did."""

    files: list[str]
    statements: int
    indexes_online: int
    #: files already recorded with the same text, hence not run again
    skipped: list[str] = field(default_factory=list)


def default_schema_dir() -> Path:
    """``schema/`` at the repository root."""
    return Path(__file__).resolve().parents[2] / "schema"


def _strip_comment(line: str) -> str:
    """``line`` without a ``//`` comment that is outside quotes and backticks."""
    quote: str | None = None
    i = 0
    while i < len(line):
        char = line[i]
        if quote:
            if char == "\\" and quote != "`":
                i += 2
                continue
            if char == quote:
                quote = None
        elif char in ("'", '"', "`"):
            quote = char
        elif line.startswith("//", i):
            return line[:i]
        i += 1
    return line


def split_statements(text: str) -> list[str]:
    """Split a ``.cypher`` file into statements (``;`` at line ends; ``//`` comments dropped)."""
    statements: list[str] = []
    current: list[str] = []
    for raw in text.splitlines():
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        if line.endswith(";"):
            current.append(line[:-1])
            statement = "\n".join(current).strip()
            if statement:
                statements.append(statement)
            current = []
        else:
            current.append(line)
    tail = "\n".join(current).strip()
    if tail:
        statements.append(tail)
    return statements


def schema_files(schema_dir: Path | None = None) -> list[Path]:
    """The ``.cypher`` files of ``schema_dir``, in name order."""
    directory = schema_dir or default_schema_dir()
    if not directory.is_dir():
        raise ConfigError(f"schema directory {directory} not found")
    return sorted(directory.glob("*.cypher"), key=lambda path: path.name)


def apply_schema(
    driver: neo4j.Driver,
    schema_dir: Path | None = None,
    *,
    database: str = "neo4j",
    await_timeout_s: int = 300,
    force: bool = False,
) -> SchemaReport:
    """Apply each schema file not yet recorded with its current text (each statement in its own
    auto-commit transaction), record it, then wait for all indexes to come ONLINE. Idempotent
    when the files use ``IF NOT EXISTS``; ``force`` re-applies every file."""
    import neo4j.exceptions as neo4j_errors

    files = schema_files(schema_dir)
    count = 0
    skipped: list[str] = []
    where = "reading the schema ledger"
    try:
        with open_session(driver, database) as session:
            done = {r["name"]: r["sha256"] for r in session.run(queries.SCHEMA_APPLIED)}
            for path in files:
                text = path.read_text()
                digest = hashlib.sha256(text.encode()).hexdigest()
                if not force and done.get(path.name) == digest:
                    skipped.append(path.name)
                    continue
                for number, statement in enumerate(split_statements(text), 1):
                    where = f"{path.name} statement {number}"
                    logger.debug("%s: %s", where, statement)
                    session.run(statement).consume()
                    count += 1
                where = f"recording {path.name}"
                session.run(queries.SCHEMA_RECORD, name=path.name, sha256=digest).consume()
                logger.info("applied %s", path.name)
            where = "awaiting indexes"
            session.run(queries.AWAIT_INDEXES, timeout_s=await_timeout_s).consume()
            online = sum(
                1 for record in session.run(queries.SHOW_INDEXES) if record["state"] == "ONLINE"
            )
    except (neo4j_errors.Neo4jError, neo4j_errors.DriverError) as exc:
        raise translate_neo4j_error(exc, f"applying the schema failed at {where}") from exc
    return SchemaReport(
        files=[p.name for p in files], statements=count, indexes_online=online, skipped=skipped
    )
