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
@click.option(
    "--vision",
    is_flag=True,
    help="Build the toy vision world (a LLaVA-style model started from the toy model, and its "
    "transcoders) instead; default target {ATLAS_HOME}/toy/vision.",
)
def build(out: Path | None, seed: int, force: bool, quiet: bool, vision: bool) -> None:
    """Train the toy model and its transcoders (a few minutes on 2 CPU cores)."""
    from atlas.toy.build import ToyPaths, build_toy

    home = get_settings().atlas_home
    target = out or (home / "toy" / "vision" if vision else home / "toy")
    paths = ToyPaths.at(target)
    if paths.exists() and not force:
        click.echo(f"toy world already at {paths.root} (use --force to rebuild)")
        return
    if vision:
        from atlas.toy.build import toy_paths
        from atlas.toy.vision_build import build_toy_vision

        paths = build_toy_vision(target, seed=seed, progress=not quiet, text_paths=toy_paths(home))
        manifest = json.loads(paths.manifest.read_text())
        click.echo(f"model:       {paths.model_dir}")
        click.echo(f"transcoders: {paths.transcoder_dir}")
        _print_vision(manifest["metrics"]["eval"])
        for r in manifest["metrics"]["transcoders_on_image_prompts"]:
            click.echo(_layer_line(r, "held-out image-prompt"))
        click.echo(f"built in {manifest['elapsed_s']['total']:.0f} s")
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
@click.option("--json", "as_json", is_flag=True, help="Print JSON (same as --format json).")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="Output format.",
)
@click.option(
    "--vision",
    is_flag=True,
    help="Evaluate the toy vision world: accuracy per task and count on held-out images.",
)
def eval_cmd(root: Path | None, docs: int, as_json: bool, fmt: str, vision: bool) -> None:
    """Fact accuracy of the toy model and held-out FVU / L0 / dead features of its transcoders
    (with --vision: the toy VLM's accuracy per task and count on held-out images)."""
    from atlas.toy.build import ToyPaths, evaluate_toy, toy_paths

    as_json = as_json or fmt == "json"
    if vision:
        from atlas.toy.vision_build import evaluate_vision, vision_paths

        vpaths = ToyPaths.at(root) if root else vision_paths(get_settings().atlas_home)
        vresult = evaluate_vision(vpaths)
        if as_json:
            click.echo(json.dumps(vresult, indent=2, sort_keys=True))
            return
        click.echo(f"toy vision world: {vpaths.root}")
        _print_vision(vresult)
        return
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
        click.echo(_layer_line(r, "held-out"))


def _layer_line(r: dict, what: str) -> str:
    return (
        f"  layer {r['layer']}: FVU {r['fvu']:.4f}  L0 {r['l0']:.1f}  dead {r['dead']}"
        f"  ({r['n_tokens']} {what} tokens)"
    )


def _print_vision(m: dict) -> None:
    n = m.get("n", {})
    for key, task in (
        ("dots_accuracy", "dots"),
        ("hands_accuracy", "hand"),
        ("planets_accuracy", "planet"),
        ("colour_accuracy", "colour"),
        ("shape_accuracy", "shape"),
        ("heldout_combo_accuracy", "heldout_combo"),
    ):
        click.echo(f"{key:>24}: {m[key]:.3f} of {n.get(task, 0)}")
    by_count = "  ".join(f"{k}: {v:.2f}" for k, v in m["dots_accuracy_by_count"].items())
    click.echo(f"{'dots by count':>24}: {by_count}")
    for fingers, answers in m["hand_answers_by_fingers"].items():
        said = "  ".join(f"'{a}' x{c}" for a, c in answers.items())
        acc = m["hands_accuracy_by_fingers"][fingers]
        click.echo(f"{fingers + ' fingers':>24}: accuracy {acc:.2f}   answered {said}")
    click.echo(
        f"{'six fingers':>24}: answered '5' {m['six_finger_answered_5']:.2f}, "
        f"'6' {m['six_finger_answered_6']:.2f}"
    )
