"""The bodies of the pipeline's tasks, as plain functions.

``workers.tasks`` wraps these in Celery tasks; ``atlas enqueue`` / ``atlas batch`` call them inline
when no broker is configured (:func:`run_inline`). Both run the same code, so the inline mode is a
faithful stand-in for the distributed one. Nothing here imports Celery or click.

Steps, each idempotent (at-least-once delivery may run any of them twice):

``attribute_chunk_step`` (``attribute_step`` for one spec)
    prompt spec -> the prompt checked against the tokenizer (before any weights load) -> prompt id
    (computed from the spec, the model revision and the transcoder content hash BEFORE the model
    runs) -> skip if the prompt is already in the atlas (unless forced) -> reuse the
    content-addressed artifact if it loads (a corrupt one is moved aside and recomputed) -> else
    attribution -> artifact.
``ingest_chunk_step``
    artifacts -> Neo4j in one transaction (the store's idempotent ingestion), each job item marked
    done inside it.
``annotate_step``
    feature labels for one transcoder set (the store's annotation code).

Models and transcoders come from an :class:`atlas.engine.EngineCache` (the process's
:data:`atlas.engine.PROCESS_ENGINES` unless one is passed), filled lazily by the first task.

The process that runs a step is the holder of its job items (``holder``, see
:mod:`atlas.pipeline.liveness`): the attribute step's claim records it, an attribute step that
hands its artifacts to the ingest queue releases them, and the ingest step takes them.

Errors are sorted by :func:`atlas.retry.classify`: transient faults (Neo4j/Redis unavailable) are retried
with backoff by the caller, permanent ones (bad prompt, missing model, out of memory at batch size
1) are recorded on the job item with their reason and never retried.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from atlas.engine import (
    PROCESS_ENGINES,
    Engine,
    EngineCache,
    attribute_with_halving,
    check_prompt,
    resolve_refs,
)
from atlas.errors import AtlasError, InputError, ServiceUnavailable
from atlas.pipeline.images import load_spec_image
from atlas.pipeline.liveness import pause_for_tests
from atlas.pipeline.payloads import (
    AnnotatePayload,
    AttributeChunk,
    AttributePayload,
    IngestChunk,
    IngestPayload,
    PromptSpec,
    StepResult,
)
from atlas.retry import classify, retry_transient
from atlas.store.jobs import JobStore

if TYPE_CHECKING:
    from atlas.graph import Graph
    from atlas.settings import AtlasSettings
    from atlas.store.ingest import InTransaction, PromptRows

log = logging.getLogger(__name__)


def prompt_id_for(spec: PromptSpec, engine: Engine, settings: AtlasSettings) -> str:
    """The prompt's content hash, computed before anything runs on the model: the metadata the
    engine will record, less what only the run knows (an image prompt: its image's hash)."""
    from atlas.graph import GraphMetadata
    from atlas.pipeline.images import image_sha

    meta = GraphMetadata(
        prompt=spec.prompt,
        image_sha256=image_sha(spec),
        tokens=[],
        model=engine.model_info,
        transcoders=engine.transcoder_info,
        settings=spec.recorded_settings(settings.dtype),
    )
    return meta.prompt_id()


def _jobs(driver: Any, settings: AtlasSettings) -> JobStore:
    return JobStore(driver, settings.neo4j_database)


# --------------------------------------------------------------------------- store adapters
def _delete_prompt(driver: Any, prompt_id: str, settings: AtlasSettings) -> None:
    """Remove a stored prompt before a forced re-ingestion (with its share of the aggregates)."""
    from atlas.store.ingest import delete_prompt

    if delete_prompt(driver, prompt_id, database=settings.neo4j_database):
        log.info("forced re-ingestion: removed the stored prompt %s first", prompt_id)


# --------------------------------------------------------------------------- steps
def attribute_step(
    payload: AttributePayload,
    settings: AtlasSettings,
    *,
    driver: Any,
    engines: EngineCache | None = None,
    on_ingest: Callable[[IngestChunk], None] | None = None,
    holder: str | None = None,
) -> StepResult:
    """:func:`attribute_chunk_step` for one spec."""
    chunk = AttributeChunk(items=[payload])
    return attribute_chunk_step(
        chunk, settings, driver=driver, engines=engines, on_ingest=on_ingest, holder=holder
    )[0]


@dataclass
class _Prepared:
    index: int
    payload: AttributePayload
    engine: Engine
    prompt_id: str
    path: Path
    timings: dict[str, float]


def attribute_chunk_step(
    chunk: AttributeChunk,
    settings: AtlasSettings,
    *,
    driver: Any,
    engines: EngineCache | None = None,
    on_ingest: Callable[[IngestChunk], None] | None = None,
    holder: str | None = None,
) -> list[StepResult]:
    """Attribute a chunk of prompt specs (idempotent) and hand their artifacts to ingestion.

    One round trip to Neo4j for the whole chunk says which prompts are already in the atlas and
    records the others' start; those are attributed one after the other (or taken from the
    artifact store) and sent on as one ingest message (``on_ingest``; ``None`` ingests inline).

    A permanent failure of one spec (bad prompt, unknown model, out of memory at batch size 1)
    is recorded on its job item and the rest of the chunk goes on. A transient fault (Neo4j or
    Redis unavailable) raises, so that the caller retries the whole chunk, which is safe: done
    prompts are skipped and computed artifacts reused.

    ``holder`` (this process, :func:`atlas.pipeline.liveness.holder_id`) is recorded on the
    claimed items; the caller keeps them alive with a heartbeat while this runs.
    """
    results: list[StepResult | None] = [None] * len(chunk.items)

    def fail(i: int, p: AttributePayload, exc: BaseException) -> None:
        transient, reason = classify(exc)
        if transient:
            raise exc
        record_failure(driver, settings, p.job_id, p.item, reason)
        results[i] = StepResult(outcome="failed", reason=reason)

    prepared: list[_Prepared] = []
    for i, p in enumerate(chunk.items):
        try:
            prepared.append(_prepare(i, p, settings, engines or PROCESS_ENGINES))
        except Exception as exc:
            fail(i, p, exc)
    present = _claim(prepared, settings, driver=driver, holder=holder)
    pause_for_tests(settings)

    ingests: list[IngestPayload] = []
    sent: list[int] = []  # chunk index of each ingest payload
    for x, is_present in zip(prepared, present, strict=True):
        spec, timings = x.payload.spec, x.timings
        if is_present and not spec.force:
            log.info("prompt %s already in the atlas: skipped", x.prompt_id)
            results[x.index] = StepResult(
                outcome="present", prompt_id=x.prompt_id, artifact=str(x.path), timings=timings
            )
            continue
        outcome: Literal["computed", "cached"] = "cached"
        if spec.force or not _reusable_artifact(x, settings):
            outcome = "computed"
            try:
                graph = attribute_with_halving(
                    x.engine,
                    spec.prompt,
                    spec.attribution,
                    batch_size=settings.batch_size,
                    timings=timings,
                    image=load_spec_image(spec, settings),
                )
            except Exception as exc:
                fail(x.index, x.payload, exc)
                continue
            _save(graph, x)
        timings["handed_off_at"] = time.time()
        ingests.append(_ingest_payload(x, outcome))
        sent.append(x.index)
        results[x.index] = StepResult(
            outcome=outcome, prompt_id=x.prompt_id, artifact=str(x.path), timings=timings
        )

    if ingests:
        _hand_off(ingests, sent, results, settings, driver=driver, on_ingest=on_ingest)
        if on_ingest is not None and holder is not None:
            _release(ingests, settings, driver=driver, holder=holder)
    return [r if r is not None else StepResult(outcome="failed", reason="not run") for r in results]


def _prepare(
    index: int, payload: AttributePayload, settings: AtlasSettings, engines: EngineCache
) -> _Prepared:
    """The engine, prompt id and artifact path of one spec (loading the engine on first use)."""
    from atlas.graph import artifact_path

    timings: dict[str, float] = {"started_at": time.time()}
    if payload.enqueued_at is not None:
        timings["queue_s"] = max(0.0, timings["started_at"] - payload.enqueued_at)
    t0 = time.perf_counter()
    model_ref, tc_ref = resolve_refs(payload.spec.model, payload.spec.transcoders, settings)
    check_prompt(payload.spec.prompt, model_ref)
    engine = engines.get(model_ref, tc_ref, settings)
    timings["load_s"] = time.perf_counter() - t0
    pid = prompt_id_for(payload.spec, engine, settings)
    path = artifact_path(settings.resolved_artifact_dir, pid)
    return _Prepared(index, payload, engine, pid, path, timings)


def _claim(
    prepared: list[_Prepared], settings: AtlasSettings, *, driver: Any, holder: str | None
) -> list[bool]:
    """One round trip for the chunk: which prompts are in the atlas, and the others' start
    (held by ``holder``)."""
    t_rec = time.perf_counter()
    present = _jobs(driver, settings).start_many(
        [(x.payload.job_id, x.payload.item, x.prompt_id, x.payload.spec.force) for x in prepared],
        holder=holder,
    )
    records_s = (time.perf_counter() - t_rec) / max(1, len(prepared))
    for x in prepared:
        x.timings["records_s"] = records_s
    return present


def _by_job(payloads: Sequence[IngestPayload]) -> dict[str, list[int]]:
    """Item indexes of the payloads that belong to a job, per job."""
    out: dict[str, list[int]] = {}
    for p in payloads:
        if p.job_id is not None and p.item is not None:
            out.setdefault(p.job_id, []).append(p.item)
    return out


def _release(
    ingests: Sequence[IngestPayload], settings: AtlasSettings, *, driver: Any, holder: str
) -> None:
    """The items are on the ingest queue now: this process no longer holds them (so a backlog
    there is not taken for a lost worker). Best effort: an item left held goes stale and is
    re-sent, which is safe."""
    try:
        for job_id, idxs in _by_job(ingests).items():
            _jobs(driver, settings).release(job_id, idxs, holder)
    except Exception as exc:
        log.warning("could not release the items handed to ingestion: %s", classify(exc)[1])


def _hold(chunk: IngestChunk, settings: AtlasSettings, *, driver: Any, holder: str | None) -> None:
    """An ingest step takes its items (its heartbeat keeps them alive while it writes)."""
    if holder is None:
        return
    for job_id, idxs in _by_job(chunk.items).items():
        _jobs(driver, settings).hold(job_id, idxs, holder)


def quarantine(path: Path, settings: AtlasSettings) -> Path | None:
    """Move an unusable artifact out of the artifact store's way (into ``quarantine/`` there, so
    it can still be looked at); None if it could not be moved (then it is overwritten)."""
    target = settings.resolved_artifact_dir / "quarantine" / f"{path.name}.{int(time.time())}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        path.replace(target)
    except OSError as exc:
        log.debug("could not move %s aside: %s", path, exc)
        return None
    return target


def _reusable_artifact(x: _Prepared, settings: AtlasSettings) -> bool:
    """Whether the prompt's cached artifact can be reused: it exists, loads, and is this
    prompt's graph. A corrupt one (truncated, garbled, another prompt's) is moved aside with one
    warning, so that the prompt is recomputed instead of failing on every run."""
    from atlas.graph import Graph

    if not x.path.is_file():
        return False
    try:
        graph = Graph.load(x.path)
    except InputError as exc:
        problem = " ".join(str(exc).split())[:300]
    else:
        if graph.prompt_id == x.prompt_id:
            return True
        problem = f"it holds prompt {graph.prompt_id}"
    moved = quarantine(x.path, settings)
    where = f"moved to {moved}" if moved else "overwriting it"
    log.warning("cached artifact %s is unusable (%s): %s, recomputing", x.path, problem, where)
    return False


def _save(graph: Graph, x: _Prepared) -> None:
    if graph.prompt_id != x.prompt_id:
        log.warning("engine recorded prompt id %s, expected %s", graph.prompt_id, x.prompt_id)
    t1 = time.perf_counter()
    graph.save(x.path)
    x.timings["save_s"] = time.perf_counter() - t1


def _ingest_payload(x: _Prepared, outcome: Literal["computed", "cached"]) -> IngestPayload:
    return IngestPayload(
        prompt_id=x.prompt_id,
        artifact=str(x.path),
        job_id=x.payload.job_id,
        item=x.payload.item,
        force=x.payload.spec.force,
        attribution=outcome,
        timings=x.timings,
        image_tags=list(x.payload.spec.tags or []),
    )


def _hand_off(
    ingests: list[IngestPayload],
    sent: list[int],
    results: list[StepResult | None],
    settings: AtlasSettings,
    *,
    driver: Any,
    on_ingest: Callable[[IngestChunk], None] | None,
) -> None:
    """Send the chunk's artifacts on as one ingest message, or ingest them here (``on_ingest``
    None), recording an ingestion failure as the item's result."""
    now = time.time()
    for ing in ingests:
        ing.enqueued_at = now
    if on_ingest is not None:
        on_ingest(IngestChunk(items=ingests))
        return
    stored = ingest_chunk_step(IngestChunk(items=ingests), settings, driver=driver)
    for i, res in zip(sent, stored, strict=True):
        if res.outcome == "failed":
            results[i] = res


def _load_for_ingest(
    payload: IngestPayload, settings: AtlasSettings, *, driver: Any
) -> tuple[PromptRows, dict[str, float]]:
    """An artifact's ingestion rows and its timings so far (a forced prompt is removed first)."""
    from atlas.store.ingest import graph_rows

    timings = dict(payload.timings)
    if payload.enqueued_at is not None:
        timings["ingest_queue_s"] = max(0.0, time.time() - payload.enqueued_at)
    t0 = time.perf_counter()
    graph = _load_artifact(payload, settings)
    rows = graph_rows(
        graph,
        min_abs_weight=settings.ingest_min_abs_weight,
        max_edges=settings.ingest_max_edges,
        image_tags=payload.image_tags,
    )
    timings["load_artifact_s"] = time.perf_counter() - t0
    if payload.force:
        _delete_prompt(driver, payload.prompt_id, settings)
    return rows, timings


def _load_artifact(payload: IngestPayload, settings: AtlasSettings) -> Graph:
    """The artifact to ingest. One that cannot be read is moved aside (when it is in the
    artifact store), so that a retry of the item recomputes it rather than failing again."""
    from atlas.graph import Graph

    try:
        return Graph.load(payload.artifact)
    except InputError as exc:
        path = Path(payload.artifact)
        store = settings.resolved_artifact_dir.resolve()
        if path.is_file() and path.resolve().is_relative_to(store):
            moved = quarantine(path, settings)
            if moved is not None:
                note = f"moved to {moved}; `atlas jobs retry` recomputes it"
                raise InputError(f"{' '.join(str(exc).split())[:300]} ({note})") from exc
        raise


def _mark_done_hook(
    payload: IngestPayload, timings: dict[str, float], clock: list[float]
) -> InTransaction | None:
    """The job item's ``done``, written inside the ingestion's transaction: an item is done
    exactly when its prompt is stored. ``clock[0]`` is when this prompt's writing began (the
    previous prompt's end, in a chunk); its ``ingest_s`` is the time since."""

    job_id, item = payload.job_id, payload.item
    if job_id is None or item is None:
        return None

    def mark_done(tx: Any, created: bool) -> None:
        now = time.perf_counter()
        timings["ingest_s"] = now - clock[0]
        clock[0] = now
        JobStore.mark_tx(
            tx,
            job_id,
            item,
            state="done",
            prompt_id=payload.prompt_id,
            outcome=payload.attribution if created else "present",
            timings=timings,
        )

    return mark_done


def _store_many(
    driver: Any, batch: list[tuple[PromptRows, InTransaction | None]], settings: AtlasSettings
) -> list[bool]:
    """Ingest prompts in one transaction; driver faults become :class:`ServiceUnavailable`."""
    from atlas.store.ingest import ingest_many

    try:
        results = ingest_many(
            driver, batch, database=settings.neo4j_database, batch_size=settings.ingest_batch_size
        )
    except AtlasError:
        raise
    except Exception as exc:
        transient, reason = classify(exc)
        if transient:
            raise ServiceUnavailable(f"Neo4j failed during ingestion: {reason}") from exc
        raise
    return [r.created for r in results]


def _ingested(payload: IngestPayload, created: bool, timings: dict[str, float]) -> StepResult:
    return StepResult(
        outcome="ingested" if created else "present",
        prompt_id=payload.prompt_id,
        artifact=payload.artifact,
        timings=timings,
    )


def _store_one(
    payload: IngestPayload,
    rows: PromptRows,
    timings: dict[str, float],
    settings: AtlasSettings,
    *,
    driver: Any,
) -> StepResult:
    """One prompt in its own transaction, with its job item's ``done``."""
    t1 = time.perf_counter()
    hook = _mark_done_hook(payload, timings, [t1])
    (created,) = _store_many(driver, [(rows, hook)], settings)
    timings["ingest_s"] = time.perf_counter() - t1
    return _ingested(payload, created, timings)


def ingest_chunk_step(
    chunk: IngestChunk, settings: AtlasSettings, *, driver: Any, holder: str | None = None
) -> list[StepResult]:
    """Ingest the artifacts of a chunk in ONE transaction (each marks its job item done in it).

    A permanent failure is isolated: an artifact that cannot be read fails alone, and if the
    store refuses the joint transaction the prompts are written one by one, so only the bad one
    fails. A transient fault raises (the caller retries the chunk: ingestion is idempotent).
    ``holder`` takes the chunk's items first (the caller beats for them while this runs).
    """
    _hold(chunk, settings, driver=driver, holder=holder)

    def fail(p: IngestPayload, exc: BaseException) -> StepResult:
        transient, reason = classify(exc)
        if transient:
            raise exc
        record_failure(driver, settings, p.job_id, p.item, reason)
        return StepResult(outcome="failed", prompt_id=p.prompt_id, reason=reason)

    results: dict[int, StepResult] = {}
    ready: list[tuple[int, PromptRows, dict[str, float]]] = []
    for i, p in enumerate(chunk.items):
        try:
            rows, timings = _load_for_ingest(p, settings, driver=driver)
        except Exception as exc:
            results[i] = fail(p, exc)
            continue
        ready.append((i, rows, timings))
    if len(ready) > 1:
        t1 = time.perf_counter()
        clock = [t1]
        batch = [(rows, _mark_done_hook(chunk.items[i], tm, clock)) for i, rows, tm in ready]
        try:
            created = _store_many(driver, batch, settings)
        except Exception as exc:
            if classify(exc)[0]:
                raise
            log.warning("a chunk's joint ingestion was refused (%s): one by one", exc)
        else:
            for (i, _, tm), was_created in zip(ready, created, strict=True):
                results[i] = _ingested(chunk.items[i], was_created, tm)
            ready = []
    for i, rows, timings in ready:  # a single artifact, or a chunk the store refused jointly
        try:
            results[i] = _store_one(chunk.items[i], rows, timings, settings, driver=driver)
        except Exception as exc:
            results[i] = fail(chunk.items[i], exc)
    return [results[i] for i in range(len(chunk.items))]


def annotate_step(
    payload: AnnotatePayload,
    settings: AtlasSettings,
    *,
    driver: Any,
    engines: EngineCache | None = None,
    top_k: int = 10,
) -> dict[str, int]:
    """Label features: the logit lens of one transcoder set's stored features (decoder rows
    through the unembedding), then top activating tokens and a short label for every feature
    (the store's annotation code)."""
    from atlas.circuits.lens import logit_lens_for
    from atlas.store.labels import label_features, store_lens

    model_ref, tc_ref = resolve_refs(payload.model, payload.transcoders, settings)
    engine = (engines or PROCESS_ENGINES).get(model_ref, tc_ref, settings)
    lens = logit_lens_for(engine.model, engine.transcoders)
    n_lens = store_lens(driver, lens, k=top_k, database=settings.neo4j_database)
    n_labels = label_features(driver, top_k=top_k, database=settings.neo4j_database)
    return {"logit_lens": n_lens, "labelled": n_labels}


def record_failure(
    driver: Any, settings: AtlasSettings, job_id: str | None, item: int | None, reason: str
) -> None:
    """Mark a job item permanently failed with its reason (best effort: logs if Neo4j is down)."""
    log.error("job %s item %s failed: %s", job_id, item, reason)
    if job_id is None or item is None:
        return

    try:
        _jobs(driver, settings).mark(job_id, item, state="failed", reason=reason, attempt=True)
    except Exception:
        log.exception("could not record the failure of job %s item %s", job_id, item)


# --------------------------------------------------------------------------- inline mode
def run_inline(
    payload: AttributePayload,
    settings: AtlasSettings,
    *,
    driver: Any,
    engines: EngineCache | None = None,
    holder: str | None = None,
) -> StepResult:
    """Attribute + ingest one spec in this process (the embedded default, no broker).

    Transient faults are retried; a permanent failure is recorded on the job item and returned
    as a ``failed`` result rather than raised, so one poison prompt does not stop a batch.
    """
    try:
        return retry_transient(
            lambda: attribute_step(
                payload, settings, driver=driver, engines=engines, holder=holder
            ),
            what=f"prompt {payload.spec.prompt[:40]!r}",
            service="Neo4j",  # inline mode has no broker
            warn=log.warning,
        )
    except Exception as exc:
        _, reason = classify(exc)
        record_failure(driver, settings, payload.job_id, payload.item, reason)
        return StepResult(outcome="failed", reason=reason)
