"""How the demo prints: rich tables on stdout, the Cypher behind each answer, dim pointers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import click


def console() -> Any:
    from rich.console import Console

    return Console(width=max(140, Console().width))


def heading(text: str, detail: str = "") -> None:
    click.echo()
    click.echo(click.style(text, bold=True) + detail)


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    from rich.table import Table

    t = Table(*columns, title=title)
    for row in rows:
        t.add_row(*(str(x) for x in row))
    console().print(t)


def routes_table(aggregate: Sequence[dict[str, Any]], limit: int, first: str, unit: str) -> None:
    """The routes of a paths answer (its ``aggregate``): route, prompts, paths, summed score."""
    table(
        None,
        [first, unit, "paths", "sum of scores"],
        [
            [" -> ".join(g["route"]), g["n_prompts"], g["n_paths"], f"{g['sum_score']:+.4g}"]
            for g in aggregate[:limit]
        ],
    )


def cypher_pointer(name: str, text: str) -> None:
    """The named query an answer came from, and its Cypher."""
    click.echo(click.style(f"Cypher: atlas.store.queries.{name}", dim=True))
    for line in text.strip().splitlines():
        click.echo(click.style(f"    {line}", dim=True))


def cli_pointer(command: str) -> None:
    click.echo(f"CLI: {command}")


def prompt_texts(driver: Any, settings: Any, ids: list[str]) -> dict[str, str]:
    from atlas.store import queries as q

    with driver.session(database=settings.neo4j_database) as session:
        rows = session.run(q.PROMPT_TEXTS, prompt_ids=ids).data()
    return {r["prompt_id"]: r["text"] or "" for r in rows}
