"""``atlas supernode define / import / list / show / delete``: named groups of features."""

from __future__ import annotations

from pathlib import Path

import click

from atlas.cli._common import (
    FORMAT,
    atlas_driver,
    database,
    echo_safe,
    emit_json,
    output,
    print_table,
    timeout,
)


@click.group()
def supernode() -> None:
    """Define, list, show and delete supernodes (named groups of features)."""


@supernode.command("define")
@click.argument("name")
@click.option("--feature", "features", multiple=True, help="LAYER/INDEX (repeatable).")
@click.option(
    "--label", "label_pattern", default=None, help="Regex over feature labels (full match)."
)
@click.option("--token", "token_pattern", default=None, help="Regex over logit-lens top tokens.")
def sn_define(
    name: str, features: tuple[str, ...], label_pattern: str | None, token_pattern: str | None
) -> None:
    """Create or redefine supernode NAME by feature list, label pattern or token pattern."""
    from atlas.errors import InputError
    from atlas.store import supernodes

    given = sum(bool(x) for x in (features, label_pattern, token_pattern))
    if given != 1:
        raise InputError("give exactly one of --feature, --label, --token")
    with atlas_driver() as driver:
        if features:
            n = supernodes.define_from_features(driver, name, list(features), database=database())
        elif label_pattern:
            n = supernodes.define_from_label(
                driver, name, label_pattern, database=database(), timeout_s=timeout()
            )
        else:
            assert token_pattern is not None
            n = supernodes.define_from_token(
                driver, name, token_pattern, database=database(), timeout_s=timeout()
            )
    click.echo(f"supernode {name!r}: {n} feature(s)")


@supernode.command("import")
@click.argument("path", type=click.Path(path_type=Path))
def sn_import(path: Path) -> None:
    """Define the supernodes of an interchange JSON graph's qParams."""
    from atlas.store import supernodes

    with atlas_driver() as driver:
        result = supernodes.import_from_json(driver, path, database=database())
    for name, n in result.items():
        click.echo(f"supernode {name!r}: {n} feature(s)")


@supernode.command("list")
@FORMAT
def sn_list(fmt: str) -> None:
    """Every supernode with its member count."""
    from atlas.store import supernodes

    with atlas_driver() as driver:
        rows = supernodes.list_supernodes(driver, database=database())
    output(rows, fmt, ["name", "kind", "pattern", "n_members"], "supernodes")


@supernode.command("show")
@click.argument("name")
@FORMAT
def sn_show(name: str, fmt: str) -> None:
    """One supernode and its member features."""
    from atlas.store import supernodes

    with atlas_driver() as driver:
        info = supernodes.show(driver, name, database=database())
    if fmt == "json":
        emit_json(info)
        return
    echo_safe(f"{info['name']} ({info['kind']}{', ' + info['pattern'] if info['pattern'] else ''})")
    print_table(info["members"], ["fid", "label", "n_prompts"], "members")


@supernode.command("delete")
@click.argument("name")
def sn_delete(name: str) -> None:
    """Delete a supernode (its features stay)."""
    from atlas.errors import InputError
    from atlas.store import supernodes

    with atlas_driver() as driver:
        if not supernodes.delete(driver, name, database=database()):
            raise InputError(f"no supernode named {name!r}")
    click.echo(f"deleted supernode {name!r}")
