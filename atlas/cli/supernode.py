"""``atlas supernode define / import / list / show / delete``: named groups of features."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

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
@click.option(
    "--kind",
    default=None,
    help="Only this kind (proposed, accepted, features, label, token, ...), with the "
    "proposal scores.",
)
@FORMAT
def sn_list(kind: str | None, fmt: str) -> None:
    """Every supernode with its member count (with --kind: and its proposal scores)."""
    from atlas.store import proposals, supernodes

    with atlas_driver() as driver:
        if kind is None:
            rows = supernodes.list_supernodes(driver, database=database())
        else:
            rows = proposals.list_proposals(driver, kind=kind, database=database())
    if kind is None:
        output(rows, fmt, ["name", "kind", "pattern", "n_members"], "supernodes")
        return
    cols = [
        "name",
        "kind",
        "level",
        "n_members",
        "score",
        "coactivation",
        "coherence",
        "n_prompts",
        "validation_kl",
        "validation_drop",
    ]
    output(rows, fmt, cols, f"supernodes of kind {kind}")


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


@supernode.command("propose")
@click.option(
    "--prompts",
    "prompt_filter",
    default=None,
    help="Prompt filter (text:RE, answer:TOK, tag:T, job:ID, supernode:N, id:P; & joins, ! negates).",
)
@click.option(
    "--min-prompts",
    type=int,
    default=3,
    show_default=True,
    help="Cluster only features active in at least this many of the prompts.",
)
@click.option(
    "--max-features",
    type=int,
    default=2000,
    show_default=True,
    help="Cluster at most this many features (the most frequent).",
)
@click.option(
    "--min-pair-prompts",
    type=int,
    default=1,
    show_default=True,
    help="Aggregated edges seen in fewer prompts do not count.",
)
@click.option(
    "--threshold",
    type=float,
    default=0.6,
    show_default=True,
    help="Average-linkage distance (1 - similarity) at which clusters stop merging.",
)
@click.option(
    "--concept-threshold",
    type=float,
    default=0.7,
    show_default=True,
    help="Cut of the second level (concepts: groups of the tight groups, position-free).",
)
@click.option("--no-concepts", is_flag=True, help="Propose the tight groups only.")
@click.option("--min-size", type=int, default=2, show_default=True)
@click.option(
    "--limit", type=int, default=30, show_default=True, help="Proposals kept (of each level)."
)
@click.option(
    "--model",
    "model_dir",
    default=None,
    help="Model and transcoders: decoder similarity (and --validate).",
)
@click.option("--transcoders", "tc_dir", default=None)
@click.option(
    "--validate",
    "n_validate",
    type=int,
    default=0,
    show_default=True,
    help="Ablate the best N proposals (constrained, multiplier -1) on the real model.",
)
@click.option("--dry-run", is_flag=True, help="Print the proposals; store nothing.")
@FORMAT
def sn_propose(
    prompt_filter: str | None,
    min_prompts: int,
    max_features: int,
    min_pair_prompts: int,
    threshold: float,
    concept_threshold: float,
    no_concepts: bool,
    min_size: int,
    limit: int,
    model_dir: str | None,
    tc_dir: str | None,
    n_validate: int,
    dry_run: bool,
    fmt: str,
) -> None:
    """Propose supernodes: features that co-occur across prompts and positions and share
    aggregated inputs and outputs, stored as supernodes of kind 'proposed' (replacing the
    earlier proposals). A second level, the concepts (C1, C2, ...), groups the tight groups
    (P1, P2, ...) by the prompts and input tokens their features share, whatever the position."""
    from atlas.circuits.proposals import ProposalSettings
    from atlas.cli import get_settings
    from atlas.errors import InputError
    from atlas.store import proposals

    if (model_dir is None) != (tc_dir is None):
        raise InputError("--model and --transcoders go together")
    if n_validate and dry_run:
        raise InputError("--validate stores interventions: not with --dry-run")
    if not 0 < threshold <= 1 or not 0 < concept_threshold <= 1 or min_size < 2 or limit < 1:
        raise InputError(
            "--threshold and --concept-threshold must be in (0, 1], --min-size >= 2, --limit >= 1"
        )
    settings = get_settings()
    decoder = _decoder_rows(model_dir, tc_dir, settings) if model_dir and tc_dir else None
    with atlas_driver() as driver:
        found = proposals.propose_supernodes(
            driver,
            prompt_filter,
            min_prompts=min_prompts,
            max_features=max_features,
            min_pair_prompts=min_pair_prompts,
            settings=ProposalSettings(
                distance_threshold=threshold,
                concept_threshold=concept_threshold,
                min_size=min_size,
            ),
            limit=limit,
            with_concepts=not no_concepts,
            store=not dry_run,
            database=database(),
            timeout_s=timeout(),
            decoder=decoder,
        )
        for prop in [p for p in found if p["level"] == 1][:n_validate]:
            prop.update(
                proposals.validate_proposal(
                    driver, settings, prop["name"], model=model_dir, transcoders=tc_dir
                )
            )
    if fmt == "json":
        emit_json(found)
        return
    cols = ["name", "level", "n_members", "score", "coactivation", "coherence", "n_prompts"]
    if n_validate:
        cols += ["validation_kl", "validation_drop"]
    print_table(found, cols, "proposed supernodes" + (" (not stored)" if dry_run else ""))


def _decoder_rows(model_dir: str, tc_dir: str, settings: Any) -> Callable[[list[str]], Any]:
    """A function fids -> decoder rows (zeros for features of another transcoder set)."""
    import numpy as np

    from atlas.circuits.lens import decoder_rows
    from atlas.models.loading import load_model
    from atlas.transcoders.loading import load_transcoders

    device, dtype = settings.resolved_device(), settings.torch_dtype()
    model = load_model(model_dir, device=device, dtype=dtype)
    tcs = load_transcoders(tc_dir, model, device=device, dtype=dtype)
    tset = tcs.info.content_hash

    def rows(fids: list[str]) -> np.ndarray:
        out = []
        width = int(decoder_rows(tcs.w_dec[0]).shape[-1])
        for fid in fids:
            owner, layer, index = fid.rsplit("/", 2)
            if owner != tset or int(layer) >= len(tcs.w_dec):
                out.append(np.zeros(width))
                continue
            row = decoder_rows(tcs.w_dec[int(layer)][int(index) : int(index) + 1])[0]
            out.append(row.detach().float().cpu().numpy())
        return np.stack(out)

    return rows


@supernode.command("accept")
@click.argument("name")
@click.option("--as", "new_name", default=None, help="New name (rename on accepting).")
def sn_accept(name: str, new_name: str | None) -> None:
    """Accept a proposal (kind 'accepted'; kept by later proposal runs), optionally renamed."""
    from atlas.store import proposals

    with atlas_driver() as driver:
        final = proposals.accept(driver, name, new_name, database=database())
    click.echo(f"accepted supernode {final!r}")


@supernode.command("reject")
@click.argument("name")
def sn_reject(name: str) -> None:
    """Reject (delete) a proposal; accepted and hand-made supernodes are refused."""
    from atlas.store import proposals

    with atlas_driver() as driver:
        proposals.reject(driver, name, database=database())
    click.echo(f"rejected supernode {name!r}")


@supernode.command("validate")
@click.argument("name")
@click.option("--model", "model_dir", default=None)
@click.option("--transcoders", "tc_dir", default=None)
@click.option(
    "--prompts",
    "n_prompts",
    type=int,
    default=3,
    show_default=True,
    help="Prompts where the members are most active.",
)
@click.option("--multiplier", type=float, default=-1.0, show_default=True)
@FORMAT
def sn_validate(
    name: str,
    model_dir: str | None,
    tc_dir: str | None,
    n_prompts: int,
    multiplier: float,
    fmt: str,
) -> None:
    """Ablate a supernode (constrained over every layer, members times MULTIPLIER) on the real
    model where it is most active; store and print the measured effect."""
    from atlas.cli import get_settings
    from atlas.errors import InputError
    from atlas.store import proposals

    if n_prompts < 1:
        raise InputError("--prompts must be >= 1")
    with atlas_driver() as driver:
        res = proposals.validate_proposal(
            driver,
            get_settings(),
            name,
            model=model_dir,
            transcoders=tc_dir,
            n_prompts=n_prompts,
            multiplier=multiplier,
        )
    output(
        [{"name": name, **res}],
        fmt,
        ["name", "validation_kl", "validation_drop", "validation_prompts"],
        "validation",
    )
