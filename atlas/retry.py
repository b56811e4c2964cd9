"""The one rule for transient faults: which exceptions are worth retrying, and the in-process
retry loop used by ``atlas import`` and by the inline (no broker) pipeline.

A fault is transient when waiting may fix it: Neo4j or Redis unreachable, a retryable driver
error (deadlock, database not yet available: :class:`~atlas.errors.StoreBusy`). Everything else
(bad input, a missing model, a refused query) is permanent and raised at once. Celery tasks use
:func:`classify` too, with Celery's own countdown retries (workers/tasks.py) instead of the loop.

Only idempotent work may be retried: ingestion is (a stored prompt is skipped and an interrupted
transaction leaves nothing), and so is a pipeline step (done prompts are skipped).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from atlas.errors import AtlasError, ServiceUnavailable, StoreBusy

T = TypeVar("T")

#: First pause after a transient fault, the longest single pause, and the longest total pause
#: (enough to ride out a Neo4j restart, which takes ~30 s).
RETRY_FIRST_S = 1.0
RETRY_MAX_DELAY_S = 30.0
RETRY_BUDGET_S = 90.0


def classify(exc: BaseException) -> tuple[bool, str]:
    """``(transient, one-line reason)`` for an exception."""
    reason = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
    if isinstance(exc, AtlasError):
        return exc.transient, str(exc).splitlines()[0][:500] or type(exc).__name__
    try:
        import neo4j.exceptions as nex

        if isinstance(exc, nex.ServiceUnavailable | nex.SessionExpired | nex.TransientError):
            return True, reason
    except ImportError:  # pragma: no cover - neo4j is a dependency
        pass
    try:
        import redis.exceptions as rex

        if isinstance(exc, rex.ConnectionError | rex.TimeoutError):
            return True, reason
    except ImportError:  # pragma: no cover - redis is a dependency
        pass
    if isinstance(exc, ConnectionError | TimeoutError):
        return True, reason
    return False, reason


def _fault(exc: BaseException, service: str) -> str:
    if isinstance(exc, StoreBusy):
        return "Neo4j busy"
    if isinstance(exc, ServiceUnavailable):
        return f"{service} unreachable"
    return "transient fault"


def retry_transient(
    fn: Callable[[], T],
    *,
    what: str,
    service: str = "a service",
    first_delay_s: float = RETRY_FIRST_S,
    max_delay_s: float = RETRY_MAX_DELAY_S,
    budget_s: float = RETRY_BUDGET_S,
    warn: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn``, retrying transient faults (:func:`classify`) with exponential backoff until
    ``budget_s`` seconds of pauses are spent.

    ``warn`` gets one line per retry, naming ``service`` when it is unreachable. Permanent errors are raised unchanged; a transient one,
    once the budget is spent, with "gave up after N s of retries" appended to an
    :class:`~atlas.errors.AtlasError`'s message.
    """
    waited = 0.0
    delay = first_delay_s
    while True:
        try:
            return fn()
        except Exception as exc:
            transient, reason = classify(exc)
            if not transient:
                raise
            pause = min(delay, max_delay_s, budget_s - waited)
            if pause <= 0:
                if (
                    isinstance(exc, AtlasError)
                    and waited > 0
                    and len(exc.args) == 1
                    and isinstance(exc.args[0], str)
                ):
                    exc.args = (f"{exc.args[0]} (gave up after {waited:.0f} s of retries)",)
                raise
            if warn is not None:
                detail = " ".join(str(exc).split())[:400] or reason
                warn(
                    f"warning: {what}: {_fault(exc, service)}, retrying in {pause:.0f} s ({detail})"
                )
            (sleep or time.sleep)(pause)
            waited += pause
            delay *= 2
