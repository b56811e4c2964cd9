"""Submitting prompts to the pipeline and following their job: the service every entry point
uses (the CLI, the demo, the benches, the tests, a future web API).

With a broker configured (``REDIS_URL``) the prompts go to the ``attribute`` queue and workers do
the rest; without one, the same step code runs inline in this process (the embedded default), so
the pipeline works with nothing but Neo4j. Either way a job record is kept in Neo4j
(:mod:`atlas.store.jobs`).

Nothing here prints: progress is reported through a callback that receives the job's
:class:`~atlas.store.jobs.JobSummary` (after the job is recorded, after each inline prompt, and at
each poll while waiting).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.errors import InputError, ServiceUnavailable
from atlas.pipeline.images import record_refused, store_spec_images
from atlas.pipeline.payloads import AttributePayload, PromptSpec, parse_spec
from atlas.store.jobs import (
    ACTIVE_STATES,
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


def parse_batch_file(path: Path) -> list[PromptSpec]:
    """Read a JSONL file of prompt specs. Any malformed line -> InputError naming the line."""
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
        specs.append(parse_spec(obj, f"{path}:{lineno}"))
    if not specs:
        raise InputError(f"{path}: no prompt specs in the file")
    return specs


def job_store(driver: Any, settings: AtlasSettings) -> JobStore:
    """The job records of the atlas these settings name."""
    return JobStore(driver, settings.neo4j_database)


def mode_of(settings: AtlasSettings) -> str:
    """``celery`` with a broker configured, else ``inline``."""
    return "celery" if settings.redis_url else "inline"


def submit(
    settings: AtlasSettings,
    specs: Sequence[PromptSpec],
    *,
    source: str,
    driver: Any,
    force: bool = False,
    progress: Progress | None = None,
    image_base: Path | None = None,
) -> tuple[str, int]:
    """Record a job and send (or, with no broker, run) its prompts. Returns (job id, n skipped).

    Specs whose prompt is already in the atlas (from an earlier job) are recorded as done and
    not sent, unless ``force``. Images are stored in the artifact store first (relative paths
    from ``image_base``); a spec whose image is refused is recorded as failed and not sent.
    """
    from atlas.store.schema import apply_schema

    apply_schema(driver, database=settings.neo4j_database)
    ensure_job_schema(driver, settings.neo4j_database)
    store = job_store(driver, settings)
    if force:
        specs = [s.model_copy(update={"force": True}) for s in specs]
    specs, refused = store_spec_images(settings, specs, image_base)
    spec_ids = [s.spec_id() for s in specs]
    already = {} if force else skip_done(store, spec_ids)
    job_id = new_job_id()
    store.create(
        job_id,
        [s.model_dump(mode="json") for s in specs],
        spec_ids,
        source=source,
        mode=mode_of(settings),
        already_done=already,
    )
    record_refused(store, job_id, refused)
    if progress is not None:
        progress(store.summary(job_id))
    pending = [
        AttributePayload(spec=s, job_id=job_id, item=i)
        for i, s in enumerate(specs)
        if i not in already and i not in refused
    ]
    _dispatch(settings, driver, job_id, pending, progress)
    return job_id, len(already)


def _dispatch(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    payloads: Sequence[AttributePayload],
    progress: Progress | None,
) -> None:
    """Send the payloads to the workers, or run them here when there is no broker."""
    if not payloads:
        return
    if settings.redis_url:
        from workers.app import send_attribute

        send_attribute(settings, payloads)
    else:
        run_inline_payloads(settings, driver, job_id, payloads, progress)


def run_inline_payloads(
    settings: AtlasSettings,
    driver: Any,
    job_id: str,
    payloads: Sequence[AttributePayload],
    progress: Progress | None = None,
) -> None:
    """Attribute and ingest each payload in this process, one after the other."""
    from atlas.pipeline.steps import run_inline

    store = job_store(driver, settings)
    if progress is not None:
        progress(store.summary(job_id))
    for payload in payloads:
        run_inline(payload, settings, driver=driver)
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
    payloads = []
    for it in items:
        store.mark(job_id, it.idx, state="queued")
        spec = PromptSpec.model_validate(it.spec)
        payloads.append(AttributePayload(spec=spec, job_id=job_id, item=it.idx))
    _dispatch(settings, driver, job_id, payloads, progress)
    return len(payloads)


def retry_items(
    driver: Any, settings: AtlasSettings, job_id: str, stale_after: float | None
) -> list[JobItem]:
    """The items ``atlas jobs retry`` sends again: the failed ones, and with ``stale_after`` the
    active ones nothing touched for that many seconds. Unknown job -> InputError."""
    store = job_store(driver, settings)
    store.summary(job_id)
    states = ["failed"] + (list(ACTIVE_STATES) if stale_after else [])
    items = store.items(job_id, states)
    if stale_after:
        stale = {i.idx for i in store.stale_items(job_id, stale_after)}
        items = [i for i in items if i.state == "failed" or i.idx in stale]
    return items


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
    It covers messages lost with a Redis that had no persistence; messages lost with a dead
    worker are Celery's to redeliver (visibility timeout).
    """
    store = job_store(driver, settings)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    summary = store.summary(job_id)
    if progress is not None:
        progress(summary)
    last_change = time.monotonic()
    state = _state(summary)
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
