"""The Celery application: one factory, the broker policy in one place.

:func:`make_celery` builds the app from :class:`atlas.settings.AtlasSettings` (the worker's entry
point builds the settings). Delivery is at-least-once: tasks are acknowledged late, one task is
prefetched at a time, a task whose worker dies is re-queued, and Redis waits
``celery_visibility_timeout_s`` (6 h by default, above the longest attribution) before it
re-delivers an unacknowledged task. Payloads are JSON only.

Queues and tasks (the names are the constants below; every call site uses them):

========================  ===========  ==========================================
task                      queue        what
========================  ===========  ==========================================
``atlas.attribute``       attribute    a chunk of prompt specs -> artifacts (GPU)
``atlas.annotate``        attribute    feature labels of one transcoder set (GPU)
``atlas.gpu.*``           attribute    any future task that needs the model
``atlas.ingest``          ingest       artifacts -> Neo4j (CPU)
``atlas.ping``            ingest       the health check (or the caller's queue)
========================  ===========  ==========================================

Every app :func:`make_celery` builds registers every pipeline task (:mod:`workers.tasks`), so a
worker started from any of them knows every message it may take off a queue (Celery drops a
message whose task it does not know). ``celery -A workers.app worker`` and ``celery -A
workers.tasks worker`` are the same app: the module attribute ``app`` is built lazily from the
environment on first access.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange, Queue

from atlas.errors import AuthError, ConfigError, ServiceUnavailable

if TYPE_CHECKING:
    from collections.abc import Callable

    from atlas.pipeline.payloads import AttributePayload
    from atlas.settings import AtlasSettings

logger = logging.getLogger(__name__)

ATTRIBUTE_QUEUE = "attribute"
INGEST_QUEUE = "ingest"
#: What ``atlas worker`` consumes by default: both pipeline queues.
PIPELINE_QUEUES = f"{ATTRIBUTE_QUEUE},{INGEST_QUEUE}"

ATTRIBUTE_TASK = "atlas.attribute"
INGEST_TASK = "atlas.ingest"
ANNOTATE_TASK = "atlas.annotate"
PING_TASK = "atlas.ping"
#: A task named with this prefix needs the model, so it goes to the GPU queue by construction.
GPU_TASK_PREFIX = "atlas.gpu."
#: One intervention spec on the model (routed to the GPU queue by its prefix).
INTERVENE_TASK = f"{GPU_TASK_PREFIX}intervene"

#: Task name (glob) -> queue. The GPU queue gets the tasks that run the model.
TASK_ROUTES: dict[str, dict[str, str]] = {
    ATTRIBUTE_TASK: {"queue": ATTRIBUTE_QUEUE},
    f"{ATTRIBUTE_TASK}.*": {"queue": ATTRIBUTE_QUEUE},
    ANNOTATE_TASK: {"queue": ATTRIBUTE_QUEUE},
    f"{GPU_TASK_PREFIX}*": {"queue": ATTRIBUTE_QUEUE},
    INGEST_TASK: {"queue": INGEST_QUEUE},
    f"{INGEST_TASK}.*": {"queue": INGEST_QUEUE},
    PING_TASK: {"queue": INGEST_QUEUE},
}


class AtlasCelery(Celery):
    """The Celery app, carrying the settings it was built from (the tasks read them)."""

    def __init__(self, settings: AtlasSettings) -> None:
        super().__init__("circuit_atlas", set_as_current=False)
        self.atlas_settings = settings


def _ping(payload: Any = None) -> dict[str, Any]:
    """Echo ``payload`` with the answering worker's host and pid (the smoke test's task)."""
    return {"pong": payload, "host": socket.gethostname(), "pid": os.getpid(), "t": time.time()}


def make_celery(settings: AtlasSettings, *, check: bool = False) -> AtlasCelery:
    """The Circuit Atlas Celery app for these settings, with every pipeline task registered.

    Broker and result backend are both ``settings.redis_url``. Building the app does not contact
    Redis; pass ``check=True`` (or call :func:`check_broker`) to fail fast with
    :class:`atlas.errors.ServiceUnavailable` when Redis does not answer.
    """
    if check:
        check_broker(settings)
    url = settings.redis_url
    transport = {"visibility_timeout": int(settings.celery_visibility_timeout_s)}
    app = AtlasCelery(settings)
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
    from workers import tasks

    tasks.register(app)
    return app


def check_broker(settings: AtlasSettings, timeout_s: float = 3.0) -> None:
    """Raise a one-line :class:`ConfigError` / :class:`ServiceUnavailable` unless Redis answers."""
    if not settings.redis_url:
        raise ConfigError("no broker configured: set REDIS_URL (e.g. redis://127.0.0.1:6379/0)")
    from atlas.services.redis_local import check_reachable

    check_reachable(settings.redis_url, timeout_s=timeout_s)


def broker_errors() -> tuple[type[BaseException], ...]:
    """What sending to Redis raises when the broker, not the message, is at fault."""
    import kombu.exceptions
    import redis.exceptions

    return (kombu.exceptions.OperationalError, redis.exceptions.RedisError, OSError)


def is_broker_fault(exc: BaseException) -> bool:
    """Whether ``exc`` is, or was raised because of, a broker fault (Celery re-raises a lost
    result-store connection as a bare ``RuntimeError`` from the Redis error)."""
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, broker_errors()):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def send_attribute(
    settings: AtlasSettings,
    payloads: Sequence[AttributePayload],
    *,
    on_sent: Callable[[AttributePayload], None] | None = None,
) -> None:
    """Publish attribute messages (JSON), ``settings.chunk_size`` specs per message;
    ``on_sent`` is called for each payload once its message is with the broker.

    Redis down -> ServiceUnavailable, a refused password -> AuthError, one line without the
    password (checked first, so it is said at once and not after the client's retries); any
    other error is raised as it is.
    """
    from atlas.pipeline.payloads import chunked

    app = make_celery(settings, check=True)
    try:
        with app.producer_or_acquire() as producer:
            for chunk in chunked(payloads, settings.chunk_size):
                now = time.time()
                for p in chunk.items:
                    p.enqueued_at = now
                app.send_task(
                    ATTRIBUTE_TASK,
                    args=[chunk.model_dump(mode="json")],
                    queue=ATTRIBUTE_QUEUE,
                    producer=producer,
                    ignore_result=True,
                )
                for p in chunk.items:
                    if on_sent is not None:
                        on_sent(p)
    except Exception as exc:
        error = broker_error(settings, exc)
        if error is exc:
            raise
        raise error from exc


def send_interventions(settings: AtlasSettings, payloads: Sequence[dict[str, Any]]) -> None:
    """Publish one ``atlas.gpu.intervene`` message per payload (JSON); broker faults are one
    line, as for :func:`send_attribute`."""
    app = make_celery(settings, check=True)
    try:
        with app.producer_or_acquire() as producer:
            for payload in payloads:
                app.send_task(
                    INTERVENE_TASK, args=[payload], queue=ATTRIBUTE_QUEUE, producer=producer
                )
    except Exception as exc:
        error = broker_error(settings, exc)
        if error is exc:
            raise
        raise error from exc


def broker_error(settings: AtlasSettings, exc: BaseException) -> BaseException:
    """The one-line error for a failed send (the URL without its password), or ``exc`` itself
    when the broker is not at fault."""
    from atlas.services.redis_local import is_auth_refusal
    from atlas.settings import redact_urls

    if not is_broker_fault(exc):
        return exc
    shown = settings.shown_redis_url
    if is_auth_refusal(exc):
        return AuthError(f"Redis at {shown} refused the password")
    detail = redact_urls(" ".join(f"{type(exc).__name__}: {exc}".split()))[:300]
    return ServiceUnavailable(f"Redis at {shown} is not reachable: {detail}")


def ping(
    app: Celery, payload: Any = "ping", timeout_s: float = 60.0, queue: str = INGEST_QUEUE
) -> dict[str, Any]:
    """Round-trip the ``atlas.ping`` task through the broker and a worker; return its answer."""
    from celery.exceptions import TimeoutError as CeleryTimeout

    try:
        result = app.send_task(PING_TASK, args=[payload], queue=queue)
        answer: dict[str, Any] = result.get(timeout=timeout_s)
    except CeleryTimeout as exc:
        raise ServiceUnavailable(
            f"no worker answered the ping task within {timeout_s:.0f} s"
        ) from exc
    except OSError as exc:
        from atlas.settings import redact_url

        shown = redact_url(str(app.conf.broker_url))
        raise ServiceUnavailable(f"Redis at {shown} is not reachable: {exc}") from exc
    return answer


_APP: AtlasCelery | None = None


def __getattr__(name: str) -> Any:
    """``workers.app.app``: built from the environment on first access (for ``celery -A``); the
    worker's entry point, so the settings are built here."""
    global _APP
    if name in ("app", "celery"):
        if _APP is None:
            from atlas.settings import AtlasSettings

            _APP = make_celery(AtlasSettings())
        return _APP
    raise AttributeError(name)
