"""The demo's causal steps, through the same queue and store as attribution: ablating a visual
supernode on image prompts (the six-finger case: does removing "hand" move P('5') and P('6'),
as the graph predicts?), and circuit patching between two images (a Mars picture given the
Earth picture's features: those at the image tokens, and the circuit at the question's
positions).

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


def _span(positions: Sequence[int]) -> str:
    if positions and list(positions) == list(range(positions[0], positions[-1] + 1)):
        return f"{positions[0]}..{positions[-1]}"
    return ", ".join(str(p) for p in positions)


def ablate_features(
    svc: DemoServices,
    steps: Steps,
    refs: dict[str, str],
    prompts: Sequence[ImagePrompt],
    name: str,
    features: Sequence[tuple[int, int]],
    positions: Sequence[int],
    watch: Sequence[str],
    timeout_s: float,
) -> dict[str, Any]:
    """Ablate ``features`` (``(layer, index)``) at every one of ``positions`` on each prompt
    (iterative, attention frozen; inactive ones are left as they are) and print the watched
    tokens' probabilities before and after, with the graph's direct-effect prediction of each
    demeaned-logit change next to the measured one (when the graph has the feature)."""
    from atlas.pipeline.intervention_payloads import parse_intervention
    from atlas.store import queries as q

    edits = [
        {"layer": lay, "pos": pos, "feature": f, "mode": "ablate"}
        for lay, f in features
        for pos in positions
    ]
    specs = [
        parse_intervention(
            refs
            | {
                "prompt": p.prompt,
                "image": p.image,
                "edits": edits,
                "watch": list(watch),
                "store": True,
            }
        )
        for p in prompts
    ]
    with steps.step(f"ablating {name} on {len(specs)} image prompts (workers)"):
        summary = _run_job(svc, specs, timeout_s)
    rows = _stored(svc, [s.content_id() for s in specs])
    columns = ["image", "KL"]
    for t in watch:
        columns += [f"P({t}) before", f"P({t}) after", f"d logit {t}", f"predicted d {t}"]
    table = []
    done = []
    for p, s in zip(prompts, specs, strict=True):
        r = rows.get(s.content_id())
        if r is None:
            table.append([p.label, "failed", *(["-"] * 4 * len(watch))])
            continue
        cells = [p.label, f"{r['kl']:.3g}" if r["kl"] is not None else "-"]
        for t in watch:
            cells += _watch_cells(r, t)
        table.append(cells)
        done.append(r)
    out.heading(
        f"Ablating {name} on {len(prompts)} images",
        f" ({len(features)} features set to 0 at positions {_span(positions)}; iterative, "
        "attention frozen; d logit: demeaned logit change measured, and predicted by the "
        "graph's direct effects where the graph has the feature)",
    )
    out.table(None, columns, table)
    out.cypher_pointer("INTERVENTIONS_BY_ID", q.INTERVENTIONS_BY_ID)
    out.cli_pointer(
        "atlas intervene --prompt TEXT --image PNG --ablate L:POS:F ... "
        + " ".join(f"--watch {t}" for t in watch)
    )
    return {"done": summary.done, "failed": summary.failed, "rows": done}


def _question_features(svc: DemoServices, prompt_ids: Sequence[str]) -> list[tuple[int, int, int]]:
    """``(layer, pos, feature)`` of every feature node at a text position (not BOS, not an
    image token) of these prompts' stored graphs."""
    from atlas.graph import Graph, artifact_path

    found: set[tuple[int, int, int]] = set()
    for pid in prompt_ids:
        g = Graph.load(artifact_path(svc.settings.resolved_artifact_dir, pid))
        image = set() if g.image_positions is None else set(g.image_positions.tolist())
        for layer, pos, f in zip(g.layer.tolist(), g.pos.tolist(), g.feature.tolist(), strict=True):
            if f >= 0 and pos > 0 and pos not in image:
                found.add((layer, pos, f))
    return sorted(found)


def patch_circuit(
    svc: DemoServices,
    steps: Steps,
    refs: dict[str, str],
    recipient: ImagePrompt,
    donor: ImagePrompt,
    watch: Sequence[str],
    timeout_s: float,
) -> dict[str, Any] | None:
    """Circuit patching, two ways, the rest of the recipient's computation live: (1) every
    feature at the image tokens takes the donor's activation there; (2) the circuit at the
    question's positions: every feature node of either prompt's stored graph there takes the
    donor's activation (features only the recipient had become 0). Prints the answers."""
    from atlas.pipeline.intervention_payloads import parse_intervention
    from atlas.store import queries as q

    circuit = _question_features(svc, [recipient.prompt_id, donor.prompt_id])
    base = refs | {
        "prompt": recipient.prompt,
        "image": recipient.image,
        "donor": donor.prompt_id,
        "watch": list(watch),
        "store": True,
    }
    ways = {
        "image-token features": parse_intervention(base | {"patch_image_tokens": True}),
        f"the circuit at the question ({len(circuit)} features)": parse_intervention(
            base | {"edits": [{"layer": lay, "pos": pos, "feature": f} for lay, pos, f in circuit]}
        ),
    }
    specs = list(ways.values())
    with steps.step(f"patching {donor.label} into {recipient.label}, two ways (workers)"):
        _run_job(svc, specs, timeout_s)
    rows = _stored(svc, [s.content_id() for s in specs])
    out.heading(
        f"Circuit patching: {recipient.label} given {donor.label}'s features",
        " (the patched features take the donor image's activations; everything else computes "
        "live on the recipient's image; attention frozen)",
    )
    table = []
    for what, spec in ways.items():
        row = rows.get(spec.content_id())
        if row is None:
            table.append([what, "failed", "-", "-"])
            continue
        top = row.get("top") or []
        answer = max(top, key=lambda t: t["steered"]) if top else None
        cells = [what, f"{row['kl']:.3g}"]
        cells.append("-" if answer is None else f"{answer['token']!r} ({answer['steered']:.3f})")
        for t in watch:
            w = next((x for x in row.get("watch") or [] if x["token"] == t), None)
            cells.append("-" if w is None else f"{w['base']:.3f} -> {w['steered']:.3f}")
        table.append(cells)
    out.table(
        None,
        ["patched", "KL", "answer after", *(f"P({t})" for t in watch)],
        table,
    )
    out.cypher_pointer("INTERVENTIONS_BY_ID", q.INTERVENTIONS_BY_ID)
    out.cli_pointer(
        f"atlas intervene --prompt {recipient.prompt!r} --image MARS.png "
        f"--donor {donor.prompt_id} --patch-image-tokens   (a circuit: --set L:POS:F=0 ... "
        "names the features that take the donor's values)"
    )
    done = [rows[s.content_id()] for s in specs if s.content_id() in rows]
    return {"rows": done, "circuit": circuit}
