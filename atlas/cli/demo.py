"""``atlas demo``: the whole pipeline on the toy world, from nothing to cross-prompt answers.

The steps are :mod:`atlas.demo` (:func:`atlas.demo.run.run_demo`); this is the command.
"""

from __future__ import annotations

from pathlib import Path

import click

from atlas.cli import get_settings


@click.command()
@click.option(
    "--prompts",
    "n_prompts",
    type=int,
    default=120,
    show_default=True,
    help="How many toy-corpus prompts to attribute (>= 100 in the README's demo).",
)
@click.option(
    "--home",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Demo home (default: {ATLAS_HOME}/demo); never the user's own atlas.",
)
@click.option("--fresh", is_flag=True, help="Wipe the demo atlas first (recompute everything).")
@click.option("--max-hops", type=int, default=3, show_default=True)
@click.option(
    "--min-weight",
    type=float,
    default=0.3,
    show_default=True,
    help="Paths use only edges with |weight| at least this (0: every edge; thousands of paths).",
)
@click.option("--limit", type=int, default=15, show_default=True, help="Rows per table.")
@click.option("--timeout", "timeout_s", type=float, default=1800, show_default=True)
def demo(
    n_prompts: int,
    home: Path | None,
    fresh: bool,
    max_hops: int,
    min_weight: float,
    limit: int,
    timeout_s: float,
) -> None:
    """Run the whole pipeline on the toy world and answer "all paths from Hand to '5'"."""
    from atlas.demo.run import DemoOptions, run_demo

    opts = DemoOptions(
        n_prompts=n_prompts,
        home=home,
        fresh=fresh,
        max_hops=max_hops,
        min_weight=min_weight,
        limit=limit,
        timeout_s=timeout_s,
    )
    run_demo(opts, get_settings())
