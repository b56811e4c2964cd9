"""``atlas serve``: the read-only page and HTTP API over the atlas (loopback by default)."""

from __future__ import annotations

import click

from atlas.cli import get_settings
from atlas.web import DEFAULT_HOST, DEFAULT_PORT


@click.command()
@click.option("--host", default=DEFAULT_HOST, show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(1, 65535), default=DEFAULT_PORT, show_default=True)
def serve(host: str, port: int) -> None:
    """Serve the page that browses the atlas (prompts, circuits, features, supernodes, the named
    queries, interventions) and its read-only JSON API under /api.

    It only reads: READ transactions with QUERY_TIMEOUT_S, raw Cypher behind the guard of
    `atlas cypher`, every list capped. It listens on loopback unless --host says otherwise;
    anyone who can reach the address can read the whole atlas.
    """
    import uvicorn

    from atlas.cli._common import progress, quiet_driver_logs
    from atlas.errors import ConfigError
    from atlas.services._proc import port_in_use
    from atlas.store.connection import ensure_local_neo4j, open_driver
    from atlas.web.app import create_app

    settings = get_settings()
    try:
        busy = ":" not in host and port_in_use(port, host)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}: {exc.strerror or exc}") from exc
    if busy:
        raise ConfigError(f"port {port} on {host} is in use: choose another with --port")
    with quiet_driver_logs():
        ensure_local_neo4j(settings, progress=progress)
        driver = open_driver(settings)
    try:
        app = create_app(settings, driver=driver, host=host)
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"serving the atlas on http://{shown}:{port}/ (Ctrl-C stops)", err=True)
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    finally:
        driver.close()
