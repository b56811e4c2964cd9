"""``atlas export``: one stored prompt to a file (``atlas export PROMPT_ID --out FILE``), or
stored prompts for the viewers people already have (``atlas export viewer --out DIR``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from atlas.cli._common import atlas_driver, database, progress, timeout
from atlas.cli.transfer import export_cmd


class _ExportGroup(click.Group):
    """``viewer`` is a sub-command; anything else is the one-prompt export's arguments."""

    def resolve_command(
        self, ctx: click.Context, args: list[str]
    ) -> tuple[str | None, click.Command | None, list[str]]:
        if args and args[0] in self.commands:
            return super().resolve_command(ctx, args)
        return "prompt", export_cmd, args

    def format_usage(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        formatter.write_usage(ctx.command_path, "PROMPT_ID --out FILE | viewer --out DIR [...]")


@click.group(
    cls=_ExportGroup,
    invoke_without_command=False,
    context_settings={"ignore_unknown_options": True},
)
def export() -> None:
    """Export stored prompts.

    \b
    atlas export PROMPT_ID --out graph.json      interchange JSON (or a .safetensors artifact)
    atlas export viewer --out DIR [--prompts ID ...]   the attribution-graphs frontend layout
    """


@export.command()
@click.option("--out", "out", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--prompts",
    "prompt_ids",
    multiple=True,
    help="Prompt id or unique prefix (repeat, or comma-separate); default: the newest --limit.",
)
@click.option("--limit", type=click.IntRange(1, 100_000), default=100, show_default=True)
def viewer(out: Path, prompt_ids: tuple[str, ...], limit: int) -> None:
    """Stored prompts as DIR/graph-metadata.json, DIR/graph_data/{slug}.json and
    DIR/features/{scan}/{index}.json (the attribution-graphs frontend's layout).

    circuit-tracer's local server opens DIR/graph_data (serve(data_dir=DIR/graph_data)).
    """
    from atlas.web.export import export_viewer

    ids = [p.strip() for item in prompt_ids for p in item.split(",") if p.strip()]
    with atlas_driver() as driver:
        done: Any = export_viewer(
            driver,
            out,
            ids or None,
            limit=limit,
            database=database(),
            timeout_s=timeout(),
            progress=progress,
        )
    click.echo(f"{done.out}: {len(done.slugs)} graph(s), {done.n_features} feature file(s)")
