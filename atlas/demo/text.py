"""The demo's text part: a batch of toy-corpus prompts through the workers, feature labels, the
``Hand`` supernode, and every path from it to the logit ``5`` across the atlas."""

from __future__ import annotations

import time
from typing import Any

import click

from atlas.demo import output as out
from atlas.demo.services import DemoServices, Steps
from atlas.errors import AtlasError
from workers.app import ANNOTATE_TASK

#: Label pattern of the Hand supernode (a full-match regex over feature labels): features whose
#: labels mention hand or finger, except those named by the tags of hand images
#: (``images: hand``), which the visual Hand supernode covers.
HAND_PATTERN = r"(?i)(?!images:).*\b(hands?|fingers?)\b.*"
HAND = "Hand"
TARGET = "5"


def run_batch(
    svc: DemoServices, steps: Steps, specs: list[Any], what: str, timeout_s: float
) -> Any:
    """Submit ``specs`` as one job and wait for it with a progress line; its summary."""
    from atlas.cli.jobs import JobProgress, wait_showing
    from atlas.pipeline.submit import submit

    with steps.step(what):
        with JobProgress(bar=False) as view:
            job_id, _ = submit(
                svc.settings, specs, source="atlas demo", driver=svc.driver, progress=view
            )
        t0 = time.monotonic()
        summary = wait_showing(
            svc.settings, svc.driver, job_id, timeout_s=timeout_s, requeue_after_s=300.0
        )
        rate = summary.done / max(time.monotonic() - t0, 1e-6) * 60
        click.echo(
            f"    job {job_id}: {summary.done} done, {summary.failed} failed; {rate:.0f} prompts/min",
            err=True,
        )
    return summary


def text_batch(svc: DemoServices, steps: Steps, toy: Any, n_prompts: int, timeout_s: float) -> Any:
    from atlas.pipeline.payloads import PromptSpec
    from atlas.toy.demo import demo_prompts

    prompts = demo_prompts(n_prompts)
    n_hand = sum("hand" in p for p in prompts)
    specs = [
        PromptSpec(prompt=p, model=str(toy.model_dir), transcoders=str(toy.transcoder_dir))
        for p in prompts
    ]
    return run_batch(
        svc, steps, specs, f"batch of {len(prompts)} prompts ({n_hand} about hands)", timeout_s
    )


def label_features(
    svc: DemoServices, steps: Steps, model_dir: Any, tc_dir: Any, timeout_s: float
) -> None:
    from atlas.pipeline.payloads import AnnotatePayload

    with steps.step("labelling features (logit lens + top activating tokens)"):
        payload = AnnotatePayload(model=str(model_dir), transcoders=str(tc_dir))
        res = svc.app.send_task(ANNOTATE_TASK, args=[payload.model_dump(mode="json")]).get(
            timeout=timeout_s
        )
        click.echo(f"    {res}", err=True)


def hand_supernode(svc: DemoServices, steps: Steps) -> int:
    from atlas.store.supernodes import define_from_label

    with steps.step(f"supernode {HAND}: features whose labels mention hand/finger"):
        n_members = define_from_label(
            svc.driver, HAND, HAND_PATTERN, database=svc.settings.neo4j_database
        )
        click.echo(f"    {n_members} features (label =~ {HAND_PATTERN!r})", err=True)
        if n_members == 0:
            raise AtlasError("no feature label mentions hand/finger: nothing to trace")
    return n_members


def print_paths_answer(
    svc: DemoServices, max_hops: int, min_weight: float, limit: int, pictures: Any
) -> dict[str, Any]:
    """Every path from ``Hand`` to ``5`` across the atlas, grouped by route, the strongest
    single paths, and the top contributors to ``5``, each with its Cypher."""
    from atlas.store import queries as q
    from atlas.store.read import paths, top_contributors

    driver, settings = svc.driver, svc.settings
    db = settings.neo4j_database
    result = paths(
        driver,
        f"supernode:{HAND}",
        f"logit:{TARGET}",
        max_hops=max_hops,
        min_weight=min_weight,
        limit=100_000,
        cap=100_000,
        database=db,
    )
    found, aggregate = result["paths"], result["aggregate"]
    n_prompts = len({p["prompt"] for p in found}) if found else 0
    out.heading(
        f"All paths from {HAND} to '{TARGET}' across the atlas",
        f" (1..{max_hops} hops, every edge |w| >= {min_weight:g}: "
        f"{sum(g['n_paths'] for g in aggregate)} paths in {n_prompts} prompts"
        + (", capped" if result.get("truncated") else "")
        + ")",
    )
    out.routes_table(aggregate, limit, "route (Hand feature -> ... -> logit)", "prompts")
    if found:
        top = found[: min(10, limit)]
        texts = out.prompt_texts(driver, settings, sorted({p["prompt"] for p in top}))
        out.table(
            "strongest single paths",
            ["prompt", "nodes", "weights", "score"],
            [
                [
                    repr(texts.get(p["prompt"], p["prompt"][:12])),
                    " -> ".join(p["nodes"]),
                    ", ".join(f"{w:+.3g}" for w in p["weights"]),
                    f"{p['score']:+.4g}",
                ]
                for p in top
            ],
        )
    out.cypher_pointer(f"PATHS[{max_hops}]  (built from _PATHS_TEMPLATE)", q.PATHS[max_hops])
    out.cli_pointer(
        f"atlas query paths --from supernode:{HAND} --to logit:{TARGET} "
        f"--max-hops {max_hops} --min-weight {min_weight:g}"
    )
    from atlas.render import draw_paths

    drawn = draw_paths(
        {"aggregate": aggregate[:limit]},
        pictures / "paths_hand_to_5.png",
        title=f"the {min(limit, len(aggregate))} strongest routes {HAND} -> '{TARGET}'",
    )
    click.echo(f"picture of these routes: {drawn.path}")

    rows = top_contributors(driver, f"logit:{TARGET}", limit=15, database=db)
    out.heading(f"Top contributors to '{TARGET}' across the atlas")
    out.table(
        None,
        ["source", "kind", "layer", "prompts", "sum |w|", "sum w", "max w"],
        [
            [
                r["name"],
                r["kind"],
                r["layer"],
                r["n_prompts"],
                f"{r['sum_abs']:.4g}",
                f"{r['sum_w']:+.4g}",
                f"{r['max_w']:+.4g}",
            ]
            for r in rows
        ],
    )
    out.cypher_pointer("TOP_CONTRIBUTORS", q.TOP_CONTRIBUTORS)
    out.cli_pointer(f"atlas query contributors logit:{TARGET}")
    return {
        "n_paths": sum(g["n_paths"] for g in aggregate),
        "n_routes": len(aggregate),
        "n_prompts_with_paths": n_prompts,
        "n_contributors": len(rows),
    }


def print_global_circuit(svc: DemoServices, limit: int, pictures: Any) -> dict[str, Any]:
    """The global circuit from ``Hand`` to ``5`` over the hand prompts: per feature pair the
    prompts with the edge, its mean weight and ERA/TWERA, pruned by influence; and its picture."""
    from atlas.render import draw_global_circuit
    from atlas.store import queries as q
    from atlas.store.global_circuit import global_circuit

    flt = r"text:\bhands?\b"
    result = global_circuit(svc.driver, svc.settings, f"supernode:{HAND}", f"logit:{TARGET}", flt)
    out.heading(
        f"Global circuit {HAND} -> '{TARGET}' over the {result['n_prompts']} hand prompts",
        f" ({len(result['nodes'])} nodes, {len(result['edges'])} edges kept by influence)",
    )
    out.table(
        None,
        ["source", "target", "prompts", "mean w", "ERA", "TWERA", "score"],
        [
            [
                e["source_name"],
                e["target_name"],
                e["n_prompts"],
                f"{e['mean_w']:+.4g}",
                f"{e['era']:+.4g}",
                f"{e['twera']:+.4g}",
                f"{e['score']:.4g}",
            ]
            for e in result["edges"][:limit]
        ],
    )
    out.cypher_pointer("GC_PAIR_STATS", q.GC_PAIR_STATS)
    out.cli_pointer(
        f"atlas query global --from supernode:{HAND} --to logit:{TARGET} --prompts '{flt}'"
    )
    path = pictures / "global_hand_to_5.png"
    edges = [
        (e["source_name"], e["target_name"], e["mean_w"], e["n_prompts"])
        for e in result["edges"][:40]
    ]
    drawn = draw_global_circuit(edges, path, title=f"{HAND} -> '{TARGET}' over hand prompts")
    click.echo(f"picture of the global circuit: {drawn.path}")
    result["picture"] = drawn.path
    return result
