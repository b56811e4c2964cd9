"""The one rule for transient faults: which exceptions are worth retrying, how long to wait
between tries (:class:`Backoff`), and the in-process retry loop used by ``atlas import`` and by the
inline (no broker) pipeline.

A fault is transient when waiting may fix it: Neo4j or Redis unreachable, a retryable driver
error (deadlock, database not yet available: :class:`~atlas.errors.StoreBusy`). Everything else
(bad input, a missing model, a refused query) is permanent and raised at once. Celery tasks use
:func:`classify` and a :class:`Backoff` too (:data:`TASK_BACKOFF`), with Celery's own countdown
retries (workers/tasks.py) instead of the loop.

Only idempotent work may be retried: ingestion is (a stored prompt is skipped and an interrupted
transaction leaves nothing), and so is a pipeline step (done prompts are skipped).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from atlas.errors import AtlasError, ServiceUnavailable, StoreBusy

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """An exponential backoff schedule: pause ``n`` (from 0) is ``first_s * factor**n`` seconds,
    at most ``cap_s``, plus up to ``jitter`` of itself at random (so that many clients hit by the
    same outage do not come back in step). Retrying stops when the pauses reach ``budget_s`` or
    after ``max_retries`` retries, whichever is set."""

    first_s: float
    cap_s: float
    factor: float = 2.0
    jitter: float = 0.0
    budget_s: float | None = None
    max_retries: int | None = None

    def delay(self, retries: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait before retry number ``retries + 1``."""
        base = min(self.cap_s, self.first_s * self.factor**retries)
        return base * (1.0 + self.jitter * rand()) if self.jitter else base

    def may_retry(self, retries: int, waited_s: float = 0.0) -> bool:
        """Whether retry number ``retries + 1`` is still allowed after ``waited_s`` of pauses."""
        if self.max_retries is not None and retries >= self.max_retries:
            return False
        return self.budget_s is None or waited_s < self.budget_s


#: In-process retries (``atlas import``, the inline pipeline): enough to ride out a Neo4j
#: restart, which takes ~30 s.
INLINE_BACKOFF = Backoff(first_s=1.0, cap_s=30.0, budget_s=90.0)

#: Celery task retries: longer, jittered (many workers retry at once), a bounded number of times
#: before the item is recorded as failed.
TASK_BACKOFF = Backoff(first_s=2.0, cap_s=120.0, jitter=0.25, max_retries=8)


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
    backoff: Backoff = INLINE_BACKOFF,
    warn: Callable[[str], None] | None = None,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call ``fn``, retrying transient faults (:func:`classify`) on the ``backoff`` schedule
    until its budget (or its number of retries) is spent.

    ``warn`` gets one line per retry, naming ``service`` when it is unreachable. Permanent
    errors are raised unchanged; a transient one, once the budget is spent, with "gave up after
    N s of retries" appended to an :class:`~atlas.errors.AtlasError`'s message.
    """
    waited = 0.0
    retries = 0
    while True:
        try:
            return fn()
        except Exception as exc:
            transient, reason = classify(exc)
            if not transient:
                raise
            pause = _next_pause(backoff, retries, waited)
            if pause <= 0:
                _note_gave_up(exc, waited)
                raise
            if warn is not None:
                detail = " ".join(str(exc).split())[:400] or reason
                warn(
                    f"warning: {what}: {_fault(exc, service)}, retrying in {pause:.0f} s ({detail})"
                )
            (sleep or time.sleep)(pause)
            waited += pause
            retries += 1


def _next_pause(backoff: Backoff, retries: int, waited: float) -> float:
    """The next pause, shortened so the total stays within the budget (0: stop)."""
    if not backoff.may_retry(retries, waited):
        return 0.0
    pause = backoff.delay(retries)
    if backoff.budget_s is not None:
        pause = min(pause, backoff.budget_s - waited)
    return pause


def _note_gave_up(exc: BaseException, waited: float) -> None:
    """Append how long we retried to a one-message :class:`AtlasError`."""
    one_message = len(exc.args) == 1 and isinstance(exc.args[0], str)
    if isinstance(exc, AtlasError) and waited > 0 and one_message:
        exc.args = (f"{exc.args[0]} (gave up after {waited:.0f} s of retries)",)
