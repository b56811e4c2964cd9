"""``atlas serve``: a read-only HTTP API over the atlas and one page to browse it.

:func:`atlas.web.app.create_app` builds the Starlette application (the API under ``/api``, the
page's static files under ``/``); :func:`serve_command` is the command line that opens the page
(the demo prints it).
"""

from __future__ import annotations

import shlex
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8765


def serve_command(
    host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, atlas_home: str | Path | None = None
) -> str:
    """How to open the page: the shell line that serves it (``ATLAS_HOME=...`` first when the
    atlas lives in another home, e.g. the demo's) and the address to open, on two lines."""
    flags = "" if (host, port) == (DEFAULT_HOST, DEFAULT_PORT) else f" --host {host} --port {port}"
    env = f"ATLAS_HOME={shlex.quote(str(atlas_home))} " if atlas_home is not None else ""
    shown = f"[{host}]" if ":" in host else host
    return f"{env}atlas serve{flags}\nthen open http://{shown}:{port}/"
