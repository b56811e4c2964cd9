"""``atlas attribute``: one prompt's attribution graph, written as an artifact (+ interchange JSON)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from atlas.cli import get_settings, skip_teardown
from atlas.graph import AttributionSettings

if TYPE_CHECKING:
    import torch

    from atlas.settings import AtlasSettings

_DTYPES = ("float32", "bfloat16", "float16")


def _default(name: str) -> Any:
    """An option's default: the one definition in :class:`AttributionSettings`."""
    return AttributionSettings.model_fields[name].default


def _device_and_dtype(
    settings: AtlasSettings, device: str | None, dtype: str | None
) -> tuple[str, torch.dtype]:
    """The device and torch dtype to load on: the options over the settings, resolved by the
    settings' own rules (``auto`` -> CUDA when present; the dtype by name)."""
    chosen = {k: v for k, v in (("device", device), ("dtype", dtype)) if v}
    effective = settings.model_copy(update=chosen) if chosen else settings
    return effective.resolved_device(), effective.torch_dtype()


@click.command("attribute")
@click.option("--model", "model_ref", required=True, help="Local HF model directory or hub id.")
@click.option("--transcoders", "tc_ref", required=True, help="Transcoder directory (config.yaml).")
@click.option("--prompt", required=True, help="Prompt text.")
@click.option(
    "--max-feature-nodes", type=int, default=_default("max_feature_nodes"), help="Cap on features."
)
@click.option("--max-n-logits", type=int, default=_default("max_n_logits"), show_default=True)
@click.option(
    "--desired-logit-prob", type=float, default=_default("desired_logit_prob"), show_default=True
)
@click.option("--batch-size", type=int, default=None, help="Targets per backward pass.")
@click.option("--node-threshold", type=float, default=_default("node_threshold"), show_default=True)
@click.option("--edge-threshold", type=float, default=_default("edge_threshold"), show_default=True)
@click.option("--no-prune", is_flag=True, help="Keep every node and non-zero edge.")
@click.option("--device", default=None, help="cpu, cuda, cuda:N (default: settings).")
@click.option("--dtype", type=click.Choice(_DTYPES), default=None, help="Default: settings.")
@click.option("--revision", default=None, help="Hub revision of the model.")
@click.option("--memory-limit-mb", type=int, default=None, help="Cap the batch to fit this.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
@click.option(
    "--image",
    "image_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Image of an image+text prompt (vision-language models).",
)
@click.option("--rollout-last-k", type=int, default=4, show_default=True, help="Vision layers.")
@click.option(
    "--rollout-head-fraction", type=float, default=0.30, show_default=True, help="Heads kept."
)
@click.option("--no-rollout", is_flag=True, help="No attention-rollout maps for the image.")
@click.option(
    "--json-max-links",
    type=int,
    default=None,
    help="Write the JSON only up to this many links (default 5,000,000; the artifact is always "
    "written whole).",
)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--timings",
    "timings_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    hidden=True,
    help="Write CPU and wall seconds per phase of this process as JSON (bench/attribution.py).",
)
def attribute(
    model_ref: str,
    tc_ref: str,
    prompt: str,
    max_feature_nodes: int | None,
    max_n_logits: int,
    desired_logit_prob: float,
    batch_size: int | None,
    node_threshold: float,
    edge_threshold: float,
    no_prune: bool,
    device: str | None,
    dtype: str | None,
    revision: str | None,
    memory_limit_mb: int | None,
    no_progress: bool,
    image_path: Path | None,
    rollout_last_k: int,
    rollout_head_fraction: float,
    no_rollout: bool,
    json_max_links: int | None,
    out_dir: Path,
    timings_path: Path | None,
) -> None:
    """Compute the attribution graph of PROMPT and write DIR/<prompt_id>.safetensors (+ .json).

    With --image: an image+text prompt; DIR/attention_maps/ then holds rollout.safetensors
    (tensor ``rollout``, float32 [n_image_tokens, rows, cols], unclipped), one {k}.png per image
    token (k from the first image token) and metadata.json.
    """
    phases = _Phases()  # startup: the interpreter, click and the CLI's own imports
    from tqdm import tqdm

    from atlas.attribution import attribute as run_attribution
    from atlas.engine import check_prompt
    from atlas.interchange import DEFAULT_MAX_LINKS, GraphTooLargeForJson, write_json
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    phases.mark("import torch and the engine")
    settings = get_settings()
    check_prompt(prompt, model_ref)  # before the weights load (seconds to minutes)
    phases.mark("check the prompt (tokenizer, transformers)")
    knobs = AttributionSettings.merged(
        max_feature_nodes=max_feature_nodes,
        max_n_logits=max_n_logits,
        desired_logit_prob=desired_logit_prob,
        node_threshold=node_threshold,
        edge_threshold=edge_threshold,
        pruned=not no_prune,
    )
    dev, torch_dtype = _device_and_dtype(settings, device, dtype)
    t0 = time.perf_counter()
    image = _load_image(image_path, settings)
    rollout = _rollout_params(rollout_last_k, rollout_head_fraction, no_rollout)
    model = load_model(model_ref, device=dev, dtype=torch_dtype, revision=revision)
    phases.mark("load the model (its transformers modules)")
    tset = load_transcoders(tc_ref, model, device=dev, dtype=torch_dtype)
    phases.mark("load the transcoders")

    bar: Any = None

    def progress(done: int, total: int) -> None:
        nonlocal bar
        if no_progress:
            return
        if bar is None:
            bar = tqdm(total=total, desc="attribution rows", unit="row", leave=False)
        bar.n = done
        bar.refresh()

    try:
        result = run_attribution(
            prompt,
            model,
            tset,
            settings=knobs,
            batch_size=batch_size or settings.batch_size,
            progress=progress,
            memory_limit_bytes=memory_limit_mb * 2**20 if memory_limit_mb else None,
            image=image,
            rollout=rollout,
        )
    finally:
        if bar is not None:
            bar.close()
    phases.mark("attribute()")
    graph = result.to_graph()
    phases.mark("prune + scores + graph")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = graph.save(out_dir / f"{graph.prompt_id}.safetensors")
    phases.mark("artifact")
    try:
        json_name = write_json(
            graph,
            out_dir / f"{graph.prompt_id}.json",
            max_links=DEFAULT_MAX_LINKS if json_max_links is None else json_max_links,
            token_decoder=lambda t: model.tokenizer.decode([t]),
        ).name
    except GraphTooLargeForJson as exc:
        click.echo(f"{exc} (raise --json-max-links to write it)", err=True)
        json_name = "none"
    maps = _write_maps(result, image, out_dir)
    phases.mark("JSON (+ maps)")
    if timings_path is not None:
        phases.write(timings_path)
    meta = graph.metadata
    click.echo(
        f"{path} nodes={graph.n_nodes} edges={graph.n_edges}{maps} "
        f"replacement={meta.replacement_score:.3f} completeness={meta.completeness_score:.3f} "
        f"seconds={time.perf_counter() - t0:.1f} json={json_name}"
    )
    skip_teardown()  # every output is written and closed


class _Phases:
    """CPU and wall seconds of this process per phase (``--timings``): the first phase runs
    from the process's start, read from the kernel's process start time."""

    def __init__(self) -> None:
        import os

        self.rows: list[dict[str, Any]] = []
        self._cpu = time.process_time()
        self._wall = time.time()
        started = _process_start_time()
        self.rows.append(
            {
                "phase": "start, click, the CLI",
                "cpu_s": self._cpu,
                "wall_s": self._wall - started if started else None,
                "pid": os.getpid(),
            }
        )

    def mark(self, phase: str) -> None:
        cpu, wall = time.process_time(), time.time()
        self.rows.append({"phase": phase, "cpu_s": cpu - self._cpu, "wall_s": wall - self._wall})
        self._cpu, self._wall = cpu, wall

    def write(self, path: Path) -> None:
        import json
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
        path.write_text(json.dumps({"phases": self.rows, "peak_rss_bytes": peak}, indent=1))


def _process_start_time() -> float | None:
    """This process's start (epoch seconds) from /proc, or ``None`` where there is no /proc."""
    import os

    try:
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(line.split()[1])
            for line in Path("/proc/stat").read_text().splitlines()
            if line.startswith("btime")
        )
    except (OSError, StopIteration, IndexError, ValueError):
        return None
    return boot + int(stat[19]) / os.sysconf("SC_CLK_TCK")


def _load_image(path: Path | None, settings: AtlasSettings) -> Any:
    """The decoded image of ``--image`` (one-line error naming the file), or ``None``."""
    if path is None:
        return None
    from atlas.images import load_image

    return load_image(path, max_pixels=settings.image_max_pixels)


def _rollout_params(last_k: int, head_fraction: float, off: bool) -> Any:
    """``False`` (no maps) or the rollout parameters of the options (a bad value: one line)."""
    if off:
        return False
    from atlas.attribution.rollout import RolloutParams
    from atlas.errors import InputError

    try:
        return RolloutParams(last_k=last_k, head_fraction=head_fraction)
    except ValueError as exc:
        raise InputError(f"rollout: {exc}") from exc


def _write_maps(result: Any, image: Any, out_dir: Path) -> str:
    """Write DIR/attention_maps/ for an image prompt with rollout maps; the summary's words."""
    if image is None or result.image is None or result.image.rollout is None:
        return ""
    from atlas.attribution.rollout import write_rollout

    directory = write_rollout(out_dir, result.image.rollout, image.image)
    return f" image_tokens={result.image.n_tokens} maps={directory}"
