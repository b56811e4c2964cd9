"""``atlas enqueue``, ``atlas batch`` and ``atlas jobs``: the click commands and a progress view
over the service in :mod:`atlas.pipeline.submit`.

With a broker configured (``REDIS_URL``) prompts go to the ``attribute`` queue and workers do the
rest; without one, the same step code runs inline in this process. Either way a job record is
kept in Neo4j (:mod:`atlas.store.jobs`) and the job id is printed on stdout as soon as the job is
recorded, before anything runs (so a batch that is killed can still be found, retried and
reported). A job with failed prompts exits 1 once its outcome is known (inline, or with
``--wait``); so does a batch run with ``--skip-bad-lines`` that had bad lines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from atlas.cli import get_settings

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings
    from atlas.store.jobs import JobSummary


def open_atlas_driver(settings: AtlasSettings) -> Any:
    """A Neo4j driver for the CLI: starts the local launcher first when no NEO4J_URI is set."""
    from atlas.store import connection

    if settings.uses_local_neo4j:
        connection.ensure_local_neo4j(settings)
    return connection.open_driver(settings)


class JobProgress:
    """What a job's progress callback shows on stderr: one line when the job is recorded, then
    (with ``bar``, for work this process waits on) a rich bar of done / failed / remaining, rate
    and ETA."""

    def __init__(self, *, announce: bool = True, bar: bool = True, print_id: bool = False) -> None:
        self.announce = announce
        self.print_id = print_id
        self.bar = bar
        self.seen = False
        self.progress: Any = None
        self.task: Any = None
        self.start = time.monotonic()
        self.start_finished = 0

    def __call__(self, summary: JobSummary) -> None:
        if not self.seen:
            self.seen = True
            self._first(summary)
        elif self.progress is not None:
            self.progress.update(
                self.task, completed=summary.done + summary.failed, **self._fields(summary)
            )

    def _first(self, s: JobSummary) -> None:
        if self.print_id:
            click.echo(s.job_id)  # stdout, flushed: the id is known before anything runs
        if self.announce:
            click.echo(
                f"job {s.job_id}: {s.n_items} prompts, {s.done} already in the atlas, "
                f"{s.remaining} to compute ({s.mode})",
                err=True,
            )
        if self.bar and s.remaining:
            self._start_bar(s)

    def _start_bar(self, s: JobSummary) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.start = time.monotonic()
        self.start_finished = s.done + s.failed
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=24),
            TextColumn(
                "done {task.fields[done]} | failed {task.fields[failed]} | "
                "remaining {task.fields[remaining]} | {task.fields[rate]} | "
                "ETA {task.fields[eta]} |"
            ),
            TimeElapsedColumn(),
            console=Console(stderr=True),
        )
        self.task = self.progress.add_task(
            "prompts", total=s.n_items, completed=s.done + s.failed, **self._fields(s)
        )
        self.progress.start()

    def _fields(self, s: JobSummary) -> dict[str, Any]:
        elapsed = max(1e-6, time.monotonic() - self.start)
        newly = s.done + s.failed - self.start_finished
        rate = newly / elapsed * 60.0
        eta = "-" if newly <= 0 else _fmt_s(s.remaining / (newly / elapsed))
        return {
            "done": s.done,
            "failed": s.failed,
            "remaining": s.remaining,
            "rate": f"{rate:.1f}/min",
            "eta": eta if s.remaining else "0s",
        }

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def wait_showing(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    *,
    timeout_s: float | None,
    requeue_after_s: float,
) -> JobSummary:
    """Wait for a job with its progress bar on stderr (re-sending items stalled that long)."""
    from atlas.pipeline.submit import wait_for_job

    with JobProgress(announce=False) as view:
        return wait_for_job(
            settings,
            driver,
            job_id,
            timeout_s=timeout_s,
            requeue_after_s=requeue_after_s,
            progress=view,
        )


def _finish(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    wait: bool,
    timeout_s: float | None,
    *,
    print_id: bool = True,
) -> None:
    """Print the job id (stdout) unless it was already; once the outcome is known, report it
    and exit 1 if some prompts failed."""
    from atlas.pipeline.submit import job_store, outcome

    if print_id:
        click.echo(job_id)
    with JobProgress(announce=False) as view:
        summary = outcome(settings, driver, job_id, wait=wait, timeout_s=timeout_s, progress=view)
    if summary is None:
        return
    click.echo(
        f"job {job_id}: {summary.done} done, {summary.failed} failed of {summary.n_items}", err=True
    )
    if summary.failed:
        for it in job_store(driver, settings).items(job_id, ["failed"])[:20]:
            click.echo(f"  item {it.idx} failed: {it.reason}", err=True)
        raise click.exceptions.Exit(1)


def _submit_and_finish(
    settings: AtlasSettings,
    specs: list[Any],
    *,
    source: str,
    force: bool,
    wait: bool,
    timeout_s: float | None,
    image_base: Path | None = None,
) -> None:
    from atlas.pipeline.submit import submit

    driver = open_atlas_driver(settings)
    try:
        with JobProgress(bar=not settings.redis_url, print_id=True) as view:
            job_id, _ = submit(
                settings,
                specs,
                source=source,
                driver=driver,
                force=force,
                progress=view,
                image_base=image_base,
            )
        _finish(settings, driver, job_id, wait, timeout_s, print_id=False)
    finally:
        driver.close()


class _KnobOption(click.Option):
    """An attribution knob whose default is :class:`atlas.graph.AttributionSettings`' (the one
    definition), read only when needed: ``atlas.graph`` imports torch, ``atlas --help`` must not."""

    def get_default(self, ctx: click.Context, call: bool = True) -> Any:
        from atlas.graph import AttributionSettings

        return AttributionSettings.model_fields[self.name or ""].default


def _knob_option(name: str, kind: type) -> Any:
    return click.option(
        "--" + name.replace("_", "-"), type=kind, cls=_KnobOption, show_default=True
    )


def _with_spec_options(fn: Any) -> Any:
    options = [
        click.option("--model", default=None, help="Model dir or hub id (default: the toy model)."),
        click.option("--transcoders", default=None, help="Transcoder dir (default: the toy set)."),
        _knob_option("max_n_logits", int),
        _knob_option("desired_logit_prob", float),
        _knob_option("max_feature_nodes", int),
        _knob_option("node_threshold", float),
        _knob_option("edge_threshold", float),
    ]
    for opt in reversed(options):
        fn = opt(fn)
    return fn


_wait_option = click.option(
    "--wait/--no-wait", default=False, help="Wait with a progress bar (inline mode always waits)."
)
_timeout_option = click.option(
    "--timeout", "timeout_s", type=float, default=None, help="Give up waiting after N seconds."
)


# --------------------------------------------------------------------------- commands
@click.command()
@click.argument("texts", nargs=-1, required=True)
@_with_spec_options
@click.option("--force", is_flag=True, help="Recompute even if already in the atlas.")
@click.option("--image", default=None, help="Image file of every TEXT (vision-language models).")
@click.option("--tag", "tags", multiple=True, help="Tag of the image (repeatable).")
@_wait_option
@_timeout_option
def enqueue(
    texts: tuple[str, ...],
    force: bool,
    image: str | None,
    tags: tuple[str, ...],
    wait: bool,
    timeout_s: float | None,
    **spec_opts: Any,
) -> None:
    """Attribute the prompts TEXT... and ingest them into the atlas. Prints the job id."""
    from atlas.pipeline.payloads import parse_spec

    settings = get_settings()
    extra = {"image": image, "tags": list(tags) or None} if image else {}
    specs = [parse_spec({"prompt": t, **spec_opts, **extra}) for t in texts]
    _submit_and_finish(
        settings, specs, source="enqueue", force=force, wait=wait, timeout_s=timeout_s
    )


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Recompute even what is already in the atlas.")
@click.option(
    "--skip-bad-lines",
    is_flag=True,
    help="Run the good lines and record the bad ones as failed items (exit 1). "
    "Default: refuse the file, running nothing.",
)
@_wait_option
@_timeout_option
def batch(
    file: Path, force: bool, skip_bad_lines: bool, wait: bool, timeout_s: float | None
) -> None:
    """Attribute every prompt spec of FILE.jsonl (one JSON object per line). Prints the job id.

    A line is {"prompt": "...", "model": ..., "transcoders": ..., "max_n_logits": ...} (only
    "prompt" is required) or a bare JSON string; "image": "path" (relative to FILE) and
    "tags": [...] make an image+text prompt. Re-running a file skips what is done. Every bad
    line is reported (number and reason); the file is refused unless --skip-bad-lines.
    """
    from atlas.errors import InputError
    from atlas.pipeline.submit import read_batch_file

    settings = get_settings()
    parsed = read_batch_file(file)
    n_bad, n_all = len(parsed.bad), len(parsed.entries)
    hint = "nothing was run (--skip-bad-lines runs the good ones)"
    if n_bad == 1 and not skip_bad_lines:
        raise InputError(f"{parsed.bad[0].reason}; {hint}")
    for bad in parsed.bad:
        click.echo(f"error: {bad.reason}", err=True)
    if n_bad and not skip_bad_lines:
        raise InputError(f"{file}: {n_bad} of {n_all} lines are bad; {hint}")
    if n_bad and not parsed.specs:
        raise InputError(f"{file}: all {n_all} lines are bad; nothing to run")
    if n_bad:
        click.echo(f"{file}: {n_bad} of {n_all} lines are bad: recorded as failed", err=True)
    _submit_and_finish(
        settings,
        parsed.entries,
        source=str(file),
        force=force,
        wait=wait,
        timeout_s=timeout_s,
        image_base=file.parent,
    )
    if n_bad:
        raise click.exceptions.Exit(1)


@click.group()
def jobs() -> None:
    """Job records: list, status, retry."""


@jobs.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def jobs_list(limit: int, fmt: str) -> None:
    """The most recent jobs."""
    from atlas.pipeline.submit import job_store
    from atlas.store.jobs import ensure_job_schema

    settings = get_settings()
    driver = open_atlas_driver(settings)
    try:
        ensure_job_schema(driver, settings.neo4j_database)
        rows = job_store(driver, settings).recent(limit)
    finally:
        driver.close()
    if fmt == "json":
        click.echo(json.dumps([r.model_dump(mode="json") for r in rows], indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("job", "created (UTC)", "mode", "items", "done", "failed", "source")
    for r in rows:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(r.created_at or 0))
        table.add_row(
            r.job_id,
            created,
            r.mode or "",
            str(r.n_items),
            str(r.done),
            str(r.failed),
            r.source or "",
        )
    Console().print(table)


@jobs.command("status")
@click.argument("job_id")
@click.option("--items", "show_items", is_flag=True, help="List every item.")
@_wait_option
@_timeout_option
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def jobs_status(
    job_id: str, show_items: bool, wait: bool, timeout_s: float | None, fmt: str
) -> None:
    """Where job JOB_ID stands; failed items are listed with their reasons."""
    from atlas.pipeline.submit import job_store, stall_s

    settings = get_settings()
    driver = open_atlas_driver(settings)
    try:
        store = job_store(driver, settings)
        if wait:
            summary = wait_showing(
                settings, driver, job_id, timeout_s=timeout_s, requeue_after_s=stall_s(settings)
            )
        else:
            summary = store.summary(job_id)
        items = store.items(job_id, None if show_items else ["failed"])
        if not show_items and summary.stale:
            items = [i for i in store.items(job_id) if i.state == "failed" or i.stale]
    finally:
        driver.close()
    if fmt == "json":
        out = summary.model_dump(mode="json") | {"remaining": summary.remaining}
        out["items"] = [i.model_dump(mode="json") for i in items]
        click.echo(json.dumps(out, indent=2))
        return
    stale = ""
    if summary.stale:
        stale = f" ({summary.stale} stale: their worker is gone; `atlas jobs retry {job_id}`)"
    click.echo(
        f"job {job_id} ({summary.mode}, {summary.source}): {summary.done} done, "
        f"{summary.failed} failed, {summary.running} running, {summary.queued} queued, "
        f"{summary.remaining} remaining of {summary.n_items}{stale}"
    )
    for it in items:
        text = str(it.spec.get("prompt", it.spec.get("text", "")))
        text = text if len(text) <= 60 else text[:57] + "..."
        state = "stale" if it.stale else it.state
        line = f"  {it.idx:5d} {state:<11} {it.prompt_id or '-':<32} {text!r}"
        if it.reason:
            line += f"  reason: {it.reason}"
        click.echo(line)


@jobs.command("retry")
@click.argument("job_id")
@click.option(
    "--stale-after",
    type=float,
    default=None,
    help="Also re-send active items untouched for this many seconds "
    "(stale items, whose worker stopped beating, are always re-sent).",
)
@_wait_option
@_timeout_option
def jobs_retry(job_id: str, stale_after: float | None, wait: bool, timeout_s: float | None) -> None:
    """Send the failed and stale items of JOB_ID again (and untouched ones with --stale-after).

    Stale items are held by a worker or an inline batch that stopped beating (killed); workers
    re-send those of Celery jobs by themselves, an inline batch's wait for this command.
    """
    from atlas.pipeline.submit import resend, retry_items

    settings = get_settings()
    driver = open_atlas_driver(settings)
    try:
        items = retry_items(driver, settings, job_id, stale_after)
        click.echo(f"job {job_id}: re-sending {len(items)} items", err=True)
        with JobProgress(announce=False, bar=not settings.redis_url) as view:
            resend(settings, driver, job_id, items, progress=view)
        _finish(settings, driver, job_id, wait, timeout_s)
    finally:
        driver.close()
