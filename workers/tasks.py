"""Celery tasks: thin wrappers around :mod:`atlas.pipeline.steps` with the retry policy.

Start a worker with ``atlas worker`` (or ``celery -A workers.tasks worker -Q attribute,ingest
-c 1 --prefetch-multiplier 1``). :func:`register` adds the tasks to an app;
:func:`workers.app.make_celery` calls it for every app it builds, so every app knows every task.
The settings a task runs with are its app's (``app.atlas_settings``, built at the worker's entry
point).

Retry policy (one place, :func:`_retry_or_fail`): transient faults (Neo4j or Redis unavailable,
:attr:`atlas.errors.AtlasError.transient`) are retried on the :data:`atlas.retry.TASK_BACKOFF`
schedule; anything else is a permanent failure, recorded on the job item with its reason and
never retried. Tasks are idempotent (see :mod:`atlas.pipeline.steps`), because delivery is
at-least-once (acks_late, prefetch 1, a visibility timeout above the longest task: workers/app.py).

Lost workers (:mod:`atlas.pipeline.liveness`): each attribute and ingest task holds its job items
with a heartbeat while it runs, and every worker runs a reaper thread (started when the worker is
ready, in its main process) that sends again the items whose holder stopped beating. A worker
killed as a whole, pool and all, so loses its chunk for ``stale_after_s``, not for the broker's
visibility timeout.

Logging (:func:`_quiet_logging`): the driver's and the broker client's retry chatter stays below
the worker's log level unless it is ``debug``, and URLs are shown without their passwords.

Per-process resources (the Neo4j driver, the engine cache) are created lazily by the first task in
the process that runs it, never at import and never in a parent that forks; the pipeline's
modules (and torch with them) are imported by the first task too.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from celery.exceptions import Retry
from celery.signals import (
    after_setup_logger,
    worker_process_init,
    worker_process_shutdown,
    worker_ready,
    worker_shutdown,
)

from atlas.errors import ServiceUnavailable
from atlas.retry import TASK_BACKOFF, classify
from workers.app import (
    ANNOTATE_TASK,
    ATTRIBUTE_TASK,
    INGEST_QUEUE,
    INGEST_TASK,
    INTERVENE_TASK,
    is_broker_fault,
)

if TYPE_CHECKING:
    from celery import Celery

    from atlas.pipeline.payloads import IngestChunk, StepResult
    from atlas.settings import AtlasSettings

log = logging.getLogger(__name__)

_driver: Any = None
_driver_lock = threading.Lock()


def __getattr__(name: str) -> Any:
    """``workers.tasks.app`` is ``workers.app.app`` (for ``celery -A workers.tasks``)."""
    if name in ("app", "celery"):
        import workers.app

        return workers.app.app
    raise AttributeError(name)


def get_driver(settings: AtlasSettings) -> Any:
    """This process's Neo4j driver (created on first use)."""
    global _driver
    with _driver_lock:
        if _driver is None:
            from atlas.store.connection import open_driver

            _driver = open_driver(settings)
        return _driver


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    """A forked pool process must not share its parent's driver or models."""
    global _driver
    _driver = None
    from atlas.engine import PROCESS_ENGINES

    PROCESS_ENGINES.clear()


@worker_process_shutdown.connect
def _close_driver(**_: Any) -> None:
    global _driver
    if _driver is not None:
        try:
            _driver.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.debug("closing the Neo4j driver failed", exc_info=True)
        _driver = None


def _drop_driver_on_outage() -> None:
    """After a Neo4j outage, the next attempt reconnects from scratch."""
    global _driver
    with _driver_lock:
        if _driver is not None:
            try:
                _driver.close()
            except Exception:
                log.debug("closing a broken driver failed", exc_info=True)
            _driver = None


_reaper: Any = None


@worker_ready.connect
def _start_reaper(sender: Any = None, **_: Any) -> None:
    """Every worker looks for lost items at start-up and every heartbeat interval."""
    global _reaper
    app = getattr(sender, "app", None)
    settings = getattr(app, "atlas_settings", None)
    if settings is None or _reaper is not None:
        return
    from atlas.pipeline.liveness import Reaper
    from atlas.store.connection import open_driver
    from workers.app import send_attribute

    _reaper = Reaper(
        settings,
        connect=lambda: open_driver(settings),
        send=lambda payloads: send_attribute(settings, payloads),
    ).start()


@worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    global _reaper
    if _reaper is not None:
        _reaper.stop()
        _reaper = None


@after_setup_logger.connect
def _quiet_logging(logger: Any = None, loglevel: Any = None, **_: Any) -> None:
    """The worker's log: no driver or broker retry floods, no passwords in URLs."""
    from atlas.logs import quiet_service_loggers, redact_handlers

    quiet_service_loggers(debug=loglevel is not None and int(loglevel) <= logging.DEBUG)
    redact_handlers(logger or logging.getLogger())


def _holder() -> str:
    from atlas.pipeline.liveness import holder_id

    return holder_id()


def _heartbeat(settings: AtlasSettings, holder: str) -> Any:
    """Keeps the items this task holds alive while it runs."""
    from atlas.pipeline.liveness import heartbeat
    from atlas.store.jobs import JobStore

    store = JobStore(get_driver(settings), settings.neo4j_database)
    return heartbeat(store, holder, settings)


def _settings(task: Any) -> AtlasSettings:
    settings: AtlasSettings = task.app.atlas_settings
    return settings


def _retry_or_fail(
    task: Any, exc: BaseException, items: list[tuple[str | None, int | None]]
) -> dict[str, Any]:
    """Retry a transient fault with backoff; record anything else as a permanent failure of
    every item of the message (items already done stay done)."""
    transient, reason = classify(exc)
    retries = int(task.request.retries or 0)
    if transient and TASK_BACKOFF.may_retry(retries):
        _drop_driver_on_outage()
        countdown = TASK_BACKOFF.delay(retries)
        log.warning(
            "%s: transient fault (%s), retry %d in %.1fs", task.name, reason, retries + 1, countdown
        )
        raise task.retry(exc=exc, countdown=countdown, max_retries=TASK_BACKOFF.max_retries)
    if transient:
        reason = f"gave up after {retries} retries: {reason}"
    _record_failures(task, items, reason)
    from atlas.pipeline.payloads import StepResult

    return {"results": [StepResult(outcome="failed", reason=reason).model_dump()]}


def _record_failures(task: Any, items: list[tuple[str | None, int | None]], reason: str) -> None:
    """Every item of a message that failed for good, on its job record (or in the log when Neo4j
    cannot be reached)."""
    from atlas.pipeline import steps

    settings = _settings(task)
    try:
        driver = get_driver(settings)
    except Exception:
        driver = None
    for job_id, item in items:
        if driver is not None:
            steps.record_failure(driver, settings, job_id, item, reason)
        else:
            log.error("job %s item %s failed and Neo4j is unreachable: %s", job_id, item, reason)


def _items_of(payload: Any) -> list[tuple[str | None, int | None]]:
    """(job id, item) of every spec in a raw message, as far as it can be read."""
    raw = payload.get("items") if isinstance(payload, dict) else None
    entries = raw if isinstance(raw, list) else [payload]
    return [
        (e.get("job_id"), e.get("item")) if isinstance(e, dict) else (None, None) for e in entries
    ]


def _ingest_sender(app: Celery) -> Callable[[IngestChunk], None]:
    """Hands an attribute chunk's artifacts to the ingest queue; Redis down -> transient."""

    def send(chunk: IngestChunk) -> None:
        try:
            app.send_task(
                INGEST_TASK,
                args=[chunk.model_dump(mode="json")],
                queue=INGEST_QUEUE,
                ignore_result=True,
            )
        except Exception as exc:
            if not is_broker_fault(exc):
                raise
            from atlas.settings import redact_urls

            detail = redact_urls(" ".join(str(exc).split()))[:300]
            raise ServiceUnavailable(f"could not send the ingest message: {detail}") from exc

    return send


def _results(results: list[StepResult]) -> dict[str, Any]:
    return {"results": [r.model_dump(mode="json") for r in results]}


def _run_chunk(
    task: Any, payload: Any, kind: str, step: Callable[[Any], list[StepResult]]
) -> dict[str, Any]:
    """Validate a chunk message (``kind`` ``attribute`` or ``ingest``; a bare single item is
    accepted too), run ``step`` on it, and apply the retry policy to whatever it raises."""
    from pydantic import ValidationError

    from atlas.pipeline.payloads import AttributeChunk, IngestChunk

    model = AttributeChunk if kind == "attribute" else IngestChunk
    if isinstance(payload, dict) and "items" not in payload:
        payload = {"items": [payload]}
    try:
        chunk = model.model_validate(payload)
    except ValidationError as exc:
        reason = f"malformed {task.name} payload: {exc.errors()[0]['msg']}"
        return _retry_or_fail(task, ValueError(reason), _items_of(payload))
    try:
        return _results(step(chunk))
    except Retry:
        raise
    except Exception as exc:
        return _retry_or_fail(task, exc, [(p.job_id, p.item) for p in chunk.items])


def attribute(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Attribute a chunk of prompt specs (:class:`atlas.pipeline.payloads.AttributeChunk`) and
    hand their artifacts to the ``ingest`` queue as one message."""
    from atlas.pipeline.steps import attribute_chunk_step

    settings = _settings(self)
    holder = _holder()

    def step(chunk: Any) -> list[StepResult]:
        with _heartbeat(settings, holder):
            return attribute_chunk_step(
                chunk,
                settings,
                driver=get_driver(settings),
                on_ingest=_ingest_sender(self.app),
                holder=holder,
            )

    return _run_chunk(self, payload, "attribute", step)


def ingest(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Ingest the artifacts of a chunk into Neo4j (one transaction per prompt, each marking its
    job item done). A permanent failure of one artifact fails that item alone."""
    from atlas.pipeline.steps import ingest_chunk_step

    settings = _settings(self)
    holder = _holder()

    def step(chunk: Any) -> list[StepResult]:
        with _heartbeat(settings, holder):
            return ingest_chunk_step(chunk, settings, driver=get_driver(settings), holder=holder)

    return _run_chunk(self, payload, "ingest", step)


def annotate(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Label the features of one transcoder set (logit lens + top activations)."""
    from atlas.pipeline.payloads import AnnotatePayload
    from atlas.pipeline.steps import annotate_step

    settings = _settings(self)
    p = AnnotatePayload.model_validate(payload)
    try:
        return annotate_step(p, settings, driver=get_driver(settings))
    except Retry:
        raise
    except Exception as exc:
        return _retry_or_fail(self, exc, [(p.job_id, None)])


def intervene(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Run one intervention spec (:class:`atlas.pipeline.intervention_payloads.InterventionPayload`)
    on this worker's engine, store it when asked, and mark its job item."""
    from pydantic import ValidationError

    from atlas.pipeline.intervention_payloads import InterventionPayload
    from atlas.pipeline.interventions import intervene_item_step

    settings = _settings(self)
    holder = _holder()
    try:
        p = InterventionPayload.model_validate(payload)
    except ValidationError as exc:
        reason = f"malformed {self.name} payload: {exc.errors()[0]['msg']}"
        return _retry_or_fail(self, ValueError(reason), _items_of(payload))
    try:
        with _heartbeat(settings, holder):
            return intervene_item_step(p, settings, driver=get_driver(settings), holder=holder)
    except Retry:
        raise
    except Exception as exc:
        return _retry_or_fail(self, exc, [(p.job_id, p.item)])


def register(app: Celery) -> None:
    """Add the pipeline's tasks to ``app`` (acks late; results of the chunk tasks ignored)."""
    app.task(name=ATTRIBUTE_TASK, bind=True, acks_late=True, ignore_result=True)(attribute)
    app.task(name=INGEST_TASK, bind=True, acks_late=True, ignore_result=True)(ingest)
    app.task(name=ANNOTATE_TASK, bind=True, acks_late=True)(annotate)
    app.task(name=INTERVENE_TASK, bind=True, acks_late=True)(intervene)
