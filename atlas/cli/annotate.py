"""``atlas annotate``: feature labels (logit lens and top activating tokens) in the atlas."""

from __future__ import annotations

import click

from atlas.cli import get_settings
from atlas.cli._common import atlas_driver, database


@click.command()
@click.option(
    "--model", "model_dir", default=None, help="Model (directory or hub id) for the logit lens."
)
@click.option("--transcoders", "tc_dir", default=None, help="Transcoder set for the logit lens.")
@click.option("--top-k", type=int, default=10, show_default=True)
@click.option(
    "--label-source",
    "source_name",
    default="heuristic",
    show_default=True,
    help="Where labels come from (atlas.circuits.label_sources; the heuristic is built in).",
)
def annotate(model_dir: str | None, tc_dir: str | None, top_k: int, source_name: str) -> None:
    """Label features: logit lens (with --model and --transcoders) and top activating tokens.

    The model loads on the settings' DEVICE and DTYPE, as in the workers.
    """
    from atlas.circuits.label_sources import label_source
    from atlas.errors import InputError
    from atlas.store.labels import label_features, store_lens

    source = label_source(source_name)

    if (model_dir is None) != (tc_dir is None):
        raise InputError("--model and --transcoders go together")
    with atlas_driver() as driver:
        if model_dir is not None and tc_dir is not None:
            from atlas.circuits.lens import logit_lens_for
            from atlas.models.loading import load_model
            from atlas.transcoders.loading import load_transcoders

            settings = get_settings()
            device, dtype = settings.resolved_device(), settings.torch_dtype()
            model = load_model(model_dir, device=device, dtype=dtype)
            tcs = load_transcoders(tc_dir, model, device=device, dtype=dtype)
            n = store_lens(driver, logit_lens_for(model, tcs), k=top_k, database=database())
            click.echo(f"logit lens stored for {n} feature(s)")
        n = label_features(driver, top_k=top_k, database=database(), source=source)
    click.echo(f"labelled {n} feature(s)")
