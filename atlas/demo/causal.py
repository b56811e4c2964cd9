"""The demo's causal steps, through the same queue and store as attribution: ablating a visual
supernode on image prompts (the six-finger case: does removing "hand" move P('5') and P('6'),
as the graph predicts?), and circuit patching between two images (a Mars picture given the
Earth picture's image-token features).

Every intervention is an ``atlas.gpu.intervene`` job item run by the demo's attribute worker and
stored next to its prompt; what is printed comes back from the store. Whatever the toy model
does is printed as measured: nothing here is tuned to show a wished-for effect.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import click

from atlas.demo import output as out
from atlas.demo.services import DemoServices, Steps


@dataclass(frozen=True)
class ImagePrompt:
    """A stored image prompt the demo intervenes on."""

    prompt_id: str
    prompt: str
    image: str
    """``sha256:<hex>`` of its stored image."""
    label: str
    """How tables name it (its tags)."""


def _run_job(svc: DemoServices, specs: Sequence[Any], timeout_s: float) -> Any:
    from atlas.pipeline.interventions import submit_interventions
    from atlas.pipeline.submit import wait_for_job

    job = submit_interventions(svc.settings, svc.driver, list(specs))
    summary = wait_for_job(svc.settings, svc.driver, job, timeout_s=timeout_s)
    click.echo(
        f"    intervention job {job}: {summary.done} done, {summary.failed} failed", err=True
    )
    return summary


def _stored(svc: DemoServices, ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    from atlas.store.interventions import interventions_by_id

    return {
        r["id"]: r
        for r in interventions_by_id(svc.driver, ids, database=svc.settings.neo4j_database)
    }


def _watch_cells(row: dict[str, Any], token: str) -> list[str]:
    w = next((x for x in row.get("watch") or [] if x["token"] == token), None)
    if w is None:
        return ["-", "-", "-", "-"]
    fmt = lambda x: "-" if x is None else f"{x:+.3f}"  # noqa: E731
    return [
        f"{w['base']:.3f}",
        f"{w['steered']:.3f}",
        fmt(w["measured_logit"]),
        fmt(w["predicted_logit"]),
    ]


def ablate_supernode(
    svc: DemoServices,
    steps: Steps,
    refs: dict[str, str],
    prompts: Sequence[ImagePrompt],
    supernode: str,
    watch: Sequence[str],
    timeout_s: float,
) -> dict[str, Any]:
    """Ablate ``supernode`` (multiplier 0, iterative, attention frozen) on each prompt and print
    the watched tokens' probabilities before and after, with the graph's direct-effect
    prediction of each demeaned-logit change next to the measured one."""
    from atlas.pipeline.intervention_payloads import parse_intervention
    from atlas.store import queries as q

    specs = [
        parse_intervention(
            refs
            | {
                "prompt": p.prompt,
                "image": p.image,
                "supernode": {"name": supernode, "multiplier": 0.0},
                "watch": list(watch),
                "store": True,
            }
        )
        for p in prompts
    ]
    with steps.step(f"ablating {supernode} on {len(specs)} image prompts (workers)"):
        summary = _run_job(svc, specs, timeout_s)
    rows = _stored(svc, [s.content_id() for s in specs])
    columns = ["image", "KL"]
    for t in watch:
        columns += [f"P({t}) before", f"P({t}) after", f"d logit {t}", f"predicted d {t}"]
    table = []
    moved = []
    for p, s in zip(prompts, specs, strict=True):
        r = rows.get(s.content_id())
        if r is None:
            table.append([p.label, "failed", *(["-"] * 4 * len(watch))])
            continue
        cells = [p.label, f"{r['kl']:.3g}" if r["kl"] is not None else "-"]
        for t in watch:
            cells += _watch_cells(r, t)
        table.append(cells)
        moved.append(r)
    out.heading(
        f"Ablating the {supernode} supernode on {len(prompts)} images",
        " (every member at every position where it is active set to 0; iterative, attention "
        "frozen; d logit: demeaned logit change measured, and predicted by the graph's direct "
        "effects)",
    )
    out.table(None, columns, table)
    out.cypher_pointer("INTERVENTIONS_BY_ID", q.INTERVENTIONS_BY_ID)
    out.cli_pointer(
        f"atlas intervene --prompt TEXT --image PNG --supernode '{supernode}=0' "
        + " ".join(f"--watch {t}" for t in watch)
    )
    return {"done": summary.done, "failed": summary.failed, "rows": moved}


def patch_circuit(
    svc: DemoServices,
    steps: Steps,
    refs: dict[str, str],
    recipient: ImagePrompt,
    donor: ImagePrompt,
    watch: Sequence[str],
    timeout_s: float,
) -> dict[str, Any] | None:
    """Circuit patching: every feature of either prompt's stored graph at an image-token position
    takes the donor's activation there (features only the recipient had become 0), the rest of
    the recipient's computation live. Prints the answer before and after."""
    from atlas.graph import Graph, artifact_path
    from atlas.pipeline.intervention_payloads import parse_intervention
    from atlas.store import queries as q

    root = svc.settings.resolved_artifact_dir
    graphs = [Graph.load(artifact_path(root, p.prompt_id)) for p in (recipient, donor)]
    features: set[tuple[int, int, int]] = set()
    for g in graphs:
        if g.image_positions is None:
            return None
        img = set(g.image_positions.tolist())
        is_feature = g.feature >= 0
        for lay, pos, f in zip(
            g.layer[is_feature].tolist(),
            g.pos[is_feature].tolist(),
            g.feature[is_feature].tolist(),
            strict=True,
        ):
            if pos in img:
                features.add((int(lay), int(pos), int(f)))
    if not features:
        click.echo(
            "    no feature of either graph sits on an image token: nothing to patch", err=True
        )
        return None
    spec = parse_intervention(
        refs
        | {
            "prompt": recipient.prompt,
            "image": recipient.image,
            "donor": donor.prompt_id,
            "edits": [
                {"layer": lay, "pos": pos, "feature": f, "mode": "set", "amount": 0.0}
                for lay, pos, f in sorted(features)
            ],
            "watch": list(watch),
            "store": True,
        }
    )
    with steps.step(f"patching {donor.label}'s image features into {recipient.label} (workers)"):
        _run_job(svc, [spec], timeout_s)
    row = _stored(svc, [spec.content_id()]).get(spec.content_id())
    out.heading(
        f"Circuit patching: {recipient.label} given {donor.label}'s image-token features",
        f" ({len(features)} features at image positions of either graph)",
    )
    if row is None:
        click.echo("the intervention failed: see `atlas jobs`")
        return None
    top = row.get("top") or []
    base = max(top, key=lambda t: t["base"]) if top else None
    steered = max(top, key=lambda t: t["steered"]) if top else None
    out.table(
        None,
        ["token", f"P on {recipient.label}", "P after patching"],
        [[t["token"], f"{t['base']:.3f}", f"{t['steered']:.3f}"] for t in top[:6]],
    )
    if base is not None and steered is not None:
        click.echo(
            f"answer before: {base['token']!r} ({base['base']:.3f}); "
            f"after: {steered['token']!r} ({steered['steered']:.3f}); KL {row['kl']:.3g}"
        )
    out.cypher_pointer("INTERVENTIONS_BY_ID", q.INTERVENTIONS_BY_ID)
    out.cli_pointer(
        f"atlas intervene --prompt {recipient.prompt!r} --image MARS.png --donor {donor.prompt_id} "
        "--set L:POS:F=0 ..."
    )
    return row
