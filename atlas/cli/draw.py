"""``atlas draw ...``: pictures of stored prompts, paths and features (SVG or PNG by the suffix)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from atlas.cli import get_settings
from atlas.cli._common import atlas_driver, database, timeout

OUT = click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Output file: .svg or .png (the format follows the suffix).",
)


@click.group()
def draw() -> None:
    """Pictures of circuits: a prompt's circuit, its supernodes, paths, heatmaps, feature cards."""


def _check_suffix(out: Path, allowed: tuple[str, ...] = (".svg", ".png")) -> None:
    from atlas.render import output_format

    output_format(out, allowed)


def _ask(question: Any, *args: Any, **kwargs: Any) -> Any:
    with atlas_driver() as driver:
        return question(driver, *args, database=database(), timeout_s=timeout(), **kwargs)


def _stored_image(sha: str | None) -> Any:
    """The prompt's image from the artifact store, or ``None`` (a warning) when it is missing."""
    from atlas.errors import InputError
    from atlas.images import load_stored_image

    if sha is None:
        return None
    settings = get_settings()
    try:
        loaded = load_stored_image(
            settings.resolved_artifact_dir, sha, max_pixels=settings.image_max_pixels
        )
    except InputError as exc:
        click.echo(f"warning: {exc}; drawn without the image", err=True)
        return None
    return loaded.image


def _wrote(drawn: Any) -> None:
    click.echo(str(drawn.path))


@draw.command()
@click.argument("prompt_id")
@OUT
@click.option(
    "--max-nodes", type=int, default=60, show_default=True, help="Feature and error node cap."
)
@click.option("--max-edges", type=int, default=300, show_default=True, help="Edge cap.")
def circuit(prompt_id: str, out: Path, max_nodes: int, max_edges: int) -> None:
    """One prompt's pruned circuit (x = token position, y = layer)."""
    from atlas.render import draw_prompt_circuit
    from atlas.store import read

    _check_suffix(out)
    found = _ask(read.prompt_circuit, prompt_id)
    meta = found["graph"].metadata
    image = _stored_image(meta.image_sha256) if meta.image else None
    _wrote(draw_prompt_circuit(found, out, max_nodes=max_nodes, max_edges=max_edges, image=image))


@draw.command()
@click.argument("prompt_id")
@OUT
def supernodes(prompt_id: str, out: Path) -> None:
    """A prompt collapsed to its supernodes (with its token and logit nodes)."""
    from atlas.render import draw_supernode_graph
    from atlas.store import read

    _check_suffix(out)
    rows = _ask(read.prompt_supernode_graph, prompt_id)
    _wrote(draw_supernode_graph(rows, out, title=f"supernodes of {prompt_id[:12]}"))


@draw.command()
@click.option("--from", "source", required=True, help="As in `atlas query paths`.")
@click.option("--to", "target", required=True, help="As in `atlas query paths`.")
@OUT
@click.option("--max-hops", type=int, default=4, show_default=True)
@click.option("--min-weight", type=float, default=0.0, show_default=True)
@click.option("--image-tag", default=None, help="Only prompts whose image has this tag.")
def paths(
    source: str, target: str, out: Path, max_hops: int, min_weight: float, image_tag: str | None
) -> None:
    """The routes of a paths query, summed across prompts, as a layered graph."""
    from atlas.render import draw_paths
    from atlas.store import read

    _check_suffix(out)
    result = _ask(
        read.paths,
        source,
        target,
        max_hops=max_hops,
        min_weight=min_weight,
        cap=get_settings().cypher_row_cap,
        image_tag=image_tag,
    )
    if not result["aggregate"]:
        click.echo(f"no paths from {source} to {target}", err=True)
    _wrote(draw_paths(result, out, title=f"paths {source} → {target}"))


@draw.command()
@click.argument("prompt_id")
@click.option("--tokens", required=True, help="Image token indices k (from 0), comma-separated.")
@OUT
def heatmap(prompt_id: str, tokens: str, out: Path) -> None:
    """An image prompt's image with the attention-rollout heat of image tokens overlaid (PNG)."""
    from atlas.errors import InputError
    from atlas.graph import Graph, artifact_path
    from atlas.render import draw_heatmap
    from atlas.store import read

    _check_suffix(out, (".png",))
    try:
        ks = [int(k) for k in tokens.split(",") if k.strip()]
    except ValueError as exc:
        raise InputError(f"bad --tokens {tokens!r}: use indices like 0,3,5") from exc
    stored = _ask(read.prompt_circuit, prompt_id)["graph"]
    if stored.metadata.image is None:
        raise InputError(f"prompt {prompt_id} has no image")
    artifact = Graph.load(artifact_path(get_settings().resolved_artifact_dir, stored.prompt_id))
    if artifact.rollout is None:
        raise InputError(f"prompt {prompt_id} was attributed without rollout maps")
    image = _stored_image(stored.metadata.image_sha256)
    if image is None:
        raise InputError(f"the image of prompt {prompt_id} is not in the artifact store")
    _wrote(draw_heatmap(image, artifact.rollout, ks, out))


@draw.command()
@click.argument("feature")
@OUT
def card(feature: str, out: Path) -> None:
    """A feature card (FEATURE: L/I or feature:L/I): label, logit lens, top activations."""
    from atlas.render import crop_cell, draw_card
    from atlas.store import read

    _check_suffix(out)
    found = _ask(read.feature_card, feature)
    crops = []
    for top in found.pop("image_tops"):
        image = _stored_image(top["image"])
        if image is not None and top["row"] is not None and top["grid"]:
            cell = (int(top["row"]), int(top["col"]))
            crops.append(
                {
                    "image": _as_image(crop_cell(image, cell, tuple(top["grid"]))),
                    "caption": f"{top['activation']:.2f} @ {top['row']},{top['col']}",
                }
            )
    _wrote(draw_card({**found, "crops": crops}, out))


def _as_image(pixels: Any) -> Any:
    from PIL import Image

    return Image.fromarray(pixels)
