"""The Celery application: one factory, the broker policy in one place.

:func:`make_celery` builds the app from :class:`atlas.settings.AtlasSettings` (the worker's entry
point builds the settings). Delivery is at-least-once: tasks are acknowledged late, one task is
prefetched at a time, a task whose worker dies is re-queued, and Redis waits
``celery_visibility_timeout_s`` (6 h by default, above the longest attribution) before it
re-delivers an unacknowledged task. Payloads are JSON only.

Queues: ``attribute`` (GPU workers, one process per GPU) and ``ingest`` (CPU workers). Task
names starting ``atlas.attribute`` go to ``attribute``; everything else defaults to ``ingest``.

``celery -A workers.app worker`` works too: the module attribute ``app`` is built lazily from
the environment on first access. The pipeline's tasks live in :mod:`workers.tasks`.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

from atlas.errors import ConfigError

if TYPE_CHECKING:
    from atlas.settings import AtlasSettings

logger = logging.getLogger(__name__)

ATTRIBUTE_QUEUE = "attribute"
INGEST_QUEUE = "ingest"
PING_TASK = "atlas.ping"

#: Task name (glob) -> queue. The GPU queue only gets attribution.
TASK_ROUTES: dict[str, dict[str, str]] = {
    "atlas.attribute": {"queue": ATTRIBUTE_QUEUE},
    "atlas.attribute.*": {"queue": ATTRIBUTE_QUEUE},
    "atlas.ingest": {"queue": INGEST_QUEUE},
    "atlas.ingest.*": {"queue": INGEST_QUEUE},
}


def _ping(payload: Any = None) -> dict[str, Any]:
    """Echo ``payload`` with the answering worker's host and pid (the smoke test's task)."""
    return {"pong": payload, "host": socket.gethostname(), "pid": os.getpid(), "t": time.time()}


def make_celery(settings: AtlasSettings, *, check: bool = False) -> Celery:
    """The Circuit Atlas Celery app for these settings.

    Broker and result backend are both ``settings.redis_url``. Building the app does not contact
    Redis; pass ``check=True`` (or call :func:`check_broker`) to fail fast with
    :class:`atlas.errors.ServiceUnavailable` when Redis does not answer.
    """
    if check:
        check_broker(settings)
    url = settings.redis_url
    transport = {"visibility_timeout": int(settings.celery_visibility_timeout_s)}
    app = Celery("circuit_atlas", set_as_current=False)
    app.conf.update(
        broker_url=url,
        result_backend=url,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        result_accept_content=["json"],
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        # one direct exchange per queue, so a message lands in exactly one queue
        task_queues=tuple(
            Queue(name, Exchange(name, type="direct"), routing_key=name)
            for name in (ATTRIBUTE_QUEUE, INGEST_QUEUE)
        ),
        task_default_queue=INGEST_QUEUE,
        task_default_exchange=INGEST_QUEUE,
        task_default_routing_key=INGEST_QUEUE,
        task_routes=TASK_ROUTES,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        worker_hijack_root_logger=False,
        enable_utc=True,
        timezone="UTC",
    )
    app.task(name=PING_TASK)(_ping)
    return app


def check_broker(settings: AtlasSettings, timeout_s: float = 3.0) -> None:
    """Raise a one-line :class:`ConfigError` / :class:`ServiceUnavailable` unless Redis answers."""
    if not settings.redis_url:
        raise ConfigError("no broker configured: set REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    from atlas.services.redis_local import check_reachable

    check_reachable(settings.redis_url, timeout_s=timeout_s)


def ping(
    app: Celery, payload: Any = "ping", timeout_s: float = 60.0, queue: str = INGEST_QUEUE
) -> dict[str, Any]:
    """Round-trip the ``atlas.ping`` task through the broker and a worker; return its answer."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    from atlas.errors import ServiceUnavailable

    try:
        result = app.send_task(PING_TASK, args=[payload], queue=queue)
        answer: dict[str, Any] = result.get(timeout=timeout_s)
    except CeleryTimeout as exc:
        raise ServiceUnavailable(
            f"no worker answered the ping task within {timeout_s:.0f} s"
        ) from exc
    except OSError as exc:
        raise ServiceUnavailable(f"Redis at {app.conf.broker_url} is not reachable: {exc}") from exc
    return answer


_APP: Celery | None = None


def __getattr__(name: str) -> Any:
    """``workers.app.app``: built from the environment on first access (for ``celery -A``)."""
    global _APP
    if name in ("app", "celery"):
        if _APP is None:
            from atlas.settings import AtlasSettings

            _APP = make_celery(AtlasSettings())
        return _APP
    raise AttributeError(name)
