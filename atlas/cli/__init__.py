"""The ``atlas`` command line. Thin: parses arguments, builds the settings, calls the library.

Sub-commands live in one module each and are imported lazily, so ``atlas --help`` is instant and
heavy libraries (torch, neo4j) load only inside the command that needs them.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from typing import Any

import click

from atlas.errors import AtlasError

#: command name -> "module:attribute" (a click command or group)
_COMMANDS: dict[str, str] = {
    "db": "atlas.cli.db:db",
    "attribute": "atlas.cli.attribute:attribute",
    "toy": "atlas.cli.toy:toy",
    "import": "atlas.cli.transfer:import_cmd",
    "export": "atlas.cli.export:export",
    "query": "atlas.cli.query:query",
    "cypher": "atlas.cli.query:cypher",
    "supernode": "atlas.cli.supernode:supernode",
    "annotate": "atlas.cli.annotate:annotate",
    "enqueue": "atlas.cli.jobs:enqueue",
    "batch": "atlas.cli.jobs:batch",
    "jobs": "atlas.cli.jobs:jobs",
    "worker": "atlas.cli.worker:worker",
    "demo": "atlas.cli.demo:demo",
    "draw": "atlas.cli.draw:draw",
    "serve": "atlas.cli.serve:serve",
    "intervene": "atlas.cli.intervene:intervene",
    "validate": "atlas.cli.intervene:validate",
    "steer-vector": "atlas.cli.intervene:steer_vector",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(_COMMANDS) | set(super().list_commands(ctx)))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return super().get_command(ctx, cmd_name)
        module_name, attr = target.split(":")
        module = importlib.import_module(module_name)
        command = getattr(module, attr, None)
        return command if isinstance(command, click.Command) else None


@click.group(cls=_LazyGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
@click.pass_context
def cli(ctx: click.Context, verbose: int) -> None:
    """Circuit Atlas: attribution graphs for many prompts, queried across prompts in Neo4j."""
    from atlas.logs import quiet_service_loggers, redact_handlers

    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    quiet_service_loggers(debug=verbose >= 2)
    redact_handlers()
    ctx.ensure_object(dict)


def get_settings(ctx: click.Context | None = None) -> Any:
    """Build the settings once per CLI invocation (the entry point owns them)."""
    from atlas.settings import AtlasSettings

    ctx = ctx or click.get_current_context()
    obj = ctx.find_root().ensure_object(dict)
    if "settings" not in obj:
        obj["settings"] = _build_settings(AtlasSettings)
    return obj["settings"]


def _build_settings(factory: Any) -> Any:
    """The settings from the environment; a bad value is one line naming its variable."""
    from pydantic import ValidationError

    from atlas.errors import ConfigError

    try:
        return factory()
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            name = ".".join(str(x) for x in err.get("loc", ())).upper() or "settings"
            msg = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
            problems.append(f"{name}: {msg}")
        raise ConfigError("bad settings: " + "; ".join(problems)) from exc


def _shown(exc: BaseException) -> str:
    """An error as the user sees it: one line, URLs without their passwords."""
    from atlas.settings import redact_urls

    return redact_urls(" ".join(str(exc).split())) or type(exc).__name__


def main(argv: list[str] | None = None) -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit.

    In non-standalone mode click returns a command's ``Exit`` code instead of exiting, so the code
    it returns is this process's exit status (a batch with failed prompts exits 1).
    """
    try:
        code = cli.main(args=argv, standalone_mode=False, prog_name="atlas")
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except AtlasError as exc:
        click.echo(f"error: {_shown(exc)}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


#: set by a command whose finished process needs none of Python's interpreter teardown
_TEARDOWN = {"skip": False}


def skip_teardown() -> None:
    """Let the console script end this process without Python's interpreter teardown once the
    command returns (:func:`run`). For commands that have written and closed everything they
    produce and hold no service connection, worker or temporary file: tearing down torch's and
    transformers' thousands of modules and objects costs ~0.8 CPU seconds on 2 cores and does
    nothing a finished process needs."""
    _TEARDOWN["skip"] = True


def run() -> None:
    """The ``atlas`` console script: :func:`main` (errors exit through it as usual); after a
    command that called :func:`skip_teardown` returns, stdout, stderr and the logging handlers
    are flushed and the process ends with status 0 at once."""
    main()
    if _TEARDOWN["skip"]:
        sys.stdout.flush()
        sys.stderr.flush()
        logging.shutdown()
        os._exit(0)
