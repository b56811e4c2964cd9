"""Celery tasks: thin wrappers around :mod:`atlas.pipeline` with the retry policy.

Start a worker with ``atlas worker`` (or ``celery -A workers.tasks worker -Q attribute,ingest
-c 1 --prefetch-multiplier 1``). The settings are built here, at the worker's entry point.

Retry policy (one place, :func:`_retry_or_fail`): transient faults (Neo4j or Redis unavailable,
:attr:`atlas.errors.AtlasError.transient`) are retried with exponential backoff and jitter up to
:data:`MAX_RETRIES` times; anything else is a permanent failure, recorded on the job item with its
reason and never retried. Tasks are idempotent (see :mod:`atlas.pipeline`), because delivery is
at-least-once (acks_late, prefetch 1, a visibility timeout above the longest task: workers/app.py).

Per-process resources (the Neo4j driver, the model cache) are created lazily by the first task in
the process that runs it, never at import and never in a parent that forks.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable
from typing import Any

from celery.exceptions import Retry
from celery.signals import worker_process_init, worker_process_shutdown
from pydantic import ValidationError

from atlas import pipeline
from atlas.errors import ServiceUnavailable
from atlas.retry import classify
from atlas.settings import AtlasSettings
from workers.app import make_celery

log = logging.getLogger(__name__)

settings = AtlasSettings()
app = make_celery(settings)

#: Retries of a transient fault before the item is recorded as failed.
MAX_RETRIES = 8
#: Backoff: base * 2**retries seconds, capped, plus up to 25% jitter.
BACKOFF_BASE_S = 2.0
BACKOFF_CAP_S = 120.0

_driver: Any = None
_driver_lock = threading.Lock()


def get_driver() -> Any:
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
    pipeline.ENGINES.clear()


@worker_process_shutdown.connect
def _close_driver(**_: Any) -> None:
    global _driver
    if _driver is not None:
        try:
            _driver.close()
        except Exception:  # pragma: no cover - best effort at exit
            log.debug("closing the Neo4j driver failed", exc_info=True)
        _driver = None


def backoff_s(retries: int) -> float:
    """Seconds to wait before retry number ``retries + 1``."""
    delay: float = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2**retries)
    return delay * (1.0 + 0.25 * random.random())


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


def _retry_or_fail(
    task: Any, exc: BaseException, items: list[tuple[str | None, int | None]]
) -> dict[str, Any]:
    """Retry a transient fault with backoff; record anything else as a permanent failure of
    every item of the message (items already done stay done)."""
    transient, reason = classify(exc)
    retries = int(task.request.retries or 0)
    if transient and retries < MAX_RETRIES:
        _drop_driver_on_outage()
        countdown = backoff_s(retries)
        log.warning(
            "%s: transient fault (%s), retry %d in %.1fs", task.name, reason, retries + 1, countdown
        )
        raise task.retry(exc=exc, countdown=countdown, max_retries=MAX_RETRIES)
    if transient:
        reason = f"gave up after {retries} retries: {reason}"
    try:
        driver = get_driver()
    except Exception:
        driver = None
    for job_id, item in items:
        if driver is not None:
            pipeline.record_failure(driver, job_id, item, reason)
        else:
            log.error("job %s item %s failed and Neo4j is unreachable: %s", job_id, item, reason)
    return {"results": [pipeline.StepResult(outcome="failed", reason=reason).model_dump()]}


def _items_of(payload: Any) -> list[tuple[str | None, int | None]]:
    """(job id, item) of every spec in a raw message, as far as it can be read."""
    raw = payload.get("items") if isinstance(payload, dict) else None
    entries = raw if isinstance(raw, list) else [payload]
    return [
        (e.get("job_id"), e.get("item")) if isinstance(e, dict) else (None, None) for e in entries
    ]


def _send_ingest(chunk: pipeline.IngestChunk) -> None:
    try:
        ingest.apply_async(args=[chunk.model_dump(mode="json")], queue="ingest")
    except Exception as exc:  # kombu raises OperationalError and friends when Redis is down
        raise ServiceUnavailable(f"could not send the ingest message: {exc}") from exc


def _results(results: list[pipeline.StepResult]) -> dict[str, Any]:
    return {"results": [r.model_dump(mode="json") for r in results]}


def _run_chunk(
    task: Any,
    payload: Any,
    model: type[pipeline.AttributeChunk] | type[pipeline.IngestChunk],
    step: Callable[[Any], list[pipeline.StepResult]],
) -> dict[str, Any]:
    """Validate a chunk message (a bare single item is accepted too), run ``step`` on it, and
    apply the retry policy to whatever it raises."""
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


@app.task(name="atlas.attribute", bind=True, acks_late=True, ignore_result=True)
def attribute(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Attribute a chunk of prompt specs (:class:`atlas.pipeline.AttributeChunk`) and hand their
    artifacts to the ``ingest`` queue as one message."""
    return _run_chunk(
        self,
        payload,
        pipeline.AttributeChunk,
        lambda chunk: pipeline.attribute_chunk_step(
            chunk, settings, driver=get_driver(), on_ingest=_send_ingest
        ),
    )


@app.task(name="atlas.ingest", bind=True, acks_late=True, ignore_result=True)
def ingest(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Ingest the artifacts of a chunk into Neo4j (one transaction per prompt, each marking its
    job item done). A permanent failure of one artifact fails that item alone."""
    return _run_chunk(
        self,
        payload,
        pipeline.IngestChunk,
        lambda chunk: pipeline.ingest_chunk_step(chunk, settings, driver=get_driver()),
    )


@app.task(name="atlas.annotate", bind=True, acks_late=True)
def annotate(self: Any, payload: dict[str, Any]) -> dict[str, Any]:
    """Label the features of one transcoder set (logit lens + top activations)."""
    p = pipeline.AnnotatePayload.model_validate(payload)
    try:
        return pipeline.annotate_step(p, settings, driver=get_driver())
    except Retry:
        raise
    except Exception as exc:
        return _retry_or_fail(self, exc, [(p.job_id, None)])
