"""Submitting prompts to the pipeline and following their job: the service every entry point
uses (the CLI, the demo, the benches, the tests, a future web API).

With a broker configured (``REDIS_URL``) the prompts go to the ``attribute`` queue and workers do
the rest; without one, the same step code runs inline in this process (the embedded default), so
the pipeline works with nothing but Neo4j. Either way a job record is kept in Neo4j
(:mod:`atlas.store.jobs`).

Nothing here prints: progress is reported through a callback that receives the job's
:class:`~atlas.store.jobs.JobSummary` (after the job is recorded, after each inline prompt, and at
each poll while waiting).

A job is recorded before its prompts are sent (a worker must find the record), so a send that
fails marks the items it did not send ``failed`` with the reason: no job is left queued for ever
by a broker that refused it. The broker is checked before the record is written, so a Redis that
is down or refuses the password leaves no job at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.errors import InputError, ServiceUnavailable
from atlas.pipeline.images import store_spec_images
from atlas.pipeline.intervention_payloads import INTERVENE_SOURCE
from atlas.pipeline.liveness import heartbeat, holder_id, reap
from atlas.pipeline.payloads import AttributePayload, PromptSpec, parse_spec
from atlas.retry import classify
from atlas.store.jobs import (
    ACTIVE_STATES,
    INVALID,
    JobItem,
    JobStore,
    JobSummary,
    ensure_job_schema,
    new_job_id,
    skip_done,
)

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings

log = logging.getLogger(__name__)

#: Called with the job's summary whenever it may have moved.
Progress = Callable[[JobSummary], None]


@dataclass(frozen=True)
class BadLine:
    """A line of a batch file that is not a prompt spec."""

    lineno: int
    reason: str
    """One line: ``{file}:{lineno}: {why}``."""
    text: str


@dataclass
class BatchFile:
    """A batch file read line by line: its entries in file order (a spec, or a bad line)."""

    path: Path
    entries: list[PromptSpec | BadLine] = field(default_factory=list)

    @property
    def specs(self) -> list[PromptSpec]:
        return [e for e in self.entries if isinstance(e, PromptSpec)]

    @property
    def bad(self) -> list[BadLine]:
        return [e for e in self.entries if isinstance(e, BadLine)]


class BatchFileError(InputError):
    """A batch file with bad lines, refused before anything runs. ``bad`` has every one (the CLI
    prints one line each); the message is the one bad line, or a summary of several."""

    def __init__(self, batch: BatchFile) -> None:
        self.bad = batch.bad
        n_bad, n_all = len(self.bad), len(batch.entries)
        if n_bad == 1:
            message = self.bad[0].reason
        else:
            message = f"{batch.path}: {n_bad} of {n_all} lines are bad; nothing was run"
        super().__init__(message)


def _entry(line: str, lineno: int, path: Path) -> PromptSpec | BadLine:
    where = f"{path}:{lineno}"
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return BadLine(lineno, f"{where}: not valid JSON ({exc.msg})", line)
    try:
        return parse_spec(obj, where)
    except InputError as exc:
        return BadLine(lineno, str(exc), line)


def read_batch_file(path: Path) -> BatchFile:
    """Read a JSONL file of prompt specs, keeping every bad line (number and reason) instead of
    stopping at the first. Unreadable or empty file -> InputError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path}: {exc}") from exc
    batch = BatchFile(path)
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            batch.entries.append(_entry(line, lineno, path))
    if not batch.entries:
        raise InputError(f"{path}: no prompt specs in the file")
    return batch


def parse_batch_file(path: Path) -> list[PromptSpec]:
    """Read a JSONL file of prompt specs; any bad line -> :class:`BatchFileError` naming all."""
    batch = read_batch_file(path)
    if batch.bad:
        raise BatchFileError(batch)
    return batch.specs


def bad_line_record(bad: BadLine) -> tuple[dict[str, Any], str]:
    """What the job record keeps of a bad line run with ``--skip-bad-lines``: the line (as it
    was, shortened) and an id that no real spec has."""
    text = bad.text if len(bad.text) <= 2000 else bad.text[:2000] + "..."
    digest = hashlib.sha256(bad.text.encode()).hexdigest()[:24]
    return {"line": bad.lineno, "text": text}, f"bad-line:{digest}"


def job_store(driver: Any, settings: AtlasSettings) -> JobStore:
    """The job records of the atlas these settings name (stale items by their threshold)."""
    return JobStore(driver, settings.neo4j_database, stale_after_s=settings.stale_after_s)


def mode_of(settings: AtlasSettings) -> str:
    """``celery`` with a broker configured, else ``inline``."""
    return "celery" if settings.redis_url else "inline"


def submit(
    settings: AtlasSettings,
    specs: Sequence[PromptSpec | BadLine],
    *,
    source: str,
    driver: Any,
    force: bool = False,
    progress: Progress | None = None,
    image_base: Path | None = None,
) -> tuple[str, int]:
    """Record a job and send (or, with no broker, run) its prompts. Returns (job id, n skipped).

    Specs whose prompt is already in the atlas (from an earlier job) are recorded as done and
    not sent, unless ``force``. ``specs`` may hold :class:`BadLine` entries too (a batch file run
    with ``--skip-bad-lines``): they are recorded as failed items with their reasons. Images are
    stored in the artifact store first (relative paths from ``image_base``); a spec whose image
    is refused is recorded as failed with its reason and not sent.
    """
    from atlas.store.schema import apply_schema

    if settings.redis_url:
        from workers.app import check_broker

        check_broker(settings)  # before the record: a refused broker leaves no job behind
    apply_schema(driver, database=settings.neo4j_database)
    ensure_job_schema(driver, settings.neo4j_database)
    store = job_store(driver, settings)
    entries = list(specs)
    if force:
        entries = [
            e.model_copy(update={"force": True}) if isinstance(e, PromptSpec) else e
            for e in entries
        ]
    failed = {i: e.reason for i, e in enumerate(entries) if isinstance(e, BadLine)}
    entries, refused = _store_images(settings, entries, image_base)
    failed.update(refused)
    records = [_record_of(e) for e in entries]
    good = {i for i, e in enumerate(entries) if isinstance(e, PromptSpec) and i not in refused}
    spec_ids = [sid for _, sid in records]
    already = {} if force else skip_done(store, spec_ids)
    job_id = new_job_id()
    store.create(
        job_id,
        [rec for rec, _ in records],
        spec_ids,
        source=source,
        mode=mode_of(settings),
        already_done={i: p for i, p in already.items() if i in good},
        failed=failed,
    )
    pending = [
        AttributePayload(spec=e, job_id=job_id, item=i)
        for i, e in enumerate(entries)
        if isinstance(e, PromptSpec) and i in good and i not in already
    ]
    holder = None if settings.redis_url else holder_id("inline")
    if holder is not None and pending:
        store.hold(job_id, [p.item for p in pending if p.item is not None], holder)
    if progress is not None:
        progress(store.summary(job_id))
    _dispatch(settings, driver, job_id, pending, progress, holder=holder)
    return job_id, len(already)


def _store_images(
    settings: AtlasSettings, entries: list[PromptSpec | BadLine], base: Path | None
) -> tuple[list[PromptSpec | BadLine], dict[int, str]]:
    """The entries with each spec's image stored (content-addressed) and the reason of every
    spec whose image was refused, by entry index."""
    idx = [i for i, e in enumerate(entries) if isinstance(e, PromptSpec)]
    specs = [entries[i] for i in idx]
    stored, refused = store_spec_images(settings, specs, base)  # type: ignore[arg-type]
    out = list(entries)
    for j, i in enumerate(idx):
        out[i] = stored[j]
    return out, {idx[j]: reason for j, reason in refused.items()}


def _record_of(entry: PromptSpec | BadLine) -> tuple[dict[str, Any], str]:
    """(what the job record keeps, spec id) of a spec or a bad line."""
    if isinstance(entry, BadLine):
        return bad_line_record(entry)
    return entry.model_dump(mode="json"), entry.spec_id()


def _dispatch(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    payloads: Sequence[AttributePayload],
    progress: Progress | None,
    *,
    holder: str | None = None,
) -> None:
    """Send the payloads to the workers, or run them here (held by ``holder``) when there is no
    broker."""
    if not payloads:
        return
    if settings.redis_url:
        send_or_fail(settings, driver, job_id, payloads)
    else:
        run_inline_payloads(settings, driver, job_id, payloads, progress, holder=holder)


def send_or_fail(
    settings: AtlasSettings, driver: Any, job_id: str, payloads: Sequence[AttributePayload]
) -> None:
    """Send the payloads to the broker. If the send fails, the items it did not send are marked
    failed with the reason (``atlas jobs retry`` sends them later) and the error is raised: a
    job is never left waiting for messages that do not exist."""
    from workers.app import send_attribute

    sent: set[int] = set()
    try:
        send_attribute(
            settings, payloads, on_sent=lambda p: sent.add(-1 if p.item is None else p.item)
        )
    except Exception as exc:
        unsent = [p.item for p in payloads if p.item is not None and p.item not in sent]
        reason = f"not sent: {classify(exc)[1]}"
        try:
            job_store(driver, settings).fail_many(job_id, unsent, reason)
        except Exception:
            log.exception("could not mark the unsent items of job %s failed", job_id)
        raise


def run_inline_payloads(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    payloads: Sequence[AttributePayload],
    progress: Progress | None = None,
    *,
    holder: str | None = None,
) -> None:
    """Attribute and ingest each payload in this process, one after the other.

    The items are held by ``holder`` (this process) with a heartbeat while it runs, so if the
    process is killed they show as stale and ``atlas jobs retry`` runs them again.
    """
    from atlas.pipeline.steps import run_inline

    store = job_store(driver, settings)
    holder = holder or holder_id("inline")
    store.hold(job_id, [p.item for p in payloads if p.item is not None], holder)
    if progress is not None:
        progress(store.summary(job_id))
    with heartbeat(store, holder, settings):
        for payload in payloads:
            run_inline(payload, settings, driver=driver, holder=holder)
            if progress is not None:
                progress(store.summary(job_id))


def resend(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    items: Sequence[JobItem],
    progress: Progress | None = None,
) -> int:
    """Queue ``items`` of a job again (idempotent steps make this safe) and send or run them."""
    store = job_store(driver, settings)
    if store.summary(job_id).source == INTERVENE_SOURCE:
        from atlas.pipeline.interventions import resend_interventions

        return resend_interventions(settings, driver, job_id, items)
    payloads = [
        AttributePayload(spec=PromptSpec.model_validate(it.spec), job_id=job_id, item=it.idx)
        for it in items
    ]
    store.requeue(job_id, [p.item for p in payloads if p.item is not None])
    _dispatch(settings, driver, job_id, payloads, progress)
    return len(payloads)


def retry_items(
    driver: Any, settings: AtlasSettings, job_id: str, stale_after: float | None
) -> list[JobItem]:
    """The items ``atlas jobs retry`` sends again: the failed ones (but not a batch file's bad
    lines, which only a fixed file can run), the stale ones (held by a worker or an inline batch
    that stopped beating), and with ``stale_after`` the active ones nothing touched for that
    many seconds. Unknown job -> InputError."""
    store = job_store(driver, settings)
    store.summary(job_id)
    untouched = {i.idx for i in store.stale_items(job_id, stale_after)} if stale_after else set()
    items = store.items(job_id, ["failed", *ACTIVE_STATES])
    return [
        i
        for i in items
        if (i.state == "failed" and i.outcome != INVALID) or i.stale or i.idx in untouched
    ]


def requeue_stale(settings: AtlasSettings, driver: Any, job_id: str, *, stale_s: float) -> int:
    """Send again the items of a job that nothing touched for ``stale_s`` seconds."""
    stale = job_store(driver, settings).stale_items(job_id, stale_s)
    return resend(settings, driver, job_id, stale) if stale else 0


def stall_s(settings: AtlasSettings) -> float:
    """No progress for this long means lost messages: above the visibility timeout, after
    which Celery itself redelivers what a dead worker held."""
    return float(settings.celery_visibility_timeout_s) + 60.0


def wait_for_job(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    *,
    poll_s: float = 1.0,
    timeout_s: float | None = None,
    requeue_after_s: float | None = None,
    progress: Progress | None = None,
) -> JobSummary:
    """Poll the job record until every item is done or failed; returns the final summary.

    ``requeue_after_s``: when the job has made no progress at all for that long, its active
    items that nothing touched for that long are sent again (safe: the tasks are idempotent).
    It covers messages lost with a Redis that had no persistence. Items lost with a dead worker
    (their heartbeat stopped) are sent again at once (:func:`atlas.pipeline.liveness.reap`);
    those of a dead inline batch end the wait with the command that runs them again.
    """
    store = job_store(driver, settings)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    summary = store.summary(job_id)
    if progress is not None:
        progress(summary)
    last_change = time.monotonic()
    state = _state(summary)
    next_reap = 0.0
    while not summary.finished:
        if summary.stale and time.monotonic() >= next_reap:
            next_reap = time.monotonic() + settings.heartbeat_interval_s
            _reap_or_refuse(settings, driver, summary)
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
        if progress is not None:
            progress(summary)
        if _state(summary) != state:
            state, last_change = _state(summary), time.monotonic()
        elif _stalled(settings, requeue_after_s, last_change):
            last_change = time.monotonic()
            n = requeue_stale(settings, driver, job_id, stale_s=requeue_after_s or 0.0)
            if n:
                log.warning("job %s stalled: re-sent %d items", job_id, n)
    return summary


def _reap_or_refuse(settings: AtlasSettings, driver: Any, summary: JobSummary) -> None:
    """Stale items while waiting: a Celery job's are sent again (when this process has the
    broker); an inline job's holder is gone, so waiting cannot end: say how to run them."""
    if summary.mode == "celery" and settings.redis_url:
        store = job_store(driver, settings)
        try:
            reap(store, settings, _broker_sender(settings), job_id=summary.job_id)
        except ServiceUnavailable as exc:
            log.warning("could not re-send the stale items of job %s: %s", summary.job_id, exc)
        return
    if summary.mode != "celery":
        raise InputError(
            f"job {summary.job_id}: {summary.stale} items are stale (the inline batch that ran "
            f"them is gone): run them again with `atlas jobs retry {summary.job_id}`"
        )


def _broker_sender(settings: AtlasSettings) -> Callable[[Sequence[AttributePayload]], None]:
    from workers.app import send_attribute

    return lambda payloads: send_attribute(settings, payloads)


def _state(summary: JobSummary) -> tuple[int, int, int, int]:
    return (summary.done, summary.failed, summary.running, summary.queued)


def _stalled(settings: AtlasSettings, requeue_after_s: float | None, last_change: float) -> bool:
    """Whether a job with a broker has made no progress for ``requeue_after_s`` seconds."""
    if not requeue_after_s or not settings.redis_url:
        return False
    return time.monotonic() - last_change > requeue_after_s


def outcome(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    *,
    wait: bool,
    timeout_s: float | None,
    progress: Progress | None = None,
) -> JobSummary | None:
    """Where a job ends up: with a broker and ``wait``, after waiting (re-sending lost work);
    inline, at once (the work ran already); with a broker and no ``wait``, None (unknown yet)."""
    if settings.redis_url and not wait:
        return None
    if not settings.redis_url:
        return job_store(driver, settings).summary(job_id)
    return wait_for_job(
        settings,
        driver,
        job_id,
        timeout_s=timeout_s,
        requeue_after_s=stall_s(settings),
        progress=progress,
    )
