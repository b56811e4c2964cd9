"""The demo's image part, on the toy vision world: a batch of image prompts (hands of every
finger count, dots and stars, planets) through the workers, a visual ``Hand`` supernode, and
the six-finger case: which paths lead from the visual Hand features to '5' in the six-finger
hands the model answered "5", which image regions feed them, and what contributes to '5' there
against the hands it counted right."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from atlas.demo import output as out
from atlas.demo.causal import ImagePrompt
from atlas.demo.services import DemoServices, Steps
from atlas.demo.text import run_batch

VISUAL_HAND = "Visual hand"
TARGET = "5"


@dataclass(frozen=True)
class StoredImagePrompt:
    """A demo image prompt, stored: its id, tags, true answer and the model's answer."""

    prompt_id: str
    prompt: str
    image: str
    """``sha256:<hex>`` of its stored image."""
    path: Path
    tags: tuple[str, ...]
    truth: str
    answer: str
    prob: float

    def tag(self, prefix: str) -> str | None:
        return next((t.split(":", 1)[1] for t in self.tags if t.startswith(prefix + ":")), None)

    @property
    def label(self) -> str:
        return f"{self.path.stem} ({', '.join(self.tags)})"

    def as_target(self) -> ImagePrompt:
        return ImagePrompt(self.prompt_id, self.prompt, self.image, self.path.stem)


def image_batch(
    svc: DemoServices, steps: Steps, image_dir: Path, timeout_s: float
) -> list[StoredImagePrompt]:
    """Draw the demo's images, attribute them through the workers; the stored prompts."""
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import job_store
    from atlas.store.read import prompt_answers
    from atlas.toy.vision_demo import demo_image_prompts

    items = demo_image_prompts(image_dir)
    specs = [PromptSpec(**item.spec()) for item in items]
    n_hands = sum("hand" in item.tags for item in items)
    summary = run_batch(
        svc,
        steps,
        specs,
        f"batch of {len(specs)} image prompts ({n_hands} hands, dots and stars, planets)",
        timeout_s,
    )
    records = job_store(svc.driver, svc.settings).items(summary.job_id)
    ids = [r.prompt_id for r in records]
    answers = prompt_answers(
        svc.driver, [i for i in ids if i], database=svc.settings.neo4j_database
    )
    stored = []
    for item, rec in zip(items, records, strict=True):
        if rec.prompt_id is None or rec.prompt_id not in answers:
            continue
        image = str((rec.spec or {}).get("image") or "")
        answer, prob = answers[rec.prompt_id]
        stored.append(
            StoredImagePrompt(
                prompt_id=rec.prompt_id,
                prompt=item.prompt,
                image=image,
                path=item.image,
                tags=item.tags,
                truth=item.answer,
                answer=answer,
                prob=prob,
            )
        )
    return stored


def print_answers_by_count(images: Sequence[StoredImagePrompt]) -> None:
    """What the model answered on each kind of image (from the stored graphs' top logits)."""
    rows = []
    groups: dict[str, list[StoredImagePrompt]] = {}
    for im in images:
        key = (
            f"hand, {im.tag('fingers')} fingers"
            if im.tag("fingers")
            else f"{im.tags[0]}, {im.truth}"
        )
        groups.setdefault(key, []).append(im)
    for key, group in groups.items():
        answered: dict[str, int] = {}
        for im in group:
            answered[im.answer] = answered.get(im.answer, 0) + 1
        right = sum(im.answer == im.truth for im in group)
        common = ", ".join(f"{a!r}: {n}" for a, n in sorted(answered.items(), key=lambda x: -x[1]))
        rows.append([key, len(group), f"{right}/{len(group)}", common])
    out.heading("What the toy VLM answers on the demo images", " (top logit of each stored graph)")
    out.table(None, ["images", "n", "right", "answers"], rows)


@dataclass(frozen=True)
class VisualHand:
    """The visual Hand features and where they can act."""

    features: list[tuple[int, int]]
    """``(layer, index)`` of the toy VLM's most hand-selective features."""
    in_atlas: int
    """How many of them some stored graph kept (the supernode's members)."""
    positions: list[int]
    """Every position of a hand prompt but BOS (the image tokens, then the question)."""


def visual_hand_supernode(
    svc: DemoServices, steps: Steps, images: Sequence[StoredImagePrompt]
) -> VisualHand:
    """The visual Hand supernode: the features most selective for hand images against every
    other kind of image (:func:`atlas.toy.vision_demo.hand_features`), of the VLM's
    transcoder set; only those some stored graph kept can be members."""
    from atlas.errors import InputError
    from atlas.graph import Graph, artifact_path
    from atlas.store.read import parse_feature
    from atlas.store.supernodes import define_from_features
    from atlas.toy.vision_demo import hand_features

    with steps.step(f"supernode {VISUAL_HAND!r}: the most hand-selective features"):
        specs = hand_features()
        hand = next((im for im in images if im.tag("fingers")), images[0])
        graph = Graph.load(artifact_path(svc.settings.resolved_artifact_dir, hand.prompt_id))
        try:
            n = define_from_features(
                svc.driver,
                VISUAL_HAND,
                specs,
                tset=graph.metadata.transcoders.content_hash,
                database=svc.settings.neo4j_database,
            )
        except InputError:
            n = 0
        click.echo(
            f"    {len(specs)} features ({', '.join(specs)}); {n} of them in some stored graph",
            err=True,
        )
    n_pos = int(graph.input_ids.numel())
    return VisualHand([parse_feature(x) for x in specs], n, list(range(1, n_pos)))


def _feature_positions(
    svc: DemoServices, images: Sequence[StoredImagePrompt], features: Sequence[tuple[int, int]]
) -> tuple[int, int, int, int]:
    """In these images' stored graphs: feature nodes at image positions and in all, and nodes
    of ``features`` at image positions and in all."""
    from atlas.graph import Graph, artifact_path

    wanted = set(features)
    at_image = total = hand_image = hand_total = 0
    for im in images:
        g = Graph.load(artifact_path(svc.settings.resolved_artifact_dir, im.prompt_id))
        img = set() if g.image_positions is None else set(g.image_positions.tolist())
        for is_f, lay, f, p in zip(
            (g.feature >= 0).tolist(),
            g.layer.tolist(),
            g.feature.tolist(),
            g.pos.tolist(),
            strict=True,
        ):
            if not is_f:
                continue
            total += 1
            at_image += p in img
            if (lay, f) in wanted:
                hand_total += 1
                hand_image += p in img
    return at_image, total, hand_image, hand_total


def six_finger_case(
    svc: DemoServices,
    images: Sequence[StoredImagePrompt],
    visual: VisualHand,
    *,
    max_hops: int,
    min_weight: float,
    limit: int,
    pictures: Path,
) -> dict[str, Any]:
    """The six-finger case's answers; returns the prompts it is about and what it drew."""
    from atlas.store import queries as q
    from atlas.store.read import image_regions, paths, top_contributors

    db = svc.settings.neo4j_database
    six5 = [im for im in images if im.tag("fingers") == "6" and im.answer == TARGET]
    right = [im for im in images if im.tag("fingers") and im.answer == im.truth]
    six = [im for im in images if im.tag("fingers") == "6"]
    out.heading(
        f"The six-finger case: {len(six5)} of {len(six)} six-finger hands answered '{TARGET}'",
        f" ({len(right)} hands counted right)",
    )
    result: dict[str, Any] = {"six5": six5, "right": right, "pictures": [], "n_paths": 0}
    if not six5:
        click.echo("the toy VLM answered no six-finger hand with '5': no paths to show")
        return result
    ids = [im.prompt_id for im in six5]
    found = paths(
        svc.driver,
        f"supernode:{VISUAL_HAND}",
        f"logit:{TARGET}",
        max_hops=max_hops,
        min_weight=min_weight,
        limit=100_000,
        cap=100_000,
        database=db,
        prompt_ids=ids,
    )
    agg = found["aggregate"]
    n_paths = sum(g["n_paths"] for g in agg)
    n_with = len({p["prompt"] for p in found["paths"]})
    out.heading(
        f"All paths from {VISUAL_HAND} to '{TARGET}' in those images",
        f" (1..{max_hops} hops, every edge |w| >= {min_weight:g}: {n_paths} paths in "
        f"{n_with} of {len(six5)} images)",
    )
    out.routes_table(agg, limit, "route (Hand feature -> ... -> logit)", "images")
    out.cypher_pointer(f"PATHS[{max_hops}]  (built from _PATHS_TEMPLATE)", q.PATHS[max_hops])
    out.cli_pointer(
        f"atlas query paths --from 'supernode:{VISUAL_HAND}' --to logit:{TARGET} "
        f"--image-tag fingers:6 --max-hops {max_hops} --min-weight {min_weight:g}"
    )
    result["n_paths"] = n_paths
    at_image, total, hand_image, hand_total = _feature_positions(svc, six5, visual.features)
    click.echo(
        f"where the Hand nodes sit: {hand_total - hand_image} of the {hand_total} Hand nodes in "
        f"those graphs are at the question's positions and {hand_image} at image tokens "
        f"({at_image} of all {total} feature nodes kept are at image tokens). The question is "
        "the same for hands and dots, so these features fire because of the picture, which the "
        "question's positions read through attention to the image tokens."
    )

    regions = image_regions(
        svc.driver, f"supernode:{VISUAL_HAND}", limit=limit, image_tag="fingers:6", database=db
    )
    out.heading(
        f"Image regions feeding the {VISUAL_HAND} nodes in six-finger images",
        " (image soft token at grid cell; summed direct effect; its strongest rollout patches)",
    )
    out.table(
        None,
        ["image", "cell (row, col)", "images", "edges", "sum w", "top patches"],
        [
            [
                str(r["image"])[:12],
                f"({r['row']}, {r['col']})",
                r["n_prompts"],
                r["n_edges"],
                f"{r['sum_w']:+.4g}",
                " ".join(f"({a},{b})" for a, b in r["top_patches"][:3]),
            ]
            for r in regions
        ],
    )
    out.cypher_pointer("IMAGE_REGIONS", q.IMAGE_REGIONS)
    out.cli_pointer(f"atlas query image-regions 'supernode:{VISUAL_HAND}' --image-tag fingers:6")
    shown = next((im for im in six5 if any(str(r["image"]) == im.image[7:] for r in regions)), None)
    shown = shown or six5[0]
    drawn = _heatmap(svc, shown, regions, pictures)
    if drawn is not None:
        click.echo(
            f"heatmap of the image tokens of {shown.path.name} feeding {VISUAL_HAND} "
            f"(their attention rollout onto the pixels): {drawn}"
        )
        result["pictures"].append(drawn)

    a = top_contributors(svc.driver, f"logit:{TARGET}", limit=limit, database=db, prompt_ids=ids)
    five_right = [im for im in right if im.truth == TARGET]
    b = top_contributors(
        svc.driver,
        f"logit:{TARGET}",
        limit=200,
        database=db,
        prompt_ids=[i.prompt_id for i in five_right],
    )
    mean_b = {r["source"]: r["sum_w"] / max(len(five_right), 1) for r in b}
    out.heading(
        f"Top contributors to '{TARGET}' on the six-finger hands answered '{TARGET}'",
        f" (mean w per image; beside it, on the {len(five_right)} five-finger hands counted right)",
    )
    out.table(
        None,
        ["source", "kind", "layer", "images", "mean w (6 -> '5')", "mean w (5 -> '5')"],
        [
            [
                r["name"],
                r["kind"],
                r["layer"],
                r["n_prompts"],
                f"{r['sum_w'] / len(six5):+.4g}",
                f"{mean_b[r['source']]:+.4g}" if r["source"] in mean_b else "-",
            ]
            for r in a
        ],
    )
    out.cypher_pointer("TOP_CONTRIBUTORS", q.TOP_CONTRIBUTORS)
    out.cli_pointer(f"atlas query contributors logit:{TARGET}")
    return result


def _strongest_image_tokens(graph: Any, k: int = 3) -> list[int]:
    """The ``k`` image tokens (indices into the rollout) with the largest summed |weight| of
    their outgoing edges in ``graph``."""
    import torch

    from atlas.graph import NodeKind

    nodes = (graph.kind == int(NodeKind.IMAGE)).nonzero().flatten()
    if nodes.numel() == 0 or graph.image_positions is None:
        return [0]
    mass = torch.zeros(int(graph.kind.numel()))
    mass.index_add_(0, graph.edge_source, graph.edge_weight.abs().float())
    positions = graph.pos[nodes]
    order = torch.argsort(mass[nodes], descending=True)[:k]
    index = {int(p): i for i, p in enumerate(graph.image_positions.tolist())}
    return [index[int(positions[j])] for j in order if int(positions[j]) in index] or [0]


def _heatmap(
    svc: DemoServices, im: StoredImagePrompt, regions: Sequence[dict[str, Any]], pictures: Path
) -> Path | None:
    """The rollout heatmap of the image tokens of ``im`` that feed the Hand nodes most (its
    three strongest cells of ``regions``; the three strongest tokens of its graph otherwise)."""
    from atlas.graph import Graph, artifact_path
    from atlas.images import load_stored_image
    from atlas.render import draw_heatmap

    graph = Graph.load(artifact_path(svc.settings.resolved_artifact_dir, im.prompt_id))
    if graph.rollout is None or graph.image_grid is None:
        return None
    sha = im.image.removeprefix("sha256:")
    cells = [(int(r["row"]), int(r["col"])) for r in regions if str(r["image"]) == sha][:3]
    grid = [tuple(int(v) for v in rc) for rc in graph.image_grid.tolist()]
    tokens = [grid.index(c) for c in cells if c in grid] or _strongest_image_tokens(graph)
    image = load_stored_image(svc.settings.resolved_artifact_dir, sha).image
    path = pictures / f"heatmap_{im.path.stem}.png"
    return draw_heatmap(image, graph.rollout, tokens, path).path


def print_contrast(svc: DemoServices, limit: int) -> dict[str, Any] | None:
    """What differs between the six-finger hands answered '5' and the five-finger hands counted
    right: features, edges and paths enriched in one set, with counts, effect sizes and tests."""
    from atlas.circuits.contrast import contrast_reading
    from atlas.errors import InputError
    from atlas.store import queries as q
    from atlas.store.contrast import contrast

    a, b = f"tag:fingers:6 & answer:{TARGET}", f"tag:fingers:5 & answer:{TARGET}"
    try:
        result = contrast(svc.driver, svc.settings, a, b, limit=limit)
    except InputError as exc:  # e.g. one of the sets is empty on this model
        click.echo(f"no contrast: {exc}")
        return None
    out.heading(
        "Six-finger hands answered '5' (A) against five-finger hands counted right (B)",
        f" ({result['n_a']} against {result['n_b']} images; Mann-Whitney and Fisher tests, "
        "Benjamini-Hochberg q)",
    )
    cols = ["name", "k_a", "k_b", "mean_a", "mean_b", "effect", "q_value"]
    for family in ("features", "paths"):
        out.table(
            family,
            cols,
            [
                [
                    r["name"],
                    r["k_a"],
                    r["k_b"],
                    f"{r['mean_a']:+.4g}",
                    f"{r['mean_b']:+.4g}",
                    f"{r['effect']:+.3f}",
                    f"{r['q_value']:.2g}",
                ]
                for r in result[family][:limit]
            ],
        )
    for family in ("features", "edges", "paths"):
        click.echo(f"{family}: {contrast_reading(result, family)}")
    click.echo(_error_reading(svc, result))
    out.cypher_pointer("CT_FEATURES", q.CT_FEATURES)
    out.cli_pointer(f"atlas query contrast --a '{a}' --b '{b}'")
    return result


def _error_reading(svc: DemoServices, result: dict[str, Any]) -> str:
    """What the contrast says about the error: the features that tell the sets apart, or, when
    none does, how many of the visual Hand features both sets share."""
    from atlas.errors import InputError
    from atlas.store.supernodes import show

    feats = result["summary"]["features"]
    if feats["n_significant"]:
        return (
            f"what explains the error: the {feats['n_significant']} features with q < "
            f"{feats['alpha']:g}, first in the table above"
        )
    try:
        members = {m["fid"] for m in show(svc.driver, VISUAL_HAND)["members"]}
    except InputError:
        members = set()
    shared = {item.split("|", 1)[1] for item in feats["shared"] if item.startswith("feature|")}
    return (
        f"what explains the error: no feature tells the {result['n_a']} six-finger hands from "
        f"the {result['n_b']} five-finger ones; {feats['n_shared']} features fire in nearly "
        f"every image of both, {len(members & shared)} of the {len(members)} {VISUAL_HAND} "
        f"features among them: the hand features that drive '{TARGET}' (the routes above) are "
        "there whether the hand has five fingers or six, so the model answers from seeing a "
        "hand, not from counting its fingers (the six-finger case of the VLM paper)"
    )
