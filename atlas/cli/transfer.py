"""``atlas import`` / ``atlas export``: graphs into and out of the atlas."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

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
    retried with exponential backoff, up to ~90 s of pauses per file. A file that is refused
    (malformed, hostile) is skipped with nothing of it written, the others go on, and the
    command ends with one error line naming the first refused file and what was ingested.
    """
    from rich.console import Console
    from rich.progress import Progress

    from atlas.errors import AtlasError, InputError
    from atlas.retry import retry_transient
    from atlas.store.schema import apply_schema

    settings = get_settings()
    files = _graph_files(paths)
    tally = _ImportTally()
    console = Console(stderr=True)
    with atlas_driver(max_transaction_retry_time_s=IMPORT_DRIVER_RETRY_S) as driver:
        apply_schema(driver, database=database())
        with Progress(console=console, transient=True, disable=not console.is_terminal) as bar:

            def warn(line: str) -> None:
                bar.console.print(line, markup=False, highlight=False, soft_wrap=True)

            task = bar.add_task("ingesting", total=len(files))
            for f in files:
                try:
                    one = partial(
                        _ingest_one, driver, f, settings, batch_size, min_weight, max_edges
                    )
                    res = retry_transient(one, what=str(f), service="Neo4j", warn=warn)
                except InputError as exc:
                    _name_file(exc, f)
                    tally.refuse(exc, warn)
                    continue
                except AtlasError as exc:
                    _name_file(exc, f)
                    exc.args = (
                        (f"{exc.args[0]} ({tally.done()})",) if len(exc.args) == 1 else exc.args
                    )
                    raise
                finally:
                    bar.advance(task)
                tally.add(res)
    if tally.first_refused is not None:
        raise tally.summary_error()
    click.echo(
        f"{tally.created} prompt(s) ingested ({tally.edges} edges), {tally.skipped} already stored"
    )


def _ingest_one(
    driver: Any,
    f: Path,
    settings: Any,
    batch_size: int | None,
    min_weight: float | None,
    max_edges: int | None,
) -> Any:
    """Ingest one graph file with the command's options, else the settings' defaults."""
    from atlas.store.ingest import ingest_path

    return ingest_path(
        driver,
        f,
        database=database(),
        batch_size=batch_size or settings.ingest_batch_size,
        min_abs_weight=settings.ingest_min_abs_weight if min_weight is None else min_weight,
        max_edges=settings.ingest_max_edges if max_edges is None else max_edges,
    )


class _ImportTally:
    """What a multi-file import did so far, for its closing line or its error."""

    def __init__(self) -> None:
        self.created = self.skipped = self.edges = self.refused = 0
        self.first_refused: Exception | None = None

    def add(self, res: Any) -> None:
        self.created += res.created
        self.skipped += not res.created
        self.edges += res.n_edges if res.created else 0

    def refuse(self, exc: Exception, warn: Any) -> None:
        """Count a refused file; the first is the closing error, later ones a warning line each."""
        self.refused += 1
        if self.first_refused is None:
            self.first_refused = exc
        else:
            warn(f"warning: {' '.join(str(exc).split())}")

    def done(self) -> str:
        return f"{self.created} prompt(s) ingested before it, {self.skipped} already stored"

    def summary_error(self) -> Exception:
        exc = self.first_refused
        assert exc is not None
        others = f"; {self.refused - 1} more file(s) refused" if self.refused > 1 else ""
        msg = " ".join(str(exc).split())
        exc.args = (
            f"{msg}{others}; {self.created} prompt(s) ingested, {self.skipped} already stored",
        )
        return exc


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
            from atlas.interchange import write_document

            doc = read.export_json(driver, prompt_id, database=database(), timeout_s=timeout())
            write_document(doc, out)
    click.echo(str(out))
