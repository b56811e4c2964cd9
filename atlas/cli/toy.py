"""``atlas toy``: build and evaluate the embedded toy world (model + transcoders)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from atlas.cli import get_settings


@click.group()
def toy() -> None:
    """The toy world: a small model and transcoders trained locally on a synthetic corpus."""


@toy.command("build")
@click.option(
    "--out",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Target directory (default: {ATLAS_HOME}/toy).",
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the whole build.")
@click.option("--force", is_flag=True, help="Rebuild even if a toy world is already there.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def build(out: Path | None, seed: int, force: bool, quiet: bool) -> None:
    """Train the toy model and its transcoders (a few minutes on 2 CPU cores)."""
    from atlas.toy.build import ToyPaths, build_toy

    target = out or (get_settings().atlas_home / "toy")
    paths = ToyPaths.at(target)
    if paths.exists() and not force:
        click.echo(f"toy world already at {paths.root} (use --force to rebuild)")
        return
    paths = build_toy(target, seed=seed, progress=not quiet)
    manifest = json.loads(paths.manifest.read_text())
    click.echo(f"model:       {paths.model_dir}")
    click.echo(f"transcoders: {paths.transcoder_dir}")
    _print_metrics(manifest.get("metrics", {}))
    click.echo(f"built in {manifest['elapsed_s']['total']:.0f} s")


@toy.command("eval")
@click.option(
    "--dir",
    "root",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=None,
    help="Toy directory (default: the shipped assets, else {ATLAS_HOME}/toy).",
)
@click.option(
    "--docs", type=int, default=256, show_default=True, help="Held-out documents for the FVU."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def eval_cmd(root: Path | None, docs: int, as_json: bool) -> None:
    """Fact accuracy of the toy model and held-out FVU / L0 / dead features of its transcoders."""
    from atlas.toy.build import ToyPaths, evaluate_toy, toy_paths

    paths = ToyPaths.at(root) if root else toy_paths(get_settings().atlas_home)
    result = evaluate_toy(paths, eval_docs=docs)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"toy world: {paths.root}")
    _print_metrics(result)


def _print_metrics(metrics: dict) -> None:
    for key in sorted(k for k in metrics if k.startswith("accuracy_")):
        acc = metrics[key]
        fams = "  ".join(f"{k} {v:.3f}" for k, v in acc.items() if k not in ("all", "n"))
        click.echo(f"{key[9:]:>17}: {acc['all']:.3f} of {int(acc['n'])}   ({fams})")
    for r in metrics.get("transcoders", []):
        click.echo(
            f"  layer {r['layer']}: FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  dead {r['dead']}"
            f"  ({r['n_tokens']} held-out tokens)"
        )
