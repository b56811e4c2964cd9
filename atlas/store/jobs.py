"""Job records: what a batch asked for and where each prompt stands.

Where they live: in Neo4j, next to the atlas, in the same database (``settings.neo4j_database``:
the ingestion marks items ``done`` inside its own transaction there), as ``(:Job)`` and
``(:JobItem)`` nodes; the Cypher is the "jobs" section of :mod:`atlas.store.queries`, the
constraints and indexes are ``schema/0006_jobs.cypher``. Redis only carries the messages, so job state
survives a Redis restart or loss, every worker reports to the same place wherever it runs, and
the inline mode (no Redis at all) keeps the same records. The atlas itself stays the source of
truth for "done": a prompt whose id is a complete ``(:Prompt)`` is never computed again unless
forced, whatever the job records say.

Item states::

    queued -> attributing -> done          (``attributing`` lasts until the prompt is ingested)
                    \\-------> failed      (permanent; ``reason`` says why)

``done`` is final: a redelivered message that runs again cannot move an item back. Workers write
two records per prompt and neither costs an extra round trip: the start of an attribution shares
one statement with the "already in the atlas?" check (:meth:`JobStore.start_many`, one per
attribute chunk), and ``done`` is
written in the ingestion's own transaction (:meth:`JobStore.mark_tx`), so an item is done exactly
when its prompt is complete in the atlas.

Holders and heartbeats: the process working on an item (a worker's pool process, an inline
batch) is its holder (``worker``), and refreshes ``heartbeat_at`` while it works (see
:mod:`atlas.pipeline.liveness`). An active item whose holder's heartbeat is older than
``stale_after_s`` is *stale*: its holder died (SIGKILL, a lost machine). Stale items of Celery jobs
are sent again by every worker's reaper and by ``--wait``; ``atlas jobs status`` counts them and
``atlas jobs retry`` sends them. Items on the ingest queue have no holder until an ingest worker
takes them, so a backlog is never taken for a loss.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from atlas.errors import InputError
from atlas.store import queries as q

log = logging.getLogger(__name__)

ItemState = Literal["queued", "attributing", "done", "failed"]
ACTIVE_STATES: tuple[str, ...] = ("queued", "attributing")


class JobItem(BaseModel):
    """One prompt spec of a job, as recorded."""

    model_config = ConfigDict(extra="forbid")

    idx: int
    spec: dict[str, Any]
    spec_id: str
    state: ItemState
    prompt_id: str | None = None
    outcome: str | None = None
    reason: str | None = None
    attempts: int = 0
    timings: dict[str, float] = Field(default_factory=dict)
    updated_at: float | None = None
    worker: str | None = None
    """The process holding the item (``host:pid``, ``inline:host:pid``), if any."""
    heartbeat_at: float | None = None
    """When its holder last said it was alive."""
    stale: bool = False
    """Held by a holder whose heartbeat stopped (see the module docstring)."""


class JobSummary(BaseModel):
    """Counts of a job's items by state."""

    model_config = ConfigDict(extra="forbid")

    job_id: str
    created_at: float | None = None
    source: str | None = None
    mode: str | None = None
    n_items: int = 0
    done: int = 0
    failed: int = 0
    queued: int = 0
    running: int = 0
    stale: int = 0
    """Active items whose holder is gone (counted in ``queued`` / ``running`` too)."""

    @property
    def remaining(self) -> int:
        return max(0, self.n_items - self.done - self.failed)

    @property
    def finished(self) -> bool:
        return self.remaining == 0


#: Outcome of an item that was never a prompt spec (a bad line of a batch file): it cannot be
#: retried, only fixed in the file.
INVALID = "invalid"


def _keys(job_id: str, idxs: Iterable[int]) -> list[str]:
    return [f"{job_id}/{i}" for i in idxs]


def new_job_id() -> str:
    """A fresh job id: sortable by time, unique by a random tail."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + uuid.uuid4().hex[:6]


def _run(driver: Any, database: str, query: str, **params: Any) -> list[dict[str, Any]]:
    """Run one query in a managed write transaction in ``database`` (retried on transient errors
    by the driver); driver errors become the project's one-line errors."""
    import neo4j.exceptions as nex

    def work(tx: Any) -> list[dict[str, Any]]:
        return [record.data() for record in tx.run(query, **params)]

    try:
        with driver.session(database=database, notifications_min_severity="OFF") as session:
            result: list[dict[str, Any]] = session.execute_write(work)
            return result
    except (nex.Neo4jError, nex.DriverError) as exc:
        raise _translated(exc, f"job records in database {database!r}") from exc


def _translated(exc: Exception, what: str) -> Exception:
    """The store's translation, squeezed to one line (server messages can span several)."""
    from atlas.store.connection import translate_neo4j_error

    error = translate_neo4j_error(exc, what)
    error.args = (" ".join(str(error).split()),)
    return error


def _mark_params(
    job_id: str,
    item: int,
    state: str,
    prompt_id: str | None,
    outcome: str | None,
    reason: str | None,
    timings: dict[str, float] | None,
    attempt: bool,
) -> dict[str, Any]:
    return {
        "key": f"{job_id}/{item}",
        "state": state,
        "prompt_id": prompt_id,
        "outcome": outcome,
        "reason": reason,
        "timings": json.dumps({k: round(v, 6) for k, v in timings.items()}) if timings else None,
        "attempt": attempt,
        "now": time.time(),
    }


JOB_SCHEMA_FILES = ("0006_jobs.cypher", "0007_job_holders.cypher")


def job_schema_file(schema_dir: Path | None = None) -> Path:
    """``schema/0006_jobs.cypher``: the job records' constraints and indexes."""
    return job_schema_files(schema_dir)[0]


def job_schema_files(schema_dir: Path | None = None) -> list[Path]:
    """The job records' schema files: records (0006) and their holders (0007)."""
    from atlas.store.schema import default_schema_dir

    return [(schema_dir or default_schema_dir()) / name for name in JOB_SCHEMA_FILES]


def ensure_job_schema(driver: Any, database: str) -> None:
    """Create the job constraints and indexes (idempotent): the statements of the job schema
    files, for commands that read job records without applying the whole schema."""
    from atlas.store.schema import split_statements

    for path in job_schema_files():
        for statement in split_statements(path.read_text()):
            _run(driver, database, statement)


def prompts_present(driver: Any, database: str, prompt_ids: Sequence[str]) -> set[str]:
    """The subset of ``prompt_ids`` that are complete prompts in the atlas."""
    if not prompt_ids:
        return set()
    rows = _run(driver, database, q.PROMPTS_PRESENT, prompt_ids=list(prompt_ids))
    return {r["prompt_id"] for r in rows}


class JobStore:
    """Reads and writes job records through a Neo4j driver (passed in, never global) in one
    database (the atlas's: ``settings.neo4j_database``). ``stale_after_s`` (the setting) makes
    summaries and items say which active items have lost their holder."""

    def __init__(self, driver: Any, database: str, stale_after_s: float | None = None) -> None:
        self.driver = driver
        self.database = database
        self.stale_after_s = stale_after_s

    def _run(self, query: str, **params: Any) -> list[dict[str, Any]]:
        return _run(self.driver, self.database, query, **params)

    # ------------------------------------------------------------------ writes
    def create(
        self,
        job_id: str,
        specs: Sequence[dict[str, Any]],
        spec_ids: Sequence[str],
        *,
        source: str,
        mode: str,
        already_done: dict[int, str] | None = None,
        failed: dict[int, str] | None = None,
    ) -> None:
        """Record a job and its items; items in ``already_done`` (idx -> prompt id) start done,
        items in ``failed`` (idx -> reason: a bad line of a batch file) start failed."""
        already_done = already_done or {}
        failed = failed or {}
        now = time.time()
        self._run(
            q.JOB_CREATE,
            job_id=job_id,
            now=now,
            source=source,
            n_items=len(specs),
            mode=mode,
        )
        rows = []
        for idx, (spec, sid) in enumerate(zip(specs, spec_ids, strict=True)):
            done = already_done.get(idx)
            reason = failed.get(idx)
            state = "done" if done else "failed" if reason else "queued"
            rows.append(
                {
                    "idx": idx,
                    "spec": json.dumps(spec, sort_keys=True),
                    "spec_id": sid,
                    "state": state,
                    "prompt_id": done,
                    "outcome": "present" if done else INVALID if reason else None,
                    "reason": reason,
                }
            )
        for start in range(0, len(rows), 5000):
            self._run(
                q.JOB_ADD_ITEMS,
                job_id=job_id,
                rows=rows[start : start + 5000],
                now=now,
            )

    def mark(
        self,
        job_id: str,
        item: int,
        *,
        state: ItemState,
        prompt_id: str | None = None,
        outcome: str | None = None,
        reason: str | None = None,
        timings: dict[str, float] | None = None,
        attempt: bool = False,
    ) -> None:
        """Move one item to ``state`` (``done`` is final; see the module docstring)."""
        self._run(
            q.JOB_MARK_ITEM,
            **_mark_params(job_id, item, state, prompt_id, outcome, reason, timings, attempt),
        )

    @staticmethod
    def mark_tx(
        tx: Any,
        job_id: str,
        item: int,
        *,
        state: ItemState,
        prompt_id: str | None = None,
        outcome: str | None = None,
        timings: dict[str, float] | None = None,
    ) -> None:
        """:meth:`mark` inside a caller's transaction (the ingestion's, for ``done``)."""
        params = _mark_params(job_id, item, state, prompt_id, outcome, None, timings, False)
        tx.run(q.JOB_MARK_ITEM, **params).consume()

    def start_many(
        self,
        items: Sequence[tuple[str | None, int | None, str, bool]],
        holder: str | None = None,
    ) -> list[bool]:
        """For each ``(job id, item, prompt id, force)``: whether the prompt is complete in the
        atlas. Records the items' start in the same statement: ``attributing`` held by
        ``holder``, or ``done`` with outcome ``present`` when there is nothing to do (one round
        trip for a whole chunk)."""
        if not items:
            return []
        rows = [
            {
                "n": n,
                "key": f"{job_id}/{item}" if job_id is not None and item is not None else None,
                "prompt_id": prompt_id,
                "force": force,
            }
            for n, (job_id, item, prompt_id, force) in enumerate(items)
        ]
        out = self._run(q.JOB_CLAIM_ITEMS, rows=rows, now=time.time(), holder=holder)
        return [bool(r["present"]) for r in sorted(out, key=lambda r: r["n"])]

    # ------------------------------------------------------------------ holders
    def hold(self, job_id: str, idxs: Iterable[int], holder: str) -> None:
        """``holder`` takes these active items (and beats for them from now on)."""
        self._run(q.JOB_HOLD_ITEMS, keys=_keys(job_id, idxs), holder=holder, now=time.time())

    def release(self, job_id: str, idxs: Iterable[int], holder: str) -> None:
        """``holder`` hands these items on (to the ingest queue): they are held by nobody."""
        self._run(q.JOB_RELEASE_ITEMS, keys=_keys(job_id, idxs), holder=holder)

    def beat(self, holder: str) -> int:
        """The heartbeat of every active item ``holder`` holds; returns how many."""
        rows = self._run(q.JOB_HEARTBEAT, holder=holder, now=time.time())
        return int(rows[0]["n"]) if rows else 0

    def stale_held(self, job_id: str, stale_s: float | None = None) -> list[int]:
        """Indexes of the job's active items whose holder's heartbeat is older than ``stale_s``
        (default: this store's ``stale_after_s``; none without either)."""
        stale_s = self.stale_after_s if stale_s is None else stale_s
        if stale_s is None:
            return []
        rows = self._run(q.JOB_STALE_HELD, job_id=job_id, before=time.time() - stale_s)
        return [int(r["idx"]) for r in rows]

    def reap(
        self, holder: str, stale_s: float, *, job_id: str | None = None, limit: int = 1000
    ) -> list[tuple[str, int, dict[str, Any]]]:
        """Take over the stale items of Celery jobs (all, or ``job_id``'s) for ``holder``, who
        sends them again: ``(job id, idx, spec)`` of each. Two reapers never take the same item;
        one that dies before sending leaves them stale again (see ``JOB_REAP_STALE``)."""
        rows = self._run(
            q.JOB_REAP_STALE,
            holder=holder,
            before=time.time() - stale_s,
            now=time.time(),
            job_id=job_id,
            limit=limit,
        )
        return [(r["job_id"], int(r["idx"]), json.loads(r["spec"] or "{}")) for r in rows]

    def requeue(self, job_id: str, idxs: Iterable[int]) -> None:
        """Items about to be sent again: ``queued``, held by nobody (``done`` stays done)."""
        self._run(q.JOB_REQUEUE_ITEMS, keys=_keys(job_id, idxs), now=time.time())

    def fail_many(self, job_id: str, idxs: Iterable[int], reason: str) -> None:
        """Mark items failed with one reason (a send that did not reach the broker)."""
        self._run(q.JOB_FAIL_ITEMS, keys=_keys(job_id, idxs), reason=reason, now=time.time())

    # ------------------------------------------------------------------ reads
    def summary(self, job_id: str) -> JobSummary:
        """Counts by state. Raises :class:`InputError` for an unknown job."""
        rows = self._run(q.JOB_GET, job_id=job_id)
        if not rows:
            raise InputError(f"no job {job_id!r} (see `atlas jobs list`)")
        head = rows[0]
        counts = {r["state"]: r["n"] for r in self._run(q.JOB_STATE_COUNTS, job_id=job_id)}
        return JobSummary(
            job_id=job_id,
            created_at=head["created_at"],
            source=head["source"],
            mode=head["mode"],
            n_items=head["n_items"] or 0,
            done=counts.get("done", 0),
            failed=counts.get("failed", 0),
            queued=counts.get("queued", 0),
            running=counts.get("attributing", 0),
            stale=len(self.stale_held(job_id)),
        )

    def items(self, job_id: str, states: Iterable[str] | None = None) -> list[JobItem]:
        """The items of a job (optionally only those in ``states``), in index order."""
        rows = self._run(
            q.JOB_ITEMS,
            job_id=job_id,
            states=list(states) if states is not None else None,
        )
        holders = {r["idx"]: r for r in self._run(q.JOB_HOLDERS, job_id=job_id)}
        stale = set(self.stale_held(job_id))
        out = []
        for r in rows:
            r = dict(r)
            r["spec"] = json.loads(r["spec"]) if r["spec"] else {}
            r["timings"] = json.loads(r["timings"]) if r["timings"] else {}
            r["attempts"] = r["attempts"] or 0
            held = holders.get(r["idx"], {})
            r["worker"] = held.get("worker")
            r["heartbeat_at"] = held.get("heartbeat_at")
            r["stale"] = r["idx"] in stale
            out.append(JobItem.model_validate(r))
        return out

    def recent(self, limit: int = 20) -> list[JobSummary]:
        """The most recent jobs with done / failed counts."""
        rows = self._run(q.JOB_LIST, limit=limit)
        return [
            JobSummary(
                job_id=r["id"],
                created_at=r["created_at"],
                source=r["source"],
                mode=r["mode"],
                n_items=r["n_items"] or 0,
                done=r["done"],
                failed=r["failed"],
            )
            for r in rows
        ]

    def done_specs(self, spec_ids: Sequence[str]) -> dict[str, list[str]]:
        """spec id -> prompt ids produced by earlier finished items with that spec id."""
        if not spec_ids:
            return {}
        rows = self._run(q.JOB_DONE_SPECS, spec_ids=list(set(spec_ids)))
        return {r["spec_id"]: r["prompt_ids"] for r in rows}

    def stale_items(self, job_id: str, stale_s: float) -> list[JobItem]:
        """Active items that nothing has touched for ``stale_s`` seconds."""
        rows = self._run(q.JOB_STALE_ITEMS, job_id=job_id, before=time.time() - stale_s)
        return [i for i in self.items(job_id, ACTIVE_STATES) if i.idx in {r["idx"] for r in rows}]


def skip_done(store: JobStore, spec_ids: Sequence[str]) -> dict[int, str]:
    """Items (by index) whose spec already produced a prompt that is still in the atlas.

    This is the CLI's cheap check when a batch file is re-run; the workers check again by
    prompt id (the authoritative identity) before computing anything.
    """
    done = store.done_specs(spec_ids)
    candidates = {pid for pids in done.values() for pid in pids}
    present = prompts_present(store.driver, store.database, sorted(candidates))
    out: dict[int, str] = {}
    for idx, sid in enumerate(spec_ids):
        for pid in done.get(sid, []):
            if pid in present:
                out[idx] = pid
                break
    return out
