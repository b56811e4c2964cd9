"""The demo's supernode proposals: proposed from the whole atlas, matched against the Hand
supernodes defined from labels, and the best match for the visual one proved by ablating it."""

from __future__ import annotations

from operator import itemgetter
from typing import Any

import click

from atlas.demo import output as out
from atlas.demo import text
from atlas.demo.services import DemoServices, Steps

#: The visual Hand from labels: image features named by the tags of hand images.
HAND_IMAGES = "Hand images"
HAND_IMAGES_PATTERN = r"images: hand\b.*"
#: Features active in fewer prompts are not clustered.
MIN_PROMPTS = 3
#: Prompts the validation ablates on.
VALIDATE_ON = 5


def print_proposals(svc: DemoServices, steps: Steps, vlm: dict[str, str]) -> dict[str, Any]:
    """Propose supernodes over every stored prompt (stored as kind ``proposed``), print the best
    match for the text ``Hand`` and for ``Hand images`` with precision and recall, and validate
    the latter's match by ablation on the VLM (``vlm``: its ``model`` and ``transcoders``)."""
    from atlas.circuits.proposals import best_match
    from atlas.store import queries as q
    from atlas.store.proposals import propose_supernodes, validate_proposal
    from atlas.store.supernodes import define_from_label, show

    driver, db = svc.driver, svc.settings.neo4j_database
    timeout_s = float(svc.settings.query_timeout_s)
    with steps.step("proposing supernodes from the atlas (co-activation, shared edges, labels)"):
        found = propose_supernodes(
            driver, None, min_prompts=MIN_PROMPTS, database=db, timeout_s=timeout_s
        )
        n_images = define_from_label(driver, HAND_IMAGES, HAND_IMAGES_PATTERN, database=db)
        click.echo(
            f"    {sum(p['level'] == 1 for p in found)} tight groups, "
            f"{sum(p['level'] == 2 for p in found)} concepts; {HAND_IMAGES}: {n_images} features "
            f"(label =~ {HAND_IMAGES_PATTERN!r})",
            err=True,
        )
    matches = {}
    for ref in (text.HAND, HAND_IMAGES):
        members = {m["fid"] for m in show(driver, ref, database=db)["members"]}
        matches[ref] = (len(members), *best_match(found, list(members), itemgetter("members")))
    out.heading(
        "Supernodes proposed from the atlas",
        f" ({len(found)} over every prompt; the best match for each Hand supernode defined "
        "from labels)",
    )
    out.table(
        None,
        ["supernode", "members", "best proposal", "level", "its members", "precision", "recall"],
        [
            [ref, n, p["name"], p["level"], p["n_members"], f"{prec:.2f}", f"{rec:.2f}"]
            for ref, (n, p, prec, rec) in matches.items()
            if p is not None
        ],
    )
    result: dict[str, Any] = {"found": found, "matches": matches}
    best = matches[HAND_IMAGES][1]
    if best is not None:
        with steps.step(f"validating {best['name']!r} by ablation on the VLM"):
            res = validate_proposal(
                driver,
                svc.settings,
                best["name"],
                model=vlm["model"],
                transcoders=vlm["transcoders"],
                n_prompts=VALIDATE_ON,
            )
        click.echo(
            f"ablating {best['name']!r} ({best['n_members']} features, each times -1, constrained "
            f"over every layer) on the {res['validation_prompts']} prompts where it is most "
            f"active: KL {res['validation_kl']:.3g}, the clean top token's probability down by "
            f"{res['validation_drop']:.3f}"
        )
        result["validation"] = res
    out.cypher_pointer("PROP_FEATURE_INSTANCES", q.PROP_FEATURE_INSTANCES)
    out.cli_pointer(
        f"atlas supernode propose --min-prompts {MIN_PROMPTS}; atlas supernode validate NAME "
        f"--prompts {VALIDATE_ON} --model M --transcoders T"
    )
    return result
