"""What the store's commands share: opening the driver, the ``--format`` option, printing.

Printing goes through :mod:`atlas.present` (the same tables and JSON as the demo); this module
only adds click and the console.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any

import click

from atlas.cli import get_settings

FORMAT = click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "json"]),
    default="table",
    show_default=True,
    help="Output format.",
)


def progress(message: str) -> None:
    """A progress line on stderr (stdout stays the command's answer)."""
    click.echo(message, err=True)


@contextlib.contextmanager
def quiet_driver_logs() -> Iterator[None]:
    """Keep the driver's own warnings (retry notices, defunct connections) off stderr unless
    ``-v`` was given: the command reports what matters in one line."""
    driver_logger = logging.getLogger("neo4j")
    before = driver_logger.level
    if logging.getLogger().getEffectiveLevel() >= logging.WARNING:
        driver_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        driver_logger.setLevel(before)


@contextlib.contextmanager
def atlas_driver(
    *, start_local: bool = True, max_transaction_retry_time_s: float = 30.0
) -> Iterator[Any]:
    """A connected driver for the settings' Neo4j, closed on exit. ``start_local`` starts the
    local launcher first when no ``NEO4J_URI`` is set and it is not running."""
    from atlas.store.connection import ensure_local_neo4j, open_driver

    settings = get_settings()
    with quiet_driver_logs():
        if start_local:
            ensure_local_neo4j(settings, progress=progress)
        driver = open_driver(settings, max_transaction_retry_time_s=max_transaction_retry_time_s)
        try:
            yield driver
        finally:
            driver.close()


def database() -> str:
    """The configured database name."""
    return str(get_settings().neo4j_database)


def timeout() -> float:
    """The configured server-side query timeout, in seconds."""
    return float(get_settings().query_timeout_s)


def emit_json(obj: Any) -> None:
    """``obj`` as JSON on stdout (:func:`atlas.present.to_json`)."""
    from atlas.present import to_json

    click.echo(to_json(obj))


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], title: str | None = None
) -> None:
    """``rows`` as a table on stdout (:func:`atlas.present.table`)."""
    from rich.console import Console

    from atlas.present import table

    Console().print(table(rows, columns, title))


def output(rows: list[dict[str, Any]], fmt: str, columns: Sequence[str], title: str) -> None:
    """``rows`` as JSON or as a table, per ``--format``."""
    if fmt == "json":
        emit_json(rows)
    else:
        print_table(rows, columns, title)


def echo_safe(text: str) -> None:
    """A line of stored text (a name, a pattern) on stdout, control characters escaped."""
    from atlas.present import safe_text

    click.echo(safe_text(text))
