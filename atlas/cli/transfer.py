"""``atlas import`` / ``atlas export``: graphs into and out of the atlas."""

from __future__ import annotations

import json
from pathlib import Path

import click

from atlas.cli import get_settings
from atlas.cli._common import atlas_driver, database, timeout

#: How long the driver itself retries one prompt's transaction (deadlocks, a dropped
#: connection) before ``atlas import``'s own loop, which tells the user, takes over.
IMPORT_DRIVER_RETRY_S = 5.0


def _name_file(exc: Exception, path: Path) -> None:
    """Prefix the error's message with the file it is about (unless it names the file already)."""
    if len(exc.args) == 1 and isinstance(exc.args[0], str) and str(path) not in exc.args[0]:
        exc.args = (f"{path}: {exc.args[0]}",)


def _graph_files(paths: tuple[Path, ...]) -> list[Path]:
    """The files named, with directories searched for artifacts and interchange JSON."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files.extend(sorted(x for x in p.rglob("*") if x.suffix in (".safetensors", ".json")))
        else:
            files.append(p)
    return files


@click.command("import")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--batch-size", type=int, default=None, help="Rows per UNWIND batch.")
@click.option("--min-weight", type=float, default=None, help="Drop edges with |weight| below this.")
@click.option(
    "--max-edges", type=int, default=None, help="Keep at most this many edges per prompt."
)
def import_cmd(
    paths: tuple[Path, ...], batch_size: int | None, min_weight: float | None, max_edges: int | None
) -> None:
    """Ingest graph artifacts (.safetensors) or interchange JSON (.json) into the atlas.

    Idempotent: prompts already stored are skipped. Directories are searched for both kinds.
    A file whose ingestion meets a transient fault (Neo4j unreachable, e.g. restarting) is
    retried with exponential backoff, up to ~90 s of pauses per file.
    """
    from rich.console import Console
    from rich.progress import Progress

    from atlas.errors import AtlasError
    from atlas.retry import retry_transient
    from atlas.store.ingest import IngestResult, ingest_path
    from atlas.store.schema import apply_schema

    settings = get_settings()
    files = _graph_files(paths)
    created = skipped = edges = 0
    with atlas_driver(max_transaction_retry_time_s=IMPORT_DRIVER_RETRY_S) as driver:
        apply_schema(driver, database=database())
        with Progress(console=Console(stderr=True), transient=True) as progress:

            def warn(line: str) -> None:
                progress.console.print(line, markup=False, highlight=False, soft_wrap=True)

            task = progress.add_task("ingesting", total=len(files))
            for f in files:

                def one(f: Path = f) -> IngestResult:
                    return ingest_path(
                        driver,
                        f,
                        database=database(),
                        batch_size=batch_size or settings.ingest_batch_size,
                        min_abs_weight=settings.ingest_min_abs_weight
                        if min_weight is None
                        else min_weight,
                        max_edges=settings.ingest_max_edges if max_edges is None else max_edges,
                    )

                try:
                    res = retry_transient(one, what=str(f), service="Neo4j", warn=warn)
                except AtlasError as exc:
                    _name_file(exc, f)
                    raise
                created += res.created
                skipped += not res.created
                edges += res.n_edges if res.created else 0
                progress.advance(task)
    click.echo(f"{created} prompt(s) ingested ({edges} edges), {skipped} already stored")


@click.command("export")
@click.argument("prompt_id")
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output file.")
def export_cmd(prompt_id: str, out: Path) -> None:
    """Export a stored prompt (id or unique prefix) to interchange JSON or a .safetensors artifact."""
    from atlas.store import read

    with atlas_driver() as driver:
        if out.suffix == ".safetensors":
            graph, _ = read.export_graph(
                driver, prompt_id, database=database(), timeout_s=timeout()
            )
            graph.save(out)
        else:
            doc = read.export_json(driver, prompt_id, database=database(), timeout_s=timeout())
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(
                json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            )
    click.echo(str(out))
