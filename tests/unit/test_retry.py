"""The retry of transient faults used by ``atlas import`` and the inline pipeline (no database:
a fake step and a fake clock)."""

from __future__ import annotations

import neo4j.exceptions
import pytest
import redis.exceptions

from atlas.errors import InputError, ServiceUnavailable, StoreError
from atlas.retry import INLINE_BACKOFF, TASK_BACKOFF, Backoff, retry_transient
from atlas.store.connection import translate_neo4j_error


class Flaky:
    """Fails with ``exc`` the first ``n`` calls, then returns "ok"."""

    def __init__(self, n: int, exc: Exception) -> None:
        self.n = n
        self.exc = exc
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.n:
            raise self.exc
        return "ok"


def test_transient_faults_are_retried_with_backoff_and_one_line_warnings() -> None:
    sleeps: list[float] = []
    warnings: list[str] = []
    fn = Flaky(3, ServiceUnavailable("ingesting prompt p: Neo4j unreachable:\nrefused"))
    assert retry_transient(
        fn, what="a.safetensors", service="Neo4j", warn=warnings.append, sleep=sleeps.append
    )
    assert fn.calls == 4
    assert sleeps == [1.0, 2.0, 4.0]
    assert len(warnings) == 3
    assert warnings[0].startswith("warning: a.safetensors: Neo4j unreachable, retrying in 1 s (")
    assert all("\n" not in w for w in warnings)


def test_budget_covers_a_restart_then_gives_up_with_the_error() -> None:
    sleeps: list[float] = []
    fn = Flaky(1000, ServiceUnavailable("Neo4j unreachable"))
    with pytest.raises(ServiceUnavailable, match=r"gave up after 90 s of retries"):
        retry_transient(fn, what="f", sleep=sleeps.append)
    assert sleeps == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 29.0]
    assert sum(sleeps) == INLINE_BACKOFF.budget_s >= 60


def test_permanent_errors_are_not_retried() -> None:
    sleeps: list[float] = []
    fn = Flaky(1, InputError("bad.safetensors is not a readable graph artifact"))
    with pytest.raises(InputError, match=r"not a readable graph artifact$"):
        retry_transient(fn, what="bad.safetensors", sleep=sleeps.append)
    assert fn.calls == 1 and sleeps == []


def test_a_store_error_over_a_retryable_driver_error_is_retried() -> None:
    """A deadlock or an unavailable database arrives as StoreError translated from a retryable
    driver error: retried. A StoreError over a non-retryable one is not."""
    retryable = translate_neo4j_error(neo4j.exceptions.TransientError(), "deadlock")
    assert isinstance(retryable, StoreError)
    sleeps: list[float] = []
    warnings: list[str] = []
    fn = Flaky(1, retryable)
    assert retry_transient(fn, what="f", warn=warnings.append, sleep=sleeps.append) == "ok"
    assert sleeps == [1.0] and "Neo4j busy, retrying in 1 s" in warnings[0]

    permanent = translate_neo4j_error(neo4j.exceptions.ClientError(), "syntax")
    with pytest.raises(StoreError):
        retry_transient(Flaky(1, permanent), what="f", sleep=sleeps.append)
    assert sleeps == [1.0]


def test_raw_driver_and_redis_faults_are_transient_anything_else_is_not() -> None:
    """The inline pipeline's steps may raise library exceptions as they are."""
    sleeps: list[float] = []
    for exc in (neo4j.exceptions.ServiceUnavailable("down"), redis.exceptions.ConnectionError("x")):
        fn = Flaky(2, exc)
        assert retry_transient(fn, what="f", sleep=sleeps.append) == "ok"
    assert sleeps == [1.0, 2.0, 1.0, 2.0]
    with pytest.raises(RuntimeError):
        retry_transient(Flaky(1, RuntimeError("boom")), what="f", sleep=sleeps.append)
    assert len(sleeps) == 4


def test_one_backoff_schedule_for_the_loop_and_the_tasks() -> None:
    """The worker's countdowns come from the same Backoff as the in-process loop: doubling from
    2 s, capped at 120 s, up to 25% jitter, 8 retries."""
    assert [TASK_BACKOFF.delay(n, rand=lambda: 0.0) for n in range(8)] == [
        2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 120.0, 120.0
    ]  # fmt: skip
    assert TASK_BACKOFF.delay(0, rand=lambda: 1.0) == 2.5
    assert TASK_BACKOFF.may_retry(7) and not TASK_BACKOFF.may_retry(8)
    assert [INLINE_BACKOFF.delay(n) for n in range(6)] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert INLINE_BACKOFF.may_retry(100, waited_s=89.0) and not INLINE_BACKOFF.may_retry(0, 90.0)

    sleeps: list[float] = []
    three = Backoff(first_s=0.5, cap_s=10.0, factor=3.0, max_retries=3)
    with pytest.raises(ServiceUnavailable):
        retry_transient(
            Flaky(10, ServiceUnavailable("down")), what="f", backoff=three, sleep=sleeps.append
        )
    assert sleeps == [0.5, 1.5, 4.5]
