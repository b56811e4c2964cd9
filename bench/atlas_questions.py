"""Atlas questions at scale and on the toy world: supernode proposals, global circuits,
contrasts and annotation, with wall time and peak memory.

    # the toy text world: attribute N demo prompts into a fresh local Neo4j, annotate, define
    # concept groups from labels (Hand, legs, colour), propose supernodes, and report precision
    # and recall of the best-matching proposal against each, first level alone (tight groups)
    # and with the second (concepts); then the global circuit Hand -> 5 over the hand prompts
    # and the contrast of hand prompts against the others
    .venv/bin/python bench/atlas_questions.py toy --prompts 120

    # also the toy vision demo's image prompts, and the visual Hand supernodes as references:
    # from labels (image features named by the tags of hand images), and from the model (the
    # features most selective for hand images, atlas.toy.vision_demo.hand_features());
    # --reference NAME adds any supernode already in the atlas (--home DIR keeps and reuses one)
    .venv/bin/python bench/atlas_questions.py toy --prompts 120 --vision

    # a bench/store.py atlas (synthetic prompts): proposals, a global circuit and a contrast
    .venv/bin/python bench/atlas_questions.py store --home /tmp/atlas-bench/neo4j

Peak memory: this process's maximum resident set (``ru_maxrss``) and the Neo4j launcher's
(``VmHWM`` of its process). Results go to stdout as JSON lines and, with ``--out``, to a file.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: concept groups of the toy text world, defined from feature labels (full-match regexes; a
#: label named by image tags, ``images: ...``, belongs to an image feature)
TOY_GROUPS = {
    "Hand": r"(?i)(?!images:).*\b(hands?|fingers?)\b.*",
    "Legs": r"(?i)(?!images:).*\b(legs?|spider|dog|cat|horse|ant|insect|bird)\b.*",
    "Colour": (
        r"(?i)(?!images:).*\b(colou?r|blue|red|green|yellow|white|black|orange|brown|grey|purple"
        r"|pink)\b.*"
    ),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def neo4j_peak_mb(home: Path) -> float | None:
    try:
        pid = json.loads((home / "neo4j.pid").read_text())["pid"]
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, KeyError, ValueError):
        return None
    return None


def timed(report: dict[str, Any], name: str, fn: Callable[[], Any]) -> Any:
    t0 = time.perf_counter()
    out = fn()
    report[f"{name}_s"] = round(time.perf_counter() - t0, 2)
    print(f"{name}: {report[f'{name}_s']:.1f} s", flush=True)
    return out


def start_neo4j(home: Path, heap: str, pagecache: str) -> tuple[Any, Callable[[], None]]:
    from atlas.services import neo4j_local
    from atlas.settings import AtlasSettings

    settings = AtlasSettings(_env_file=None, atlas_home=home.parent)  # type: ignore[call-arg]
    uri = neo4j_local.start(
        settings,
        home=home,
        port=free_port(),
        heap=heap,
        pagecache=pagecache,
        die_with_parent=True,
    )
    settings = AtlasSettings(  # type: ignore[call-arg]
        _env_file=None, atlas_home=home.parent, neo4j_uri=uri, query_timeout_s=600
    )
    return settings, lambda: neo4j_local.stop(settings, home=home)


def match_row(props: list[Any], members: list[str], fids: list[str]) -> dict[str, Any]:
    """The best-matching proposal's precision and recall against a reference member list
    (recall also among the reference members that were candidates)."""
    from atlas.circuits.proposals import best_match

    best, prec, rec = best_match(props, members)
    f1 = 2 * prec * rec / (prec + rec) if best is not None and prec + rec > 0 else 0.0
    cands = set(members) & set(fids)
    hit = len(set(best.members) & cands) if best is not None else 0
    return {
        "best": best.name if best else None,
        "level": best.level if best else None,
        "n_members": len(best.members) if best else 0,
        "precision": round(prec, 3),
        "recall": round(rec, 3),
        "recall_of_candidates": round(hit / len(cands), 3) if cands else None,
        "f1": round(f1, 3),
    }


def add_vision(settings: Any, driver: Any, home: Path) -> str | None:
    """Attribute the toy vision demo's image prompts into the atlas; the content hash of the
    VLM's transcoder set, or None when no prompt was stored."""
    from atlas.graph import Graph, artifact_path
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import job_store, submit
    from atlas.toy.vision_demo import demo_image_prompts

    items = demo_image_prompts(home.parent / "images")
    job, _ = submit(
        settings, [PromptSpec(**item.spec()) for item in items], source="bench", driver=driver
    )
    ids = [r.prompt_id for r in job_store(driver, settings).items(job) if r.prompt_id]
    if not ids:
        return None
    graph = Graph.load(artifact_path(settings.resolved_artifact_dir, ids[0]))
    return graph.metadata.transcoders.content_hash


def visual_references(driver: Any, tset: str) -> list[str]:
    """The visual Hand supernodes (after labelling): from labels (image features named by the
    tags of hand images), and, independent of the atlas, the features whose hand selectivity on
    held-out images (:func:`atlas.toy.vision_demo.feature_selectivity`) exceeds 1, and the 8
    most selective (the demo's VisualHand); the names of those with a stored member."""
    from atlas.demo.proposals import HAND_IMAGES_PATTERN
    from atlas.errors import InputError
    from atlas.store.supernodes import define_from_features, define_from_label
    from atlas.toy.vision_demo import hand_features

    names = []
    if define_from_label(driver, VISUAL_HAND, HAND_IMAGES_PATTERN):
        names.append(VISUAL_HAND)
    for name, specs in (
        (VISUAL_HAND_SELECTIVE, hand_features(top=None, min_selectivity=1.0)),
        (VISUAL_HAND_TOP8, hand_features()),
    ):
        try:
            define_from_features(driver, name, specs, tset=tset)
        except InputError:
            continue
        names.append(name)
    return names


VISUAL_HAND = "Visual hand"
VISUAL_HAND_SELECTIVE = "Visual hand (selectivity > 1)"
VISUAL_HAND_TOP8 = "Visual hand (top 8)"


def toy(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from atlas.circuits.lens import logit_lens_for
    from atlas.circuits.proposals import ProposalSettings, concepts, propose
    from atlas.models.loading import load_model
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.submit import submit
    from atlas.store.connection import open_driver
    from atlas.store.contrast import contrast
    from atlas.store.global_circuit import global_circuit
    from atlas.store.labels import label_features, store_lens
    from atlas.store.prompt_filter import select_prompts
    from atlas.store.proposals import gather_inputs, propose_supernodes
    from atlas.store.schema import apply_schema
    from atlas.store.supernodes import define_from_label, show
    from atlas.toy import toy_paths
    from atlas.toy.demo import demo_prompts
    from atlas.transcoders.loading import load_transcoders

    torch.set_num_threads(1)
    home = Path(args.home or tempfile.mkdtemp(prefix="atlas-questions-")) / "neo4j"
    settings, stop = start_neo4j(home, args.heap, args.pagecache)
    report: dict[str, Any] = {"world": "toy", "prompts": args.prompts}
    try:
        driver = open_driver(settings)
        apply_schema(driver)
        paths = toy_paths()
        prompts = demo_prompts(args.prompts)
        specs = [
            PromptSpec(prompt=p, model=str(paths.model_dir), transcoders=str(paths.transcoder_dir))
            for p in prompts
        ]
        job, _ = timed(
            report,
            "attribute_and_ingest",
            lambda: submit(settings, specs, source="bench", driver=driver),
        )
        references = list(args.reference)
        vlm_tset = None
        if args.vision:
            vlm_tset = timed(
                report, "vision_attribute_and_ingest", lambda: add_vision(settings, driver, home)
            )
        model = load_model(paths.model_dir)
        tcs = load_transcoders(paths.transcoder_dir, model)
        timed(report, "logit_lens", lambda: store_lens(driver, logit_lens_for(model, tcs)))
        report["labelled"] = timed(report, "label", lambda: label_features(driver))
        refs: dict[str, list[str]] = {}
        for name, pattern in TOY_GROUPS.items():
            define_from_label(driver, name, pattern)
            refs[name] = [m["fid"] for m in show(driver, name)["members"]]
        if vlm_tset:
            references += visual_references(driver, vlm_tset)
        for name in references:
            refs[name] = [m["fid"] for m in show(driver, name)["members"]]
        found = timed(
            report,
            "propose",
            lambda: propose_supernodes(driver, None, min_prompts=args.min_prompts, timeout_s=600),
        )
        report["n_proposals_stored"] = len(found)
        report["n_concepts_stored"] = sum(p["level"] == 2 for p in found)
        ids = select_prompts(driver, None)
        inputs = gather_inputs(driver, ids, min_prompts=args.min_prompts, timeout_s=600)
        report["n_candidates"] = len(inputs.fids)
        report["groups"] = {}
        for thr in args.thresholds:
            cut = ProposalSettings(distance_threshold=thr, concept_threshold=args.concept_threshold)
            props = propose(inputs, cut)
            cons = concepts(inputs, props, cut)
            for name, members in refs.items():
                row = {
                    "threshold": thr,
                    "concept_threshold": args.concept_threshold,
                    "n_proposals": len(props),
                    "n_concepts": len(cons),
                    "n_reference": len(members),
                    "n_reference_candidates": len(set(members) & set(inputs.fids)),
                    "tight": match_row(props, members, inputs.fids),
                    "with_concepts": match_row([*props, *cons], members, inputs.fids),
                }
                report["groups"].setdefault(name, []).append(row)
                print(name, row, flush=True)
        gc = timed(
            report,
            "global_hand_to_5",
            lambda: global_circuit(driver, settings, "supernode:Hand", "logit:5", "text:hand"),
        )
        report["global"] = {
            "n_prompts": gc["n_prompts"],
            "top_edges": [
                (e["source_name"], e["target_name"], e["n_prompts"], round(e["era"], 4))
                for e in gc["edges"][:8]
            ],
        }
        ct = timed(
            report,
            "contrast_hand",
            lambda: contrast(driver, settings, "text:hand", "!text:hand", limit=5),
        )
        report["contrast_top_features"] = [
            (r["name"], r["k_a"], r["k_b"], round(r["effect"], 3), r["q_value"])
            for r in ct["features"]
        ]
        report["job"] = job
        report["peak_rss_mb"] = round(peak_mb())
        report["neo4j_peak_mb"] = neo4j_peak_mb(home)
        driver.close()
    finally:
        stop()
    return report


def store(args: argparse.Namespace) -> dict[str, Any]:
    from atlas.store.connection import open_driver
    from atlas.store.contrast import contrast
    from atlas.store.global_circuit import global_circuit
    from atlas.store.labels import label_features
    from atlas.store.proposals import propose_supernodes
    from atlas.store.read import count_prompts
    from atlas.store.supernodes import define_from_features, delete
    from atlas.store.synthetic import word

    home = Path(args.home)
    settings, stop = start_neo4j(home, args.heap, args.pagecache)
    report: dict[str, Any] = {"world": "bench store"}
    try:
        driver = open_driver(settings)
        report["prompts"] = count_prompts(driver)
        print(f"{report['prompts']} prompts", flush=True)
        found = timed(
            report,
            "propose_all",
            lambda: propose_supernodes(
                driver,
                None,
                min_prompts=args.min_prompts,
                max_features=args.max_features,
                min_pair_prompts=2,
                limit=50,
                timeout_s=1800,
            ),
        )
        report["n_proposals"] = len(found)
        report["largest_proposal"] = max((len(p["members"]) for p in found), default=0)
        report["peak_rss_after_propose_mb"] = round(peak_mb())
        # ends present in many prompts: the BOS-like first token, and a supernode of the most
        # frequent features (synthetic features and logits rarely recur)
        top = [
            f"{r['l']}/{r['i']}"
            for r in driver.execute_query(TOP_FEATURES, n=args.top_features).records
        ]
        timed(report, "define_top_supernode", lambda: define_from_features(driver, TOP, top))
        src, dst = f"token:{word(0).strip()}", f"supernode:{TOP}"
        report["global_ends"] = [src, dst, args.global_filter]
        gc = timed(
            report,
            "global_token_to_supernode",
            lambda: global_circuit(driver, settings, src, dst, args.global_filter),
        )
        report["global"] = {
            "n_prompts": gc["n_prompts"],
            "n_edges": len(gc["edges"]),
            "candidate_edges": gc["n_candidate_edges"],
        }
        report["peak_rss_after_global_mb"] = round(peak_mb())
        from atlas.errors import StoreError

        t0 = time.perf_counter()
        try:
            global_circuit(driver, settings, src, dst, None, timeout_s=2.0)
            report["timeout_message"] = None
        except StoreError as exc:
            report["timeout_message"] = str(exc)
        report["timeout_refused_after_s"] = round(time.perf_counter() - t0, 2)
        print("2 s timeout:", report["timeout_message"], flush=True)
        if not args.skip_contrast:
            ct = timed(
                report,
                "contrast",
                lambda: contrast(driver, settings, args.contrast_a, args.contrast_b, limit=5),
            )
            report["contrast"] = {"n_a": ct["n_a"], "n_b": ct["n_b"]}
        if args.annotate:
            report["labelled"] = timed(report, "label", lambda: label_features(driver))
        delete(driver, TOP)
        report["peak_rss_mb"] = round(peak_mb())
        report["neo4j_peak_mb"] = neo4j_peak_mb(home)
        driver.close()
    finally:
        stop()
    return report


TOP = "bench-top-features"
TOP_FEATURES = (
    "MATCH (f:Feature) RETURN f.layer AS l, f.index AS i ORDER BY f.n_prompts DESC LIMIT $n"
)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("toy")
    t.add_argument("--prompts", type=int, default=120)
    t.add_argument("--min-prompts", type=int, default=3)
    t.add_argument("--home", default=None)
    t.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8, 0.9])
    t.add_argument("--concept-threshold", type=float, default=0.7)
    t.add_argument(
        "--vision",
        action="store_true",
        help="also the toy vision demo's image prompts and the visual Hand reference",
    )
    t.add_argument(
        "--reference",
        action="append",
        default=[],
        metavar="NAME",
        help="a supernode in the atlas to report precision/recall against (repeatable)",
    )
    s = sub.add_parser("store")
    s.add_argument("--home", required=True, help="the bench/store.py launcher home")
    s.add_argument("--min-prompts", type=int, default=10)
    s.add_argument("--max-features", type=int, default=2000)
    s.add_argument("--global-filter", default="id:0")
    s.add_argument("--top-features", type=int, default=50, help="members of the global end")
    s.add_argument("--skip-contrast", action="store_true")
    s.add_argument("--contrast-a", default="id:0")
    s.add_argument("--contrast-b", default="id:1")
    s.add_argument("--annotate", action="store_true")
    for p in (t, s):
        p.add_argument("--heap", default="1g")
        p.add_argument("--pagecache", default="2g")
        p.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    report = toy(args) if args.mode == "toy" else store(args)
    print(json.dumps(report, default=str))
    if args.out:
        args.out.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
