"""``atlas enqueue``, ``atlas batch``, ``atlas jobs`` and ``atlas worker``.

With a broker configured (``REDIS_URL``) prompts go to the ``attribute`` queue and workers do the
rest; without one, the same task code runs inline in this process (the embedded default), so the
pipeline works with nothing but the local Neo4j. Either way a job record is kept in Neo4j
(:mod:`atlas.jobs`) and the job id is printed on stdout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from atlas.cli import get_settings
from atlas.errors import ConfigError, InputError, ServiceUnavailable

DEFAULT_QUEUES = "attribute,ingest"

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- helpers (library-ish)
def open_atlas_driver(settings: Any) -> Any:
    """A Neo4j driver for the CLI: starts the local launcher first when no NEO4J_URI is set."""
    from atlas.store import connection

    ensure = getattr(connection, "ensure_local_neo4j", None)
    if settings.uses_local_neo4j and ensure is not None:
        ensure(settings)
    return connection.open_driver(settings)


def parse_batch_file(path: Path) -> list[Any]:
    """Read a JSONL file of prompt specs. Any malformed line -> InputError naming the line."""
    from pydantic import ValidationError

    from atlas.pipeline import PromptSpec

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    specs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
        if isinstance(obj, str):
            obj = {"prompt": obj}
        if not isinstance(obj, dict):
            raise InputError(f"{path}:{lineno}: expected a JSON object with a 'prompt' field")
        try:
            specs.append(PromptSpec.model_validate(obj))
        except ValidationError as exc:
            err = exc.errors()[0]
            where = ".".join(str(x) for x in err.get("loc", ())) or "line"
            raise InputError(f"{path}:{lineno}: {where}: {err['msg']}") from exc
    if not specs:
        raise InputError(f"{path}: no prompt specs in the file")
    return specs


def _celery_app(settings: Any) -> Any:
    from workers.app import make_celery

    return make_celery(settings)


def _send_attribute(app: Any, payloads: Sequence[Any], settings: Any) -> None:
    """Publish attribute messages (JSON), ``settings.chunk_size`` specs per message.
    Redis down -> ServiceUnavailable, one line."""
    from atlas.pipeline import chunked

    try:
        with app.producer_or_acquire() as producer:
            for chunk in chunked(payloads, settings.chunk_size):
                now = time.time()
                for p in chunk.items:
                    p.enqueued_at = now
                app.send_task(
                    "atlas.attribute",
                    args=[chunk.model_dump(mode="json")],
                    queue="attribute",
                    producer=producer,
                )
    except Exception as exc:
        if isinstance(exc, ServiceUnavailable):
            raise
        raise ServiceUnavailable(
            f"Redis at {settings.redis_url} is not reachable: {type(exc).__name__}: {exc}"
        ) from exc


def submit(
    settings: Any,
    specs: Sequence[Any],
    *,
    source: str,
    driver: Any,
    force: bool = False,
    echo: bool = True,
) -> tuple[str, int]:
    """Record a job and send (or, with no broker, run) its prompts. Returns (job id, n skipped).

    Specs whose prompt is already in the atlas (from an earlier job) are recorded as done and
    not sent, unless ``force``.
    """
    from atlas.jobs import JobStore, ensure_job_schema, new_job_id, skip_done
    from atlas.pipeline import AttributePayload
    from atlas.store.schema import apply_schema

    apply_schema(driver, database=settings.neo4j_database)
    ensure_job_schema(driver)
    store = JobStore(driver)
    if force:
        specs = [s.model_copy(update={"force": True}) for s in specs]
    spec_ids = [s.spec_id() for s in specs]
    already = {} if force else skip_done(store, spec_ids)
    job_id = new_job_id()
    mode = "celery" if settings.redis_url else "inline"
    store.create(
        job_id,
        [s.model_dump(mode="json") for s in specs],
        spec_ids,
        source=source,
        mode=mode,
        already_done=already,
    )
    pending = [
        AttributePayload(spec=s, job_id=job_id, item=i)
        for i, s in enumerate(specs)
        if i not in already
    ]
    if echo:
        click.echo(
            f"job {job_id}: {len(specs)} prompts, {len(already)} already in the atlas, "
            f"{len(pending)} to compute ({mode})",
            err=True,
        )
    if pending and mode == "celery":
        _send_attribute(_celery_app(settings), pending, settings)
    elif pending:
        _run_inline(settings, job_id, pending, driver)
    return job_id, len(already)


def _run_inline(settings: Any, job_id: str, payloads: Sequence[Any], driver: Any) -> None:
    from atlas.jobs import JobStore
    from atlas.pipeline import run_inline

    store = JobStore(driver)
    with _ProgressView(store.summary(job_id)) as view:
        for p in payloads:
            run_inline(p, settings, driver=driver)
            view.update(store.summary(job_id))


class _ProgressView:
    """A rich progress bar: done / failed / remaining, rate and ETA."""

    def __init__(self, summary: Any) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.start = time.monotonic()
        self.start_finished = summary.done + summary.failed
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
            "prompts", total=summary.n_items, **self._fields(summary)
        )

    def _fields(self, s: Any) -> dict[str, Any]:
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

    def update(self, s: Any) -> None:
        self.progress.update(self.task, completed=s.done + s.failed, **self._fields(s))

    def __enter__(self) -> _ProgressView:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


def _fmt_s(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def wait_for_job(
    settings: Any,
    driver: Any,
    job_id: str,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    requeue_after_s: float | None = None,
    show: bool = True,
) -> Any:
    """Poll the job record until every item is done or failed; returns the final summary.

    ``requeue_after_s``: when the job has made no progress at all for that long, its active
    items that nothing touched for that long are sent again (safe: the tasks are idempotent).
    It covers messages lost with a Redis that had no persistence; messages lost with a dead
    worker are Celery's to redeliver (visibility timeout).
    """
    from atlas.jobs import JobStore

    store = JobStore(driver)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    summary = store.summary(job_id)
    view = _ProgressView(summary) if show else None
    last_change = time.monotonic()
    state = (summary.done, summary.failed, summary.running, summary.queued)
    try:
        if view is not None:
            view.__enter__()
        while not summary.finished:
            if deadline is not None and time.monotonic() > deadline:
                raise ServiceUnavailable(
                    f"job {job_id} not finished after {timeout_s:.0f}s: "
                    f"{summary.remaining} prompts remaining (are workers running?)"
                )
            time.sleep(poll_s)
            try:
                summary = store.summary(job_id)
            except ServiceUnavailable:
                continue  # Neo4j blip: keep waiting
            if view is not None:
                view.update(summary)
            now_state = (summary.done, summary.failed, summary.running, summary.queued)
            if now_state != state:
                state, last_change = now_state, time.monotonic()
            elif (
                requeue_after_s
                and settings.redis_url
                and time.monotonic() - last_change > requeue_after_s
            ):
                last_change = time.monotonic()
                n = requeue_stale(settings, driver, job_id, stale_s=requeue_after_s)
                if n:
                    log.warning("job %s stalled: re-sent %d items", job_id, n)
    finally:
        if view is not None:
            view.__exit__(None, None, None)
    return summary


def requeue_stale(settings: Any, driver: Any, job_id: str, *, stale_s: float) -> int:
    """Send again the items of a job that nothing touched for ``stale_s`` seconds."""
    from atlas.jobs import JobStore
    from atlas.pipeline import AttributePayload, PromptSpec

    store = JobStore(driver)
    stale = store.stale_items(job_id, stale_s)
    if not stale:
        return 0
    payloads = []
    for it in stale:
        store.mark(job_id, it.idx, state="queued")
        payloads.append(
            AttributePayload(spec=PromptSpec.model_validate(it.spec), job_id=job_id, item=it.idx)
        )
    _send_attribute(_celery_app(settings), payloads, settings)
    return len(payloads)


def _stall_s(settings: Any) -> float:
    """No progress for this long means lost messages: above the visibility timeout, after
    which Celery itself redelivers what a dead worker held."""
    return float(settings.celery_visibility_timeout_s) + 60.0


def _finish(settings: Any, driver: Any, job_id: str, wait: bool, timeout_s: float | None) -> None:
    """Print the job id (stdout); with --wait, wait and report, exit 1 if some prompts failed."""
    from atlas.jobs import JobStore

    click.echo(job_id)
    if settings.redis_url and not wait:
        return
    summary = (
        wait_for_job(
            settings, driver, job_id, timeout_s=timeout_s, requeue_after_s=_stall_s(settings)
        )
        if settings.redis_url
        else JobStore(driver).summary(job_id)
    )
    click.echo(
        f"job {job_id}: {summary.done} done, {summary.failed} failed of {summary.n_items}", err=True
    )
    if summary.failed:
        for it in JobStore(driver).items(job_id, ["failed"])[:20]:
            click.echo(f"  item {it.idx} failed: {it.reason}", err=True)
        raise click.exceptions.Exit(1)


_spec_options = [
    click.option("--model", default=None, help="Model dir or hub id (default: the toy model)."),
    click.option("--transcoders", default=None, help="Transcoder dir (default: the toy set)."),
    click.option("--max-n-logits", type=int, default=10, show_default=True),
    click.option("--desired-logit-prob", type=float, default=0.95, show_default=True),
    click.option("--max-feature-nodes", type=int, default=None),
    click.option("--node-threshold", type=float, default=0.8, show_default=True),
    click.option("--edge-threshold", type=float, default=0.98, show_default=True),
]


def _with_spec_options(fn: Any) -> Any:
    for opt in reversed(_spec_options):
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
@_wait_option
@_timeout_option
def enqueue(
    texts: tuple[str, ...], force: bool, wait: bool, timeout_s: float | None, **spec_opts: Any
) -> None:
    """Attribute the prompts TEXT... and ingest them into the atlas. Prints the job id."""
    from pydantic import ValidationError

    from atlas.pipeline import PromptSpec

    settings = get_settings()
    try:
        specs = [PromptSpec(prompt=t, **spec_opts) for t in texts]
    except ValidationError as exc:
        err = exc.errors()[0]
        raise InputError(f"{'.'.join(map(str, err['loc']))}: {err['msg']}") from exc
    driver = open_atlas_driver(settings)
    try:
        job_id, _ = submit(settings, specs, source="enqueue", driver=driver, force=force)
        _finish(settings, driver, job_id, wait, timeout_s)
    finally:
        driver.close()


@click.command()
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--force", is_flag=True, help="Recompute even what is already in the atlas.")
@_wait_option
@_timeout_option
def batch(file: Path, force: bool, wait: bool, timeout_s: float | None) -> None:
    """Attribute every prompt spec of FILE.jsonl (one JSON object per line). Prints the job id.

    A line is {"prompt": "...", "model": ..., "transcoders": ..., "max_n_logits": ...} (only
    "prompt" is required) or a bare JSON string. Re-running a file skips what is done.
    """
    settings = get_settings()
    specs = parse_batch_file(file)
    driver = open_atlas_driver(settings)
    try:
        job_id, _ = submit(settings, specs, source=str(file), driver=driver, force=force)
        _finish(settings, driver, job_id, wait, timeout_s)
    finally:
        driver.close()


@click.group()
def jobs() -> None:
    """Job records: list, status, retry."""


@jobs.command("list")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table")
def jobs_list(limit: int, fmt: str) -> None:
    """The most recent jobs."""
    from atlas.jobs import JobStore, ensure_job_schema

    settings = get_settings()
    driver = open_atlas_driver(settings)
    try:
        ensure_job_schema(driver)
        rows = JobStore(driver).recent(limit)
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
    from atlas.jobs import JobStore

    settings = get_settings()
    driver = open_atlas_driver(settings)
    try:
        store = JobStore(driver)
        summary = (
            wait_for_job(
                settings, driver, job_id, timeout_s=timeout_s, requeue_after_s=_stall_s(settings)
            )
            if wait
            else store.summary(job_id)
        )
        items = store.items(job_id, None if show_items else ["failed"])
    finally:
        driver.close()
    if fmt == "json":
        out = summary.model_dump(mode="json") | {"remaining": summary.remaining}
        out["items"] = [i.model_dump(mode="json") for i in items]
        click.echo(json.dumps(out, indent=2))
        return
    click.echo(
        f"job {job_id} ({summary.mode}, {summary.source}): {summary.done} done, "
        f"{summary.failed} failed, {summary.running} running, {summary.queued} queued, "
        f"{summary.remaining} remaining of {summary.n_items}"
    )
    for it in items:
        text = str(it.spec.get("prompt", ""))
        text = text if len(text) <= 60 else text[:57] + "..."
        line = f"  {it.idx:5d} {it.state:<11} {it.prompt_id or '-':<32} {text!r}"
        if it.reason:
            line += f"  reason: {it.reason}"
        click.echo(line)


@jobs.command("retry")
@click.argument("job_id")
@click.option(
    "--stale-after",
    type=float,
    default=None,
    help="Also re-send active items untouched for this many seconds.",
)
@_wait_option
@_timeout_option
def jobs_retry(job_id: str, stale_after: float | None, wait: bool, timeout_s: float | None) -> None:
    """Send the failed items of JOB_ID again (and stale ones with --stale-after)."""
    from atlas.jobs import ACTIVE_STATES, JobStore
    from atlas.pipeline import AttributePayload, PromptSpec

    settings = get_settings()
    driver = open_atlas_driver(settings)
    try:
        store = JobStore(driver)
        store.summary(job_id)  # unknown job -> InputError
        states = ["failed"] + (list(ACTIVE_STATES) if stale_after else [])
        items = store.items(job_id, states)
        if stale_after:
            stale = {i.idx for i in store.stale_items(job_id, stale_after)}
            items = [i for i in items if i.state == "failed" or i.idx in stale]
        payloads = []
        for it in items:
            store.mark(job_id, it.idx, state="queued")
            spec = PromptSpec.model_validate(it.spec)
            payloads.append(AttributePayload(spec=spec, job_id=job_id, item=it.idx))
        click.echo(f"job {job_id}: re-sending {len(payloads)} items", err=True)
        if payloads and settings.redis_url:
            _send_attribute(_celery_app(settings), payloads, settings)
        elif payloads:
            _run_inline(settings, job_id, payloads, driver)
        _finish(settings, driver, job_id, wait, timeout_s)
    finally:
        driver.close()


def worker_argv(
    *,
    queues: str,
    concurrency: int,
    pool: str,
    loglevel: str,
    hostname: str | None,
    python: str = sys.executable,
) -> list[str]:
    """The celery command line of a correctly configured worker (prefetch 1, late acks)."""
    argv = [
        python,
        "-m",
        "celery",
        "-A",
        "workers.tasks",
        "worker",
        "-Q",
        queues,
        "-c",
        str(concurrency),
        "-P",
        pool,
        "--prefetch-multiplier",
        "1",
        "-l",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    ]
    if hostname:
        argv += ["-n", hostname]
    return argv


@click.command()
@click.option("--gpu", type=int, default=None, help="GPU index: sets CUDA_VISIBLE_DEVICES, -c 1.")
@click.option("--queues", default=DEFAULT_QUEUES, show_default=True, help="Comma-separated.")
@click.option(
    "--concurrency",
    "-c",
    type=int,
    default=1,
    show_default=True,
    help="Processes (forced to 1 with --gpu: one process per GPU).",
)
@click.option(
    "--pool",
    type=click.Choice(["prefork", "solo", "threads"]),
    default="prefork",
    show_default=True,
)
@click.option("--threads", type=int, default=None, help="Torch CPU threads per process.")
@click.option("--loglevel", "-l", default="info", show_default=True)
@click.option("--name", "hostname", default=None, help="Worker node name (celery -n).")
def worker(
    gpu: int | None,
    queues: str,
    concurrency: int,
    pool: str,
    threads: int | None,
    loglevel: str,
    hostname: str | None,
) -> None:
    """Start a Celery worker for the pipeline (replaces this process).

    One worker process per GPU: ``--gpu N`` sets CUDA_VISIBLE_DEVICES=N before anything imports
    torch and runs one pool process with prefetch 1; models load lazily in that process (after
    the fork), so CUDA is never initialised in the parent.
    """
    from workers.app import check_broker

    settings = get_settings()
    check_broker(settings)  # one line now, instead of Celery retrying an absent Redis forever
    # The worker is exec'd below, so nothing this process imported (or initialised) leaks into it.
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
        concurrency = 1
        hostname = hostname or f"atlas-gpu{gpu}@%h"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
        env["MKL_NUM_THREADS"] = str(threads)
    argv = worker_argv(
        queues=queues, concurrency=concurrency, pool=pool, loglevel=loglevel, hostname=hostname
    )
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise ConfigError(f"python interpreter {argv[0]} not found")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvpe(argv[0], argv, env)
