"""The loaded model and transcoders a process computes with, and how attribution runs on them.

An :class:`Engine` is one model plus one transcoder set (the replacement model) with their
provenance. Loading takes seconds to minutes, so a process keeps its engines in an
:class:`EngineCache` (an LRU keyed by reference, device and dtype; :data:`PROCESS_ENGINES` is
the one the pipeline's steps use). It is filled lazily by the first task, never at import and
never before a worker forks, so CUDA is initialised only in the process that uses it.

:func:`attribute_with_halving` is the out-of-memory policy every GPU-side step shares: on
:class:`~atlas.errors.OutOfMemory` the batch size is halved and the attribution retried, down to
1, after which the failure is permanent.

Nothing here imports Celery, click or Neo4j, and torch is imported only when an engine loads.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from atlas.errors import AttributionError, InputError, OutOfMemory
from atlas.retry import classify

if TYPE_CHECKING:
    from atlas.graph import AttributionSettings, Graph, ModelInfo, TranscoderInfo
    from atlas.models import LoadedModel
    from atlas.settings import AtlasSettings
    from atlas.transcoders import TranscoderSet

log = logging.getLogger(__name__)


@dataclass
class Engine:
    """A loaded model + transcoder set and their provenance (one per reference pair)."""

    model: LoadedModel
    transcoders: TranscoderSet
    model_info: ModelInfo
    transcoder_info: TranscoderInfo
    load_s: float = 0.0


@dataclass
class EngineCache:
    """LRU of loaded engines keyed by (model ref, transcoders ref, device, dtype).

    Size 1 by default: a GPU holds one model, and a second one would be loaded beside it.
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
            engine = load_engine(model_ref, tc_ref, settings)
            self._items[key] = engine
            return engine

    def clear(self) -> None:
        """Forget every engine (a forked worker process must not share its parent's)."""
        with self._lock:
            self._items.clear()


#: This process's engines (empty until the first task needs one).
PROCESS_ENGINES = EngineCache(size=1)


def load_engine(model_ref: str, tc_ref: str, settings: AtlasSettings) -> Engine:
    """Load a model and its transcoders on the settings' device and dtype."""
    from atlas.models import load_model
    from atlas.transcoders import load_transcoders

    device, dtype = settings.resolved_device(), settings.torch_dtype()
    t0 = time.perf_counter()
    log.info("loading model %s and transcoders %s on %s", model_ref, tc_ref, device)
    model = load_model(model_ref, device=device, dtype=dtype)
    transcoders = load_transcoders(tc_ref, model, device=device, dtype=dtype)
    return Engine(
        model=model,
        transcoders=transcoders,
        model_info=model.info,
        transcoder_info=transcoders.info,
        load_s=time.perf_counter() - t0,
    )


@functools.lru_cache(maxsize=8)
def _tokenizer_and_limit(model_ref: str) -> tuple[Any, int | None] | None:
    """The tokenizer and position limit of a model, without its weights (None when they
    cannot be read: the model's own load then says why, in its words)."""
    try:
        from transformers import AutoConfig, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model_ref)
        config = AutoConfig.from_pretrained(model_ref)
    except Exception as exc:
        log.debug("no tokenizer for %s before loading: %s", model_ref, exc)
        return None
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return tokenizer, int(limit) if limit else None


def check_prompt(prompt: str, model_ref: str) -> None:
    """Refuse a prompt the model cannot take BEFORE its weights load (seconds to minutes): empty,
    no tokens, or more tokens (with the BOS the engine prepends) than the model's positions.
    Only the tokenizer and config are read, and kept for the next prompt."""
    if not prompt.strip():
        raise InputError("prompt is empty")
    view = _tokenizer_and_limit(model_ref)
    if view is None:
        return
    tokenizer, limit = view
    ids = list(tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])
    if not ids:
        raise InputError("prompt is empty: the tokenizer gives no tokens for it")
    special = {int(i) for i in tokenizer.all_special_ids}
    n_tokens = len(ids) + (0 if int(ids[0]) in special else 1)
    if limit is not None and n_tokens > limit:
        raise InputError(f"prompt has {n_tokens} tokens, more than the limit of {limit}")


def resolve_refs(
    spec_model: str | None, spec_tc: str | None, settings: AtlasSettings
) -> tuple[str, str]:
    """The model and transcoder references of a request, the toy world filling what is unset.

    Resolved where the work runs (the worker), so a request without references means "this
    worker's toy world" wherever it is installed.
    """
    if spec_model is not None and spec_tc is not None:
        return spec_model, spec_tc
    if (spec_model is None) != (spec_tc is None):
        raise InputError("give both --model and --transcoders, or neither (the toy world)")
    from atlas.toy import toy_paths

    paths = toy_paths(settings.atlas_home)
    return str(paths.model_dir), str(paths.transcoder_dir)


def attribute_with_halving(
    engine: Engine,
    prompt: str,
    attribution: AttributionSettings,
    *,
    batch_size: int,
    timings: dict[str, float],
    image: Any = None,
) -> Graph:
    """Attribution and pruning, with the batch size halved on out-of-memory down to 1 (then a
    permanent :class:`AttributionError`). ``timings`` gets ``attribute_s`` and ``prune_s``.
    ``image`` (an image + text prompt's :class:`~atlas.images.LoadedImage`) joins the prompt,
    with the rollout maps of its soft tokens kept in the graph."""
    batch_size = max(1, batch_size)
    while True:
        try:
            return _attribute_once(engine, prompt, attribution, batch_size, timings, image)
        except OutOfMemory as exc:
            oom: BaseException = exc
        except (RuntimeError, MemoryError) as exc:
            if not _is_torch_oom(exc):
                raise AttributionError(f"attribution failed: {classify(exc)[1]}") from exc
            oom = exc
        free_accelerator_memory()
        if batch_size == 1:
            raise AttributionError(
                "out of memory even at batch size 1: prompt too long for this device"
            ) from oom
        batch_size = max(1, batch_size // 2)
        log.warning("out of memory: retrying with batch size %d", batch_size)


def _attribute_once(
    engine: Engine,
    prompt: str,
    attribution: AttributionSettings,
    batch_size: int,
    timings: dict[str, float],
    image: Any = None,
) -> Graph:
    from atlas.attribution import attribute

    t0 = time.perf_counter()
    result = attribute(
        prompt,
        engine.model,
        engine.transcoders,
        max_n_logits=attribution.max_n_logits,
        desired_logit_prob=attribution.desired_logit_prob,
        max_feature_nodes=attribution.max_feature_nodes,
        batch_size=batch_size,
        explicit_logit_tokens=attribution.explicit_logit_tokens,
        image=image,
    )
    timings["attribute_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    graph: Graph = result.to_graph(
        prune=True,
        node_threshold=attribution.node_threshold,
        edge_threshold=attribution.edge_threshold,
    )
    timings["prune_s"] = time.perf_counter() - t1
    _name_logits(engine, graph)
    return graph


def _name_logits(engine: Engine, graph: Graph) -> None:
    """Record the decoded text of each logit node's token (``extra["logit_tokens"]``, in node
    order), so the store can find and show logits whose token is not in the prompt."""
    from atlas.graph import NodeKind

    tokenizer = getattr(engine.model, "tokenizer", None)
    if tokenizer is None:
        return
    ids = [
        int(t)
        for t, k in zip(graph.token_id.tolist(), graph.kind.tolist(), strict=True)
        if k == NodeKind.LOGIT
    ]
    graph.metadata.extra["logit_tokens"] = [str(tokenizer.decode([t])) for t in ids]


def _is_torch_oom(exc: BaseException) -> bool:
    """A torch out-of-memory error that escaped translation (pruning allocates too)."""
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def free_accelerator_memory() -> None:
    """Return cached accelerator memory after an out-of-memory, before the smaller retry."""
    import gc

    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - best effort
        log.debug("could not empty the CUDA cache", exc_info=True)
