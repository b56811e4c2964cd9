"""The bodies of the pipeline's tasks, as plain functions.

``workers.tasks`` wraps these in Celery tasks; ``atlas enqueue`` / ``atlas batch`` call them inline
when no broker is configured. Both run the same code, so the inline mode is a faithful stand-in
for the distributed one. Nothing here imports Celery.

Steps, each idempotent (at-least-once delivery may run any of them twice):

``attribute_chunk_step`` (``attribute_step`` for one spec)
    prompt spec -> prompt id (computed from the spec, the model revision and the transcoder content
    hash BEFORE the model runs) -> skip if the prompt is already in the atlas (unless forced) ->
    reuse the content-addressed artifact if it exists -> else attribution -> artifact.
``ingest_chunk_step``
    artifacts -> Neo4j in one transaction (the store's idempotent ingestion), each job item marked
    done inside it.
``annotate_step``
    feature labels for one transcoder set (the store's annotation code).

Models and transcoders are loaded once per process and kept in a small LRU keyed by reference
(:data:`ENGINES`); it is filled lazily by the first task, never at import and never before a fork.

Errors are sorted by :func:`atlas.retry.classify`: transient faults (Neo4j/Redis unavailable) are retried
with backoff by the caller, permanent ones (bad prompt, missing model, out of memory at batch size
1) are recorded on the job item with their reason and never retried.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from atlas.errors import AtlasError, AttributionError, InputError, ServiceUnavailable
from atlas.retry import classify, retry_transient

if TYPE_CHECKING:
    from atlas.graph import Graph, ModelInfo, TranscoderInfo
    from atlas.settings import AtlasSettings
    from atlas.store.ingest import InTransaction, PromptRows

log = logging.getLogger(__name__)

#: Longest prompt text accepted in a spec (characters); the engine checks tokens separately.
MAX_PROMPT_CHARS = 20_000


# --------------------------------------------------------------------------- payloads
class PromptSpec(BaseModel):
    """One prompt to attribute: what a line of a batch file holds.

    ``model`` / ``transcoders`` unset mean the toy world (the embedded default).
    """

    model_config = ConfigDict(extra="forbid")

    prompt: str
    """The prompt text (the model's BOS is prepended by the engine)."""
    model: str | None = None
    """Hub id or local model directory; unset: the toy model."""
    transcoders: str | None = None
    """Transcoder directory or reference; unset: the toy transcoders."""
    max_n_logits: int = Field(default=10, ge=1, le=1000)
    """Most logit targets."""
    desired_logit_prob: float = Field(default=0.95, gt=0.0, le=1.0)
    """Cumulative probability at which logit targets stop."""
    max_feature_nodes: int | None = Field(default=None, ge=1)
    """Cap on feature rows (most influential first); unset: every active feature."""
    explicit_logit_tokens: list[int] | None = None
    """Vocabulary ids to use as logit targets instead of the top predictions."""
    node_threshold: float = Field(default=0.8, gt=0.0, le=1.0)
    """Pruning: cumulative node influence kept."""
    edge_threshold: float = Field(default=0.98, gt=0.0, le=1.0)
    """Pruning: cumulative edge score kept."""
    force: bool = False
    """Recompute and re-ingest even if the prompt is already in the atlas."""

    @field_validator("prompt")
    @classmethod
    def _prompt_ok(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        return value

    def spec_id(self) -> str:
        """Hash of the request (not of the model files): the CLI's cheap identity for skipping."""
        body = self.model_dump(mode="json", exclude={"force"})
        blob = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


class AttributePayload(BaseModel):
    """Message of the ``attribute`` task."""

    model_config = ConfigDict(extra="forbid")

    spec: PromptSpec
    job_id: str | None = None
    item: int | None = None
    """Index of the item in its job (the job record key is ``{job_id}/{item}``)."""
    enqueued_at: float | None = None
    """Unix time the message was sent (queueing time is measured from it)."""


class IngestPayload(BaseModel):
    """Message of the ``ingest`` task."""

    model_config = ConfigDict(extra="forbid")

    prompt_id: str
    artifact: str
    """Path of the artifact in the artifact store."""
    job_id: str | None = None
    item: int | None = None
    force: bool = False
    attribution: Literal["computed", "cached"] | None = None
    """What the attribute step did (recorded on the job item with ``done``)."""
    enqueued_at: float | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    """Seconds spent so far, carried along for the job record (queue, load, attribute, save)."""


class AttributeChunk(BaseModel):
    """Message of the ``attribute`` task: a few prompt specs, attributed one after the other."""

    model_config = ConfigDict(extra="forbid")

    items: list[AttributePayload] = Field(min_length=1)


class IngestChunk(BaseModel):
    """Message of the ``ingest`` task: the artifacts of one attribute chunk."""

    model_config = ConfigDict(extra="forbid")

    items: list[IngestPayload] = Field(min_length=1)


def chunked(payloads: Sequence[AttributePayload], size: int) -> list[AttributeChunk]:
    """Split payloads into chunks of at most ``size`` specs."""
    size = max(1, size)
    return [
        AttributeChunk(items=list(payloads[i : i + size])) for i in range(0, len(payloads), size)
    ]


class AnnotatePayload(BaseModel):
    """Message of the ``annotate`` task: label the features of one transcoder set."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    transcoders: str | None = None
    job_id: str | None = None


Outcome = Literal["computed", "cached", "present", "failed", "ingested"]


class StepResult(BaseModel):
    """What a step did (returned by tasks, stored nowhere else)."""

    model_config = ConfigDict(extra="forbid")

    outcome: Outcome
    prompt_id: str | None = None
    artifact: str | None = None
    reason: str | None = None
    timings: dict[str, float] = Field(default_factory=dict)


# --------------------------------------------------------------------------- engine cache
@dataclass
class Engine:
    """A loaded model + transcoder set and their provenance (one per reference pair)."""

    model: Any
    transcoders: Any
    model_info: ModelInfo
    transcoder_info: TranscoderInfo
    load_s: float = 0.0


@dataclass
class EngineCache:
    """LRU of loaded engines keyed by (model ref, transcoders ref, device, dtype).

    Filled lazily by the first task of a process. Size 1 by default: a GPU holds one model.
    """

    size: int = 1
    _items: OrderedDict[tuple[str, str, str, str], Engine] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, model_ref: str, tc_ref: str, settings: AtlasSettings) -> Engine:
        """The engine for these references, loading it on first use."""
        key = (model_ref, tc_ref, settings.resolved_device(), settings.dtype)
        with self._lock:
            engine = self._items.get(key)
            if engine is not None:
                self._items.move_to_end(key)
                return engine
            while len(self._items) >= self.size:
                _, old = self._items.popitem(last=False)
                del old
            engine = _load_engine(model_ref, tc_ref, device=key[2], dtype=settings.dtype)
            self._items[key] = engine
            return engine

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


#: The process-wide engine cache used by the tasks (empty until the first task).
ENGINES = EngineCache(size=1)


def _torch_dtype(name: str) -> Any:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def _load_engine(model_ref: str, tc_ref: str, *, device: str, dtype: str) -> Engine:
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    t0 = time.perf_counter()
    log.info("loading model %s and transcoders %s on %s", model_ref, tc_ref, device)
    model = load_model(model_ref, device=device, dtype=_torch_dtype(dtype))
    transcoders = load_transcoders(tc_ref, model, device=device, dtype=_torch_dtype(dtype))
    return Engine(
        model=model,
        transcoders=transcoders,
        model_info=model.info,
        transcoder_info=transcoders.info,
        load_s=time.perf_counter() - t0,
    )


def resolve_refs(
    spec_model: str | None, spec_tc: str | None, settings: AtlasSettings
) -> tuple[str, str]:
    """The model and transcoder references of a spec, the toy world filling what is unset.

    Resolved where the work runs (the worker), so a spec without references means "this
    worker's toy world" wherever it is installed.
    """
    if spec_model is not None and spec_tc is not None:
        return spec_model, spec_tc
    if (spec_model is None) != (spec_tc is None):
        raise InputError("give both --model and --transcoders, or neither (the toy world)")
    from atlas.toy import toy_paths

    paths = toy_paths(settings.atlas_home)
    return str(paths.model_dir), str(paths.transcoder_dir)


# --------------------------------------------------------------------------- identity
def attribution_settings(spec: PromptSpec, settings: AtlasSettings) -> Any:
    """The :class:`atlas.graph.AttributionSettings` the engine records for this spec."""
    from atlas.graph import AttributionSettings

    return AttributionSettings(
        max_n_logits=spec.max_n_logits,
        desired_logit_prob=spec.desired_logit_prob,
        max_feature_nodes=spec.max_feature_nodes,
        explicit_logit_tokens=spec.explicit_logit_tokens,
        node_threshold=spec.node_threshold,
        edge_threshold=spec.edge_threshold,
        pruned=True,
        dtype=settings.dtype,
    )


def prompt_id_for(spec: PromptSpec, engine: Engine, settings: AtlasSettings) -> str:
    """The prompt's content hash, computed before anything runs on the model."""
    from atlas.graph import GraphMetadata

    meta = GraphMetadata(
        prompt=spec.prompt,
        tokens=[],
        model=engine.model_info,
        transcoders=engine.transcoder_info,
        settings=attribution_settings(spec, settings),
    )
    return meta.prompt_id()


# --------------------------------------------------------------------------- error sorting
def _is_oom(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "out of memory" in text or type(exc).__name__ == "OutOfMemoryError"


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
    engines: EngineCache = ENGINES,
    on_ingest: Callable[[IngestChunk], None] | None = None,
) -> StepResult:
    """:func:`attribute_chunk_step` for one spec."""
    chunk = AttributeChunk(items=[payload])
    return attribute_chunk_step(
        chunk, settings, driver=driver, engines=engines, on_ingest=on_ingest
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
    engines: EngineCache = ENGINES,
    on_ingest: Callable[[IngestChunk], None] | None = None,
) -> list[StepResult]:
    """Attribute a chunk of prompt specs (idempotent) and hand their artifacts to ingestion.

    One round trip to Neo4j for the whole chunk says which prompts are already in the atlas and
    records the others' start; those are attributed one after the other (or taken from the
    artifact store) and sent on as one ingest message (``on_ingest``; ``None`` ingests inline).

    A permanent failure of one spec (bad prompt, unknown model, out of memory at batch size 1)
    is recorded on its job item and the rest of the chunk goes on. A transient fault (Neo4j or
    Redis unavailable) raises, so that the caller retries the whole chunk, which is safe: done
    prompts are skipped and computed artifacts reused.
    """
    from atlas.graph import artifact_path
    from atlas.jobs import JobStore

    results: list[StepResult | None] = [None] * len(chunk.items)

    def fail(i: int, p: AttributePayload, exc: BaseException) -> None:
        transient, reason = classify(exc)
        if transient:
            raise exc
        record_failure(driver, p.job_id, p.item, reason)
        results[i] = StepResult(outcome="failed", reason=reason)

    prepared: list[_Prepared] = []
    for i, p in enumerate(chunk.items):
        timings: dict[str, float] = {"started_at": time.time()}
        if p.enqueued_at is not None:
            timings["queue_s"] = max(0.0, timings["started_at"] - p.enqueued_at)
        try:
            t0 = time.perf_counter()
            model_ref, tc_ref = resolve_refs(p.spec.model, p.spec.transcoders, settings)
            engine = engines.get(model_ref, tc_ref, settings)
            timings["load_s"] = time.perf_counter() - t0
            pid = prompt_id_for(p.spec, engine, settings)
        except Exception as exc:
            fail(i, p, exc)
            continue
        path = artifact_path(settings.resolved_artifact_dir, pid)
        prepared.append(_Prepared(i, p, engine, pid, path, timings))

    # one round trip: which prompts are in the atlas, and the start of the others
    t_rec = time.perf_counter()
    present = JobStore(driver).start_many(
        [(x.payload.job_id, x.payload.item, x.prompt_id, x.payload.spec.force) for x in prepared]
    )
    records_s = (time.perf_counter() - t_rec) / max(1, len(prepared))

    ingests: list[IngestPayload] = []
    sent: list[int] = []  # chunk index of each ingest payload
    for x, is_present in zip(prepared, present, strict=True):
        spec, timings = x.payload.spec, x.timings
        timings["records_s"] = records_s
        if is_present and not spec.force:
            log.info("prompt %s already in the atlas: skipped", x.prompt_id)
            results[x.index] = StepResult(
                outcome="present", prompt_id=x.prompt_id, artifact=str(x.path), timings=timings
            )
            continue
        outcome: Literal["computed", "cached"] = "cached"
        if spec.force or not x.path.is_file():
            outcome = "computed"
            try:
                graph = _run_attribution(spec, x.engine, settings, timings)
            except Exception as exc:
                fail(x.index, x.payload, exc)
                continue
            if graph.prompt_id != x.prompt_id:
                log.warning(
                    "engine recorded prompt id %s, expected %s", graph.prompt_id, x.prompt_id
                )
            t1 = time.perf_counter()
            graph.save(x.path)
            timings["save_s"] = time.perf_counter() - t1
        timings["handed_off_at"] = time.time()
        ingests.append(
            IngestPayload(
                prompt_id=x.prompt_id,
                artifact=str(x.path),
                job_id=x.payload.job_id,
                item=x.payload.item,
                force=spec.force,
                attribution=outcome,
                timings=timings,
            )
        )
        sent.append(x.index)
        results[x.index] = StepResult(
            outcome=outcome, prompt_id=x.prompt_id, artifact=str(x.path), timings=timings
        )

    if ingests:
        now = time.time()
        for ing in ingests:
            ing.enqueued_at = now
        if on_ingest is None:
            stored = ingest_chunk_step(IngestChunk(items=ingests), settings, driver=driver)
            for i, res in zip(sent, stored, strict=True):
                if res.outcome == "failed":
                    results[i] = res
        else:
            on_ingest(IngestChunk(items=ingests))
    return [r if r is not None else StepResult(outcome="failed", reason="not run") for r in results]


def _run_attribution(
    spec: PromptSpec, engine: Engine, settings: AtlasSettings, timings: dict[str, float]
) -> Graph:
    """Attribution with the batch size halved on out-of-memory, down to 1 (then permanent)."""
    from atlas.attribution import attribute

    batch_size = max(1, settings.batch_size)
    while True:
        t0 = time.perf_counter()
        try:
            result = attribute(
                spec.prompt,
                engine.model,
                engine.transcoders,
                max_n_logits=spec.max_n_logits,
                desired_logit_prob=spec.desired_logit_prob,
                max_feature_nodes=spec.max_feature_nodes,
                batch_size=batch_size,
                explicit_logit_tokens=spec.explicit_logit_tokens,
            )
            timings["attribute_s"] = time.perf_counter() - t0
            t1 = time.perf_counter()
            graph: Graph = result.to_graph(
                prune=True, node_threshold=spec.node_threshold, edge_threshold=spec.edge_threshold
            )
            timings["prune_s"] = time.perf_counter() - t1
            return graph
        except AtlasError as exc:
            if not _is_oom(exc):
                raise
            oom: BaseException = exc
        except (RuntimeError, MemoryError) as exc:
            if not _is_oom(exc):
                raise AttributionError(f"attribution failed: {classify(exc)[1]}") from exc
            oom = exc
        _free_accelerator_memory()
        if batch_size == 1:
            raise AttributionError(
                "out of memory even at batch size 1: prompt too long for this device"
            ) from oom
        batch_size = max(1, batch_size // 2)
        log.warning("out of memory: retrying with batch size %d", batch_size)


def _free_accelerator_memory() -> None:
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        log.debug("could not empty the CUDA cache", exc_info=True)


def _load_for_ingest(
    payload: IngestPayload, settings: AtlasSettings, *, driver: Any
) -> tuple[PromptRows, dict[str, float]]:
    """An artifact's ingestion rows and its timings so far (a forced prompt is removed first)."""
    from atlas.graph import Graph
    from atlas.store.ingest import graph_rows

    timings = dict(payload.timings)
    if payload.enqueued_at is not None:
        timings["ingest_queue_s"] = max(0.0, time.time() - payload.enqueued_at)
    t0 = time.perf_counter()
    graph = Graph.load(payload.artifact)
    rows = graph_rows(
        graph, min_abs_weight=settings.ingest_min_abs_weight, max_edges=settings.ingest_max_edges
    )
    timings["load_artifact_s"] = time.perf_counter() - t0
    if payload.force:
        _delete_prompt(driver, payload.prompt_id, settings)
    return rows, timings


def _mark_done_hook(
    payload: IngestPayload, timings: dict[str, float], clock: list[float]
) -> InTransaction | None:
    """The job item's ``done``, written inside the ingestion's transaction: an item is done
    exactly when its prompt is stored. ``clock[0]`` is when this prompt's writing began (the
    previous prompt's end, in a chunk); its ``ingest_s`` is the time since."""
    from atlas.jobs import JobStore

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
    chunk: IngestChunk, settings: AtlasSettings, *, driver: Any
) -> list[StepResult]:
    """Ingest the artifacts of a chunk in ONE transaction (each marks its job item done in it).

    A permanent failure is isolated: an artifact that cannot be read fails alone, and if the
    store refuses the joint transaction the prompts are written one by one, so only the bad one
    fails. A transient fault raises (the caller retries the chunk: ingestion is idempotent).
    """

    def fail(p: IngestPayload, exc: BaseException) -> StepResult:
        transient, reason = classify(exc)
        if transient:
            raise exc
        record_failure(driver, p.job_id, p.item, reason)
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
    engines: EngineCache = ENGINES,
    top_k: int = 10,
) -> dict[str, int]:
    """Label features: the logit lens of one transcoder set's stored features (decoder rows
    through the unembedding), then top activating tokens and a short label for every feature
    (the store's annotation code)."""
    from atlas.annotate.apply import label_features, store_logit_lens

    model_ref, tc_ref = resolve_refs(payload.model, payload.transcoders, settings)
    engine = engines.get(model_ref, tc_ref, settings)
    model, tcs = engine.model, engine.transcoders
    w_u = model.hf.get_output_embeddings().weight.detach().T
    tok = model.tokenizer
    n_lens = store_logit_lens(
        driver,
        engine.transcoder_info.content_hash,
        [w.detach() for w in tcs.w_dec],
        w_u,
        lambda t: str(tok.decode([t])),
        k=top_k,
        database=settings.neo4j_database,
    )
    n_labels = label_features(driver, top_k=top_k, database=settings.neo4j_database)
    return {"logit_lens": n_lens, "labelled": n_labels}


def record_failure(driver: Any, job_id: str | None, item: int | None, reason: str) -> None:
    """Mark a job item permanently failed with its reason (best effort: logs if Neo4j is down)."""
    log.error("job %s item %s failed: %s", job_id, item, reason)
    if job_id is None or item is None:
        return
    from atlas.jobs import JobStore

    try:
        JobStore(driver).mark(job_id, item, state="failed", reason=reason, attempt=True)
    except Exception:
        log.exception("could not record the failure of job %s item %s", job_id, item)


# --------------------------------------------------------------------------- inline mode
def run_inline(
    payload: AttributePayload,
    settings: AtlasSettings,
    *,
    driver: Any,
    engines: EngineCache = ENGINES,
) -> StepResult:
    """Attribute + ingest one spec in this process (the embedded default, no broker).

    Transient faults are retried; a permanent failure is recorded on the job item and returned
    as a ``failed`` result rather than raised, so one poison prompt does not stop a batch.
    """
    try:
        return retry_transient(
            lambda: attribute_step(payload, settings, driver=driver, engines=engines),
            what=f"prompt {payload.spec.prompt[:40]!r}",
            service="Neo4j",  # inline mode has no broker
            warn=log.warning,
        )
    except Exception as exc:
        _, reason = classify(exc)
        record_failure(driver, payload.job_id, payload.item, reason)
        return StepResult(outcome="failed", reason=reason)


def artifact_exists(settings: AtlasSettings, prompt_id: str) -> bool:
    from atlas.graph import artifact_path

    return Path(artifact_path(settings.resolved_artifact_dir, prompt_id)).is_file()
