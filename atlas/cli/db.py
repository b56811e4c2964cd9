"""``atlas db``: the Neo4j the project talks to.

With no ``NEO4J_URI`` the commands manage the local launcher (a real Neo4j 5.26 Community run
from Maven Central jars, Bolt on 127.0.0.1, data under ``$ATLAS_HOME/neo4j``). With
``NEO4J_URI`` set there is nothing to start or stop; ``status`` and ``init`` talk to that server.
"""

from __future__ import annotations

import click

from atlas.cli import get_settings
from atlas.cli._common import atlas_driver
from atlas.cli._common import progress as _progress


@click.group()
def db() -> None:
    """Start, stop, check and initialise the Neo4j database."""


@db.command()
def start() -> None:
    """Start the local Neo4j (built with Maven on first use) and print its Bolt URI."""
    from atlas.services import neo4j_local

    settings = get_settings()
    if not settings.uses_local_neo4j:
        click.echo(f"NEO4J_URI is set ({settings.shown_neo4j_uri}): nothing to start")
        return
    try:
        uri = neo4j_local.start(settings, progress=_progress)
    except neo4j_local.LauncherAlreadyRunning as exc:
        click.echo(f"{exc}", err=True)
        click.echo(exc.uri)
        return
    click.echo(uri)


@db.command()
def stop() -> None:
    """Stop the local Neo4j (clean shutdown)."""
    from atlas.services import neo4j_local

    settings = get_settings()
    if not settings.uses_local_neo4j:
        click.echo(f"NEO4J_URI is set ({settings.shown_neo4j_uri}): nothing to stop")
        return
    if neo4j_local.stop(settings):
        click.echo("local Neo4j stopped")
    else:
        click.echo("local Neo4j was not running")


@db.command()
def status() -> None:
    """Say whether the Neo4j answers (exit 1 when it does not)."""
    settings = get_settings()
    if settings.uses_local_neo4j:
        from atlas.services import neo4j_local

        state = neo4j_local.status(settings)
        click.echo(state.describe())
        if not state.answers:
            raise SystemExit(1)
        return
    with atlas_driver(start_local=False) as driver:
        info = driver.get_server_info()
    click.echo(f"Neo4j at {settings.shown_neo4j_uri} answers (server {info.agent})")


@db.command()
@click.option(
    "--schema-dir",
    type=click.Path(exists=True, file_okay=False, path_type=str),
    default=None,
    help="Directory of .cypher files (default: the repository's schema/).",
)
@click.option(
    "--force",
    is_flag=True,
    help="Re-apply files already recorded as applied (e.g. after dropping an index by hand).",
)
def init(schema_dir: str | None, force: bool) -> None:
    """Apply schema/*.cypher (idempotent) and wait until every index is online.

    Files already applied with the same text are skipped (recorded as :SchemaMigration nodes).
    Starts the local Neo4j first when NEO4J_URI is unset and it is not running.
    """
    from pathlib import Path

    from atlas.store.schema import apply_schema

    settings = get_settings()
    with atlas_driver() as driver:
        report = apply_schema(
            driver,
            Path(schema_dir) if schema_dir else None,
            database=settings.neo4j_database,
            force=force,
        )
    click.echo(
        f"schema applied: {len(report.files) - len(report.skipped)} of {len(report.files)} files "
        f"({len(report.skipped)} already applied), {report.statements} statements, "
        f"{report.indexes_online} indexes online"
    )


@db.command()
@click.option("--yes", is_flag=True, help="Really delete every node and relationship.")
def wipe(yes: bool) -> None:
    """Delete all data (constraints and indexes stay)."""
    from atlas.store import queries
    from atlas.store.connection import run_autocommit

    if not yes:
        raise click.UsageError("refusing to wipe without --yes")
    settings = get_settings()
    with atlas_driver(start_local=False) as driver:
        run_autocommit(
            driver, queries.WIPE_DATABASE, database=settings.neo4j_database, what="wiping"
        )
    click.echo(f"wiped {settings.shown_neo4j_uri}")
