"""The demo's steps in order.

1. starts a local Neo4j and a local redis-server in a dedicated demo home
   (``{atlas_home}/demo`` by default, free ports), so a user's own atlas is never touched;
2. starts real Celery worker subprocesses (``atlas worker``): one on the ``attribute`` queue and
   one on the ``ingest`` queue, so ingestion of one prompt overlaps attribution of the next;
3. enqueues a batch of toy-corpus prompts (every hand/finger fact plus other facts) and one of
   toy-VLM image prompts, and waits with a progress line; a re-run skips what the demo atlas
   already holds (``fresh`` wipes it);
4. labels the features (logit lens, top activating tokens, image cells and tags) through the
   worker's ``annotate`` task and defines the text ``Hand`` supernode from the labels that
   mention hand/finger and the ``Visual hand`` one from the most hand-selective features;
5. prints the answers, each with the Cypher behind it (the constant in
   :mod:`atlas.store.queries`): every path from ``Hand`` to the logit ``5`` across the atlas,
   the top contributors, the global circuit, the six-finger case (:mod:`atlas.demo.vision`)
   and its contrast;
6. proposes supernodes from the atlas and matches them against the Hand supernodes, then
   validates the visual one by ablation (:mod:`atlas.demo.proposals`);
7. runs the interventions through the workers (:mod:`atlas.demo.causal`): the visual Hand
   ablated on the six-finger hands, a circuit patched from an Earth image into a Mars one;
8. stops everything it started.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import click

from atlas.demo import causal, proposals, text, vision
from atlas.demo.services import Steps, demo_services
from atlas.errors import ConfigError

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings


@dataclass(frozen=True)
class DemoOptions:
    n_prompts: int = 120
    home: Path | None = None
    fresh: bool = False
    max_hops: int = 3
    min_weight: float = 0.3
    limit: int = 15
    timeout_s: float = 1800.0


def run_demo(opts: DemoOptions, user: AtlasSettings) -> None:
    """Run every step on the services of the demo home (never the user's own atlas)."""
    home = (opts.home or user.atlas_home / "demo").resolve()
    if home == user.atlas_home.resolve() or home == user.local_neo4j_home.resolve():
        raise ConfigError(f"the demo home {home} would share the user's atlas; choose another")
    steps = Steps()
    with steps.step("toy world"):
        from atlas.toy import toy_paths
        from atlas.toy.vision_build import vision_paths

        toy = toy_paths(user.atlas_home)
        vlm = vision_paths()
        click.echo(f"    model {toy.model_dir}\n    transcoders {toy.transcoder_dir}", err=True)
        click.echo(f"    VLM {vlm.model_dir}\n    transcoders {vlm.transcoder_dir}", err=True)

    with demo_services(home, user, steps) as svc:
        if opts.fresh:
            with steps.step("wiping the demo atlas (--fresh)"):
                from atlas.store import queries as q
                from atlas.store.connection import run_autocommit

                run_autocommit(
                    svc.driver,
                    q.WIPE_DATABASE,
                    database=svc.settings.neo4j_database,
                    what="wiping the demo atlas",
                )

        summary = text.text_batch(svc, steps, toy, opts.n_prompts, opts.timeout_s)
        images = vision.image_batch(svc, steps, home / "images", opts.timeout_s)
        text.label_features(svc, steps, toy.model_dir, toy.transcoder_dir, opts.timeout_s)
        text.label_features(svc, steps, vlm.model_dir, vlm.transcoder_dir, opts.timeout_s)
        text.hand_supernode(svc, steps)
        visual = vision.visual_hand_supernode(svc, steps, images)
        pictures = home / "pictures"
        pictures.mkdir(parents=True, exist_ok=True)
        with steps.step("querying the atlas"):
            stats = text.print_paths_answer(
                svc, opts.max_hops, opts.min_weight, opts.limit, pictures
            )
            text.print_global_circuit(svc, opts.limit, pictures)
            vision.print_answers_by_count(images)
            case = vision.six_finger_case(
                svc,
                images,
                visual,
                max_hops=opts.max_hops,
                min_weight=opts.min_weight,
                limit=opts.limit,
                pictures=pictures,
            )
            vision.print_contrast(svc, opts.limit)
            from atlas.store.read import count_prompts

            in_atlas = count_prompts(svc.driver, database=svc.settings.neo4j_database)
        refs = {"model": str(vlm.model_dir), "transcoders": str(vlm.transcoder_dir)}
        proposals.print_proposals(svc, steps, refs)
        six5 = [im.as_target() for im in case["six5"]]
        if six5:
            causal.ablate_features(
                svc,
                steps,
                refs,
                six5,
                f"the {len(visual.features)} visual Hand features",
                visual.features,
                visual.positions,
                ["5", "6"],
                opts.timeout_s,
            )
        planets = {im.tag("planet"): im for im in images if im.tag("planet")}
        if "mars" in planets and "earth" in planets:
            causal.patch_circuit(
                svc,
                steps,
                refs,
                planets["mars"].as_target(),
                planets["earth"].as_target(),
                ["mars", "earth"],
                opts.timeout_s,
            )
        from atlas.web import serve_command

        click.echo(f"\npictures: {pictures}")
        click.echo("browse this atlas (the demo's services stop now; serving starts them again):")
        click.echo("    " + serve_command(atlas_home=home).replace("\n", "\n    "))
        click.echo(
            f"\ndemo: {summary.done} prompts done by this batch, {in_atlas} in the atlas; "
            f"{stats['n_paths']} paths "
            f"{text.HAND} -> '{text.TARGET}' over {stats['n_routes']} routes; "
            f"{len(case['six5'])} six-finger hands answered '5'; "
            f"total {steps.total:.0f}s",
            err=True,
        )
