"""``atlas intervene``: one feature intervention on a prompt, measured, predicted from the
prompt's stored graph when there is one, and optionally stored next to the circuit.

It runs in this process (the model loads here); queued interventions go through the
``atlas.gpu.intervene`` task (:func:`atlas.pipeline.interventions.submit_interventions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from atlas.cli import get_settings
from atlas.cli._common import FORMAT, emit_json, print_table

_EDIT_HELP = "L:POS:F=V (POS: a position with BOS included, 'last', or 'P:' to the end)"


def parse_edit(text: str, mode: str) -> dict[str, Any]:
    """``L:POS:F=V`` (``L:POS:F`` for ablate) as an edit dict; a malformed one is one line."""
    from atlas.errors import InputError

    where, _, amount = text.partition("=")
    layer, _, rest = where.partition(":")
    pos, _, feature = rest.rpartition(":")
    if mode == "ablate" and amount:
        raise InputError(f"--ablate {text}: give L:POS:F without a value")
    if not (layer and pos and feature) or (mode != "ablate" and not amount):
        form = "L:POS:F" if mode == "ablate" else "L:POS:F=V"
        raise InputError(f"--{mode} {text}: expected {form}")
    try:
        edit: dict[str, Any] = {"layer": int(layer), "feature": int(feature), "mode": mode}
        edit["pos"] = pos if pos == "last" or pos.endswith(":") else int(pos)
        edit["amount"] = float(amount) if amount else 0.0
    except ValueError as exc:
        raise InputError(f"--{mode} {text}: expected integers and a number ({exc})") from exc
    return edit


def parse_supernode(text: str) -> dict[str, Any]:
    """``NAME=M`` as a supernode edit."""
    from atlas.errors import InputError

    name, sep, mult = text.rpartition("=")
    if not sep or not name:
        raise InputError(f"--supernode {text}: expected NAME=M")
    try:
        return {"name": name, "multiplier": float(mult)}
    except ValueError as exc:
        raise InputError(f"--supernode {text}: M must be a number") from exc


def parse_range(text: str) -> list[int]:
    """``A:B`` (inclusive) as two layers."""
    from atlas.errors import InputError

    a, sep, b = text.partition(":")
    try:
        if not sep:
            raise ValueError(text)
        return [int(a), int(b)]
    except ValueError as exc:
        raise InputError(f"--constrained {text}: expected A:B (layers A through B)") from exc


def _spec(opts: dict[str, Any]) -> Any:
    from atlas.pipeline.intervention_payloads import parse_intervention

    edits = [parse_edit(t, "set") for t in opts["set_"]]
    edits += [parse_edit(t, "scale") for t in opts["scale"]]
    edits += [parse_edit(t, "add") for t in opts["add"]]
    edits += [parse_edit(t, "ablate") for t in opts["ablate"]]
    raw: dict[str, Any] = {
        "model": opts["model_ref"],
        "transcoders": opts["tc_ref"],
        "prompt": opts["prompt"],
        "image": None if opts["image"] is None else str(opts["image"]),
        "edits": edits,
        "supernode": None if opts["supernode"] is None else parse_supernode(opts["supernode"]),
        "donor": opts["donor"],
        "donor_image": None if opts["donor_image"] is None else str(opts["donor_image"]),
        "patch_image_tokens": opts["patch_image_tokens"],
        "constrained": None if opts["constrained"] is None else parse_range(opts["constrained"]),
        "freeze_attention": not opts["no_freeze_attention"],
        "generate": opts["generate"],
        "watch": list(opts["watch"]),
        "store": opts["store"],
    }
    return parse_intervention(raw)


def _quiet_loading() -> None:
    """No weight-loading progress bars: stderr carries only the one-line error, if any."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _show(answer: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        emit_json(answer)
        return
    print_table(answer["top"], ["token", "base", "steered"], f"intervention {answer['id']}")
    click.echo(f"KL(steered || clean) = {answer['kl']:.6g}")
    pred = answer["predicted"]
    if pred is None:
        click.echo("predicted: no stored graph of this prompt (or no edited feature in it)")
    else:
        rows = [
            {"row": r, "predicted": p, "measured": m}
            for r, p, m in zip(pred["rows"], pred["direct_effect"], pred["measured"], strict=True)
        ]
        rows.sort(key=lambda x: -abs(x["predicted"]))
        print_table(
            rows[:10], ["row", "predicted", "measured"], "direct effect (graph) vs measured"
        )
    if answer.get("watch"):
        print_table(
            answer["watch"],
            ["token", "base", "steered", "measured_logit", "predicted_logit"],
            "watched tokens (probabilities; demeaned-logit change measured and predicted)",
        )
    if "generated" in answer:
        click.echo(f"generated: {answer['generated']!r}")


@click.command("intervene")
@click.option("--model", "model_ref", default=None, help="Model directory or hub id (unset: toy).")
@click.option("--transcoders", "tc_ref", default=None, help="Transcoder directory (unset: toy).")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--set", "set_", multiple=True, help=f"Set a feature: {_EDIT_HELP}.")
@click.option("--scale", multiple=True, help="Scale a feature: L:POS:F=M (M times its activation).")
@click.option("--add", multiple=True, help="Add to a feature: L:POS:F=D.")
@click.option("--ablate", multiple=True, help="Ablate a feature: L:POS:F.")
@click.option("--supernode", default=None, help="NAME=M: scale every active member by M.")
@click.option("--donor", default=None, help="Donor prompt id (stored artifact) or text.")
@click.option(
    "--donor-image",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Image of a donor given by text (a stored donor brings its own).",
)
@click.option(
    "--patch-image-tokens",
    is_flag=True,
    help="With an image donor: patch every feature at its image tokens.",
)
@click.option("--constrained", default=None, help="A:B: MLP outputs frozen in layers A..B.")
@click.option("--no-freeze-attention", is_flag=True, help="Live attention patterns.")
@click.option("--generate", type=int, default=0, show_default=True, help="Greedy tokens.")
@click.option(
    "--watch", multiple=True, help="A token whose probability and logit change to report."
)
@click.option("--store", is_flag=True, help="Store the intervention in the atlas.")
@FORMAT
def intervene(**opts: Any) -> None:
    """Steer, ablate or patch features of one prompt and measure the effect."""
    from atlas.pipeline.interventions import intervene_step

    spec = _spec(opts)
    _quiet_loading()
    settings = get_settings()
    if spec.store or spec.supernode is not None:
        from atlas.cli._common import atlas_driver

        with atlas_driver() as driver:
            answer = intervene_step(spec, settings, driver=driver)
    else:
        answer = intervene_step(spec, settings)
    _show(answer, opts["fmt"])


@click.command("validate")
@click.argument("prompt_id")
@click.option("--model", "model_ref", default=None, help="Default: the one its graph records.")
@click.option("--transcoders", "tc_ref", default=None, help="Default: the ones its graph records.")
@click.option("--n-sources", type=int, default=10, show_default=True, help="Features ablated.")
@click.option("--no-store", is_flag=True, help="Print the report only.")
@FORMAT
def validate(
    prompt_id: str,
    model_ref: str | None,
    tc_ref: str | None,
    n_sources: int,
    no_store: bool,
    fmt: str,
) -> None:
    """Faithfulness of a prompt's graph: ablate its top-influence features one by one and
    correlate the graph's influence with the measured changes (and logit influence with KL)."""
    from atlas.pipeline.interventions import faithfulness_step

    _quiet_loading()
    settings = get_settings()
    report = faithfulness_step(
        prompt_id, settings, model_ref=model_ref, tc_ref=tc_ref, n_sources=n_sources
    )
    if not no_store:
        from atlas.cli._common import atlas_driver
        from atlas.store.interventions import store_faithfulness

        with atlas_driver() as driver:
            store_faithfulness(driver, report, database=settings.neo4j_database)
    if fmt == "json":
        emit_json(report)
        return
    columns = ["prompt_id", "n_sources", "n_pairs", "spearman", "log_log_pearson"]
    print_table([report], columns, f"faithfulness of {prompt_id}")


@click.group("steer-vector")
def steer_vector() -> None:
    """Concept vectors: build from two prompt sets, apply to a prompt, list."""


@steer_vector.command("build")
@click.argument("name")
@click.option("--model", "model_ref", default=None, help="Model (unset: toy).")
@click.option("--transcoders", "tc_ref", default=None, help="Transcoders (unset: toy).")
@click.option("--layer", type=int, required=True, help="Residual stream at this layer's input.")
@click.option("--positive", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--negative", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option(
    "--token-rule", type=click.Choice(["last", "mean"]), default="last", show_default=True
)
@FORMAT
def build(
    name: str,
    model_ref: str | None,
    tc_ref: str | None,
    layer: int,
    positive: Path,
    negative: Path,
    token_rule: str,
    fmt: str,
) -> None:
    """Mean residual difference of the POSITIVE and NEGATIVE prompt files (one prompt a line),
    stored with its closest transcoder features."""
    from atlas.cli._common import atlas_driver
    from atlas.pipeline.steering import build_step, read_prompts
    from atlas.store.interventions import store_vector
    from atlas.store.supernodes import validate_name

    validate_name(name)
    pos, neg = read_prompts(positive), read_prompts(negative)
    _quiet_loading()
    settings = get_settings()
    built = build_step(
        name,
        model=model_ref,
        transcoders=tc_ref,
        layer=layer,
        positive=pos,
        negative=neg,
        token_rule=token_rule,
        settings=settings,
    )
    with atlas_driver() as driver:
        store_vector(driver, built, database=settings.neo4j_database)
    shown = {k: v for k, v in built.items() if k != "vector"}
    if fmt == "json":
        emit_json(shown)
        return
    click.echo(f"{name}: layer {layer}, norm {built['norm']:.4g}, {len(pos)}+{len(neg)} prompts")
    print_table(built["close"], ["layer", "feature", "cosine"], "closest decoder directions")


@steer_vector.command("apply")
@click.argument("name")
@click.option("--prompt", required=True)
@click.option("--alpha", type=float, required=True, help="h += alpha * v (negative: reverse).")
@click.option("--generate", type=int, default=0, show_default=True)
@FORMAT
def apply(name: str, prompt: str, alpha: float, generate: int, fmt: str) -> None:
    """Steer a prompt with a stored vector (after BOS, at the vector's layer)."""
    from atlas.cli._common import atlas_driver
    from atlas.pipeline.steering import apply_step
    from atlas.store.interventions import add_projection, get_vector

    settings = get_settings()
    with atlas_driver() as driver:
        stored = get_vector(driver, name, database=settings.neo4j_database)
        _quiet_loading()
        answer = apply_step(stored, prompt, alpha, generate=generate, settings=settings)
        clean = answer["projection"]["clean"]
        add_projection(driver, name, prompt, clean, database=settings.neo4j_database)
    if fmt == "json":
        emit_json(answer)
        return
    print_table(answer["top"], ["token", "base", "steered"], f"{name} x {alpha:g}")
    proj = answer["projection"]
    click.echo(f"KL = {answer['kl']:.6g}; projection {proj['clean']:.4g} -> {proj['steered']:.4g}")
    if answer["generated"] is not None:
        click.echo(f"generated: {answer['generated']!r}")


@steer_vector.command("list")
@FORMAT
def list_cmd(fmt: str) -> None:
    """The stored steering vectors."""
    from atlas.cli._common import atlas_driver, output
    from atlas.store.interventions import list_vectors

    with atlas_driver() as driver:
        rows = list_vectors(driver, database=get_settings().neo4j_database)
    columns = ["name", "layer", "token_rule", "norm", "n_positive", "n_negative", "model"]
    output(rows, fmt, columns, "steering vectors")
