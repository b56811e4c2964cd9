"""Which job items a live process holds, and getting back the work of one that died.

A worker killed as a whole (main process and pool) acknowledges nothing and cleans up nothing:
its message stays with Redis until the visibility timeout (6 h) and its items stay
``attributing``. So the work is not left to the broker: the process that takes items records
itself as their holder and a :class:`Heartbeat` thread refreshes them every
``heartbeat_interval_s`` while it works. Items whose holder has not beaten for ``stale_after_s``
are stale, and :func:`reap` sends them again (safe: every step is idempotent, and a prompt that
is stored is never stored twice). Every worker runs a :class:`Reaper` thread (at start-up, then
every heartbeat interval) and ``--wait`` reaps its own job, so the work comes back within
minutes with nobody watching. An inline batch holds its items too: when it is killed they show
as stale in ``atlas jobs status`` and ``atlas jobs retry`` runs them again.

Nothing here imports Celery or click: the sender of re-sent items is passed in.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from atlas.store.jobs import JobStore

if TYPE_CHECKING:
    from atlas.pipeline.payloads import AttributePayload
    from atlas.settings import AtlasSettings

log = logging.getLogger(__name__)

#: Sends attribute payloads (to the broker); raises when it cannot.
Sender = Callable[[Sequence["AttributePayload"]], None]


def holder_id(kind: str = "worker") -> str:
    """This process as a holder of job items: ``host:pid`` (``inline:host:pid`` for a batch run
    in the CLI). Taken per call, so a forked pool process gets its own."""
    base = f"{socket.gethostname()}:{os.getpid()}"
    return base if kind == "worker" else f"{kind}:{base}"


class Heartbeat:
    """A daemon thread that refreshes the heartbeat of the items ``holder`` holds, every
    ``interval_s`` while the ``with`` block runs (a Neo4j blip only skips a beat)."""

    def __init__(self, store: JobStore, holder: str, interval_s: float) -> None:
        self.store = store
        self.holder = holder
        self.interval_s = interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.store.beat(self.holder)
            except Exception as exc:  # the next beat may get through
                log.debug("heartbeat of %s failed: %s", self.holder, exc)

    def __enter__(self) -> Heartbeat:
        self._thread = threading.Thread(
            target=self._loop, name=f"heartbeat-{self.holder}", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5.0)


def heartbeat(store: JobStore, holder: str | None, settings: AtlasSettings) -> Any:
    """A :class:`Heartbeat` for ``holder`` at the settings' interval (nothing without one)."""
    import contextlib

    if holder is None:
        return contextlib.nullcontext()
    return Heartbeat(store, holder, settings.heartbeat_interval_s)


def reap(
    store: JobStore,
    settings: AtlasSettings,
    send: Sender,
    *,
    job_id: str | None = None,
    holder: str | None = None,
) -> int:
    """Send again the stale items of Celery jobs (all jobs, or ``job_id``'s); returns how many.

    The items are taken over first (one statement, so two reapers never send the same item) and
    released once sent; if the send fails they stay held by this reaper, whose heartbeat stops
    with it, so they are found again later.
    """
    from atlas.pipeline.payloads import AttributePayload, PromptSpec

    me = holder or holder_id("reaper")
    taken = store.reap(me, settings.stale_after_s, job_id=job_id)
    if not taken:
        return 0
    by_job: dict[str, list[AttributePayload]] = {}
    interventions: dict[str, list[dict[str, Any]]] = {}
    for jid, idx, spec in taken:
        if "edits" in spec:  # an intervention job's item (InterventionSpec always has edits)
            interventions.setdefault(jid, []).append({"spec": spec, "job_id": jid, "item": idx})
            continue
        payload = AttributePayload(spec=PromptSpec.model_validate(spec), job_id=jid, item=idx)
        by_job.setdefault(jid, []).append(payload)
    for jid, raw in interventions.items():
        from workers.app import send_interventions

        send_interventions(settings, raw)
        store.release(jid, [r["item"] for r in raw], me)
    for jid, payloads in by_job.items():
        send(payloads)
        store.release(jid, [p.item for p in payloads if p.item is not None], me)
        log.warning(
            "job %s: re-sent %d items whose worker stopped beating (over %.0f s)",
            jid,
            len(payloads),
            settings.stale_after_s,
        )
    return len(taken)


class Reaper:
    """A worker's daemon thread that reaps lost items at start-up and every heartbeat interval.

    ``connect`` opens this thread's own Neo4j driver (retried on the next round when Neo4j is
    down), ``send`` sends re-sent payloads to the broker.
    """

    def __init__(self, settings: AtlasSettings, connect: Callable[[], Any], send: Sender) -> None:
        self.settings = settings
        self.connect = connect
        self.send = send
        self.holder = holder_id("reaper")
        self._stop = threading.Event()
        self._driver: Any = None
        self.thread = threading.Thread(target=self._loop, name="atlas-reaper", daemon=True)

    def start(self) -> Reaper:
        self.thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self.thread.join(timeout=timeout_s)

    def run_once(self) -> int:
        """One round: reap every Celery job's stale items."""
        if self._driver is None:
            self._driver = self.connect()
        store = JobStore(self._driver, self.settings.neo4j_database)
        return reap(store, self.settings, self.send, holder=self.holder)

    def _loop(self) -> None:
        while True:
            try:
                self.run_once()
            except Exception as exc:  # Neo4j or Redis away: the next round tries again
                log.warning("reaper: %s", " ".join(str(exc).split())[:300])
                self._close()
            if self._stop.wait(self.settings.heartbeat_interval_s):
                break
        self._close()

    def _close(self) -> None:
        if self._driver is not None:
            try:
                self._driver.close()
            except Exception:
                log.debug("closing the reaper's driver failed", exc_info=True)
            self._driver = None


def pause_for_tests(settings: AtlasSettings, deadline_s: float = 600.0) -> None:
    """The tests' hook (``atlas_test_pause_dir``): while ``{dir}/pause`` exists, say that a
    chunk is held (``{dir}/held-{pid}``) and wait, so a test can kill this process at a known
    point. Bounded, so a forgotten file cannot hang a worker for ever."""
    directory = settings.atlas_test_pause_dir
    if directory is None or not (Path(directory) / "pause").exists():
        return
    Path(directory, f"held-{os.getpid()}").write_text(str(time.time()))
    deadline = time.monotonic() + deadline_s
    while (Path(directory) / "pause").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
