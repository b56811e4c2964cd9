"""The intervention step: one :class:`InterventionSpec` run on the engine, measured, predicted
from the prompt's stored graph when there is one, and optionally stored.

What the step resolves before the compute core runs:

* supernode members: the stored supernode's features of this transcoder set, at every position
  of this prompt where they are active in the clean run (none active: refused);
* a donor: a stored prompt's id (its artifact gives the text; another model or transcoder set is
  refused) or a prompt text. With a donor the edits name the DONOR's features to patch (their
  mode and amount are not used) and the supernode's members active in the donor are patched too,
  every patched value scaled by the supernode's multiplier when one is given;
* predictions: when the artifact of this prompt (text prompts, default attribution settings)
  is in ``ARTIFACT_DIR``, the graph's direct effect of the intervention's activation changes on
  its target rows, next to the measured change of the same rows.

Everything that can be refused is refused before anything is stored.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from atlas.engine import PROCESS_ENGINES, Engine, EngineCache, check_prompt, resolve_refs
from atlas.errors import InputError
from atlas.pipeline.intervention_payloads import INTERVENE_SOURCE, InterventionSpec

if TYPE_CHECKING:
    from torch import Tensor

    from atlas.graph import Graph
    from atlas.interventions import CleanRun, InterventionResult
    from atlas.settings import AtlasSettings

log = logging.getLogger(__name__)

#: How many tokens the result's ``top`` lists.
TOP_K = 10


@dataclass
class _Run:
    """What one spec resolved to and produced."""

    engine: Engine
    prompt_id: str | None
    result: InterventionResult
    changes: list[tuple[int, int, int, float]]
    touched: list[tuple[int, int]]
    donor_id: str | None
    graph: Graph | None


def _engine(spec: InterventionSpec, settings: AtlasSettings, engines: EngineCache | None) -> Engine:
    model_ref, tc_ref = resolve_refs(spec.model, spec.transcoders, settings)
    check_prompt(spec.prompt, model_ref)
    return (engines or PROCESS_ENGINES).get(model_ref, tc_ref, settings)


def _inputs(engine: Engine, spec: InterventionSpec, settings: AtlasSettings) -> Any:
    """The recipient's model inputs (an image for a text-only model is refused here, by name,
    before the model would ignore or misread it)."""
    return _model_inputs(engine, spec.prompt, spec.image, settings)


def _model_inputs(engine: Engine, prompt: str, image: str | None, settings: AtlasSettings) -> Any:
    if image is None:
        return engine.model.inputs(prompt)
    if not engine.model.is_vision:
        raise InputError(f"an image was given but {engine.model_info.name} is a text-only model")
    from atlas.pipeline.images import load_image_ref

    return engine.model.inputs(prompt, image=load_image_ref(image, settings))


def _stored_ids(
    driver: Any, name: str, tset_hash: str, settings: AtlasSettings
) -> list[tuple[int, int]]:
    """``(layer, feature)`` of a stored supernode's members of this transcoder set."""
    from atlas.store import queries as Q
    from atlas.store.connection import read_rows
    from atlas.store.supernodes import validate_name

    rows = read_rows(
        driver,
        Q.SUPERNODE_MEMBERS,
        {"name": validate_name(name)},
        database=settings.neo4j_database,
        what="supernode members",
    )
    if not rows:
        raise InputError(f"no supernode named {name!r} with members")
    out = []
    for row in rows:
        tset, layer, index = str(row["ref"]).rsplit("/", 2)
        if tset == tset_hash:
            out.append((int(layer), int(index)))
    return out


def _active_at(acts: Tensor, features: list[tuple[int, int]]) -> list[tuple[int, int, int]]:
    """Every ``(layer, pos, feature)`` where one of ``features`` is active."""
    out = []
    for layer, f in features:
        if layer >= acts.shape[0] or f >= acts.shape[2]:
            continue
        for pos in acts[layer, :, f].nonzero().flatten().tolist():
            out.append((layer, int(pos), f))
    return out


def _donor(
    spec: InterventionSpec, engine: Engine, settings: AtlasSettings
) -> tuple[str, str | None, str | None]:
    """The donor's prompt text, image reference and stored id (None for a donor given by
    text). A stored image donor brings its image from the artifact store."""
    from atlas.graph import Graph, artifact_path

    donor = spec.donor or ""
    path = artifact_path(settings.resolved_artifact_dir, donor) if _looks_like_id(donor) else None
    if path is None or not path.is_file():
        return donor, spec.donor_image, None
    if spec.donor_image is not None:
        raise InputError(f"donor {donor}: a stored donor brings its own image; drop the image")
    meta = Graph.load(path).metadata
    if meta.transcoders.content_hash != engine.transcoder_info.content_hash:
        raise InputError(f"donor {donor}: its graph comes from another transcoder set")
    if (meta.model.name, meta.model.revision) != (
        engine.model_info.name,
        engine.model_info.revision,
    ):
        raise InputError(f"donor {donor}: its graph comes from another model")
    image = f"sha256:{meta.image_sha256}" if meta.image_sha256 else None
    return meta.prompt, image, donor


def _looks_like_id(text: str) -> bool:
    return len(text) >= 8 and all(c in "0123456789abcdef" for c in text)


def _prompt_id(spec: InterventionSpec, engine: Engine, settings: AtlasSettings) -> str:
    """The id the prompt has (or would have) in the atlas with the default attribution
    settings (an image prompt: with its image's hash)."""
    from atlas.pipeline.images import IMAGE_REF, load_image_ref
    from atlas.pipeline.payloads import PromptSpec
    from atlas.pipeline.steps import prompt_id_for

    image = spec.image
    if image is not None and not IMAGE_REF.match(image):
        image = f"sha256:{load_image_ref(image, settings).info.sha256}"
    return prompt_id_for(PromptSpec(prompt=spec.prompt, image=image), engine, settings)


def canonical_spec(
    spec: InterventionSpec, settings: AtlasSettings, *, store_images: bool = False
) -> InterventionSpec:
    """``spec`` with its images named by content (``sha256:<hex>``), so that the same question
    has the same id wherever its files lie; ``store_images`` also puts them in the artifact
    store (what a queued or stored spec needs)."""
    from atlas.pipeline.images import IMAGE_REF, load_image_ref, stored_image_ref

    def ref(image: str | None) -> str | None:
        if image is None or IMAGE_REF.match(image):
            return image
        if store_images:
            return stored_image_ref(image, settings)
        return f"sha256:{load_image_ref(image, settings).info.sha256}"

    update = {"image": ref(spec.image), "donor_image": ref(spec.donor_image)}
    return (
        spec
        if update == {"image": spec.image, "donor_image": spec.donor_image}
        else (spec.model_copy(update=update))
    )


def _graph(prompt_id: str | None, settings: AtlasSettings) -> Graph | None:
    from atlas.graph import Graph, artifact_path

    if prompt_id is None:
        return None
    path = artifact_path(settings.resolved_artifact_dir, prompt_id)
    return Graph.load(path) if path.is_file() else None


def _edits(spec: InterventionSpec) -> list[Any]:
    from atlas.interventions import FeatureEdit

    return [FeatureEdit(e.layer, e.position(), e.feature, e.mode, e.amount) for e in spec.edits]


def _check_edits(spec: InterventionSpec, engine: Engine, n_pos: int) -> None:
    from atlas.interventions.core import check_feature

    for e in spec.edits:
        what = f"{e.mode} {e.layer}:{e.pos}:{e.feature}"
        check_feature(engine.transcoders, e.layer, e.position(), e.feature, n_pos, what)


def _patch(
    spec: InterventionSpec,
    engine: Engine,
    settings: AtlasSettings,
    inputs: Any,
    clean: CleanRun,
    members: list[tuple[int, int]],
    knobs: dict[str, Any],
) -> tuple[InterventionResult, str | None]:
    """Circuit patching from the spec's donor: the edits' features, and the supernode's members
    active in the donor; every patched value is scaled by the supernode's multiplier when one is
    given (1 otherwise)."""
    from atlas.interventions import circuit_patch, donor_activations

    model, tset = engine.model, engine.transcoders
    text, image, donor_id = _donor(spec, engine, settings)
    donor_inputs = _model_inputs(engine, text, image, settings)
    donor = donor_activations(model, tset, donor_inputs)
    _check_edits(spec, engine, donor.n_pos)
    features = _donor_features(spec)
    if spec.patch_image_tokens:
        features += _image_token_features(donor_inputs, donor.activations, clean.activations)
    scale = 1.0
    if spec.supernode is not None:
        active = _active_at(donor.activations, members)
        if not active:
            raise InputError(
                f"{spec.supernode.name}: no member of the supernode is active in the donor"
            )
        features += active
        scale = spec.supernode.multiplier
    result = circuit_patch(model, tset, inputs, donor, features, scale=scale, clean=clean, **knobs)
    return result, donor_id


def _run(
    spec: InterventionSpec, engine: Engine, settings: AtlasSettings, driver: Any
) -> tuple[InterventionResult, list[tuple[int, int]], str | None]:
    """Resolve the spec's edits, supernode and donor and run it on the model."""
    from atlas.interventions import clean_run, feature_intervention, generate, supernode_edits

    model, tset = engine.model, engine.transcoders
    inputs = _inputs(engine, spec, settings)
    clean: CleanRun = clean_run(model, tset, inputs)
    knobs: dict[str, Any] = {
        "constrained": spec.layer_range(),
        "freeze_attention": spec.freeze_attention,
    }
    touched = [(e.layer, e.feature) for e in spec.edits]
    members: list[tuple[int, int]] = []
    if spec.supernode is not None:
        if driver is None:
            raise InputError("a supernode intervention needs the store (Neo4j)")
        members = _stored_ids(driver, spec.supernode.name, tset.info.content_hash, settings)
        touched += members
    if spec.patch_image_tokens and spec.donor is None:
        raise InputError("--patch-image-tokens needs a donor (--donor)")
    if spec.donor is not None:
        result, donor_id = _patch(spec, engine, settings, inputs, clean, members, knobs)
        return result, touched, donor_id
    _check_edits(spec, engine, inputs.n_pos)
    edits = _edits(spec)
    if spec.supernode is not None:
        active = _active_at(clean.activations, members)
        edits += supernode_edits(
            active, spec.supernode.multiplier, clean.activations, spec.supernode.name
        )
    if not edits:
        raise InputError("an intervention needs at least one edit, a supernode or a donor")
    if spec.generate:
        result = generate(model, tset, inputs, edits, spec.generate, clean=clean, **knobs)
    else:
        result = feature_intervention(model, tset, inputs, edits, clean=clean, **knobs)
    return result, touched, None


def _image_token_features(
    donor_inputs: Any, donor_acts: Tensor, recipient_acts: Tensor
) -> list[tuple[int, int, int]]:
    """Every ``(layer, pos, feature)`` at the donor's image positions active in the donor or,
    at the same position, in the recipient (patching sets the latter to the donor's value)."""
    positions = donor_inputs.image_positions
    if positions is None:
        raise InputError("--patch-image-tokens needs an image donor")
    if recipient_acts.shape[1] != donor_acts.shape[1]:
        raise InputError(
            "--patch-image-tokens needs a recipient of the donor's length "
            f"({donor_acts.shape[1]} positions, the recipient has {recipient_acts.shape[1]})"
        )
    pos = positions.to(donor_acts.device)
    active = (donor_acts[:, pos] != 0) | (recipient_acts[:, pos].to(donor_acts.device) != 0)
    out = []
    for layer, k, f in active.nonzero().tolist():
        out.append((int(layer), int(pos[k]), int(f)))
    return out


def _donor_features(spec: InterventionSpec) -> list[tuple[int, int, int]]:
    """The donor features the edits name (single positions of the donor's sequence)."""
    out = []
    for e in spec.edits:
        pos = e.position()
        if isinstance(pos, slice):
            raise InputError(f"donor feature {e.layer}:{e.pos}:{e.feature}: give one position")
        out.append((e.layer, pos, e.feature))
    return out


def _changes(result: InterventionResult) -> list[tuple[int, int, int, float]]:
    """``(layer, pos, feature, value - clean)`` of every single-position intervention."""
    out = []
    clean = result.clean_activations
    n_pos = clean.shape[1]
    for iv in result.interventions:
        if isinstance(iv.pos, slice) or not isinstance(iv.value, float):
            continue
        pos = iv.pos % n_pos
        out.append((iv.layer, pos, iv.feature, iv.value - float(clean[iv.layer, pos, iv.feature])))
    return out


def _predicted(
    engine: Engine, graph: Graph | None, result: InterventionResult, changes: list
) -> dict[str, Any] | None:
    """The graph's direct-effect predictions on its target rows next to the measured changes
    (None without a graph or when no changed feature is a node of it)."""
    from atlas.interventions import direct_effect, feature_nodes, measured_effect, target_rows

    if graph is None:
        return None
    nodes = feature_nodes(graph)
    in_graph = [c for c in changes if (c[0], c[1], c[2]) in nodes]
    if not in_graph:
        return None
    rows = target_rows(graph)
    direct = direct_effect(graph, in_graph)[rows]
    measured = measured_effect(engine.model, graph, result)
    return {
        "rows": [int(r) for r in rows],
        "direct_effect": [float(x) for x in direct],
        "measured": [float(x) for x in measured],
        "sources": [list(c[:3]) for c in in_graph],
    }


def _token_id(engine: Engine, token: str) -> int:
    """The vocabulary id of ``token`` (exactly one token, or a one-line refusal)."""
    ids = engine.model.tokenizer(token, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise InputError(f"watched token {token!r} is {len(ids)} tokens of this model, not one")
    return int(ids[0])


def _watch(
    engine: Engine, run: _Run, tokens: Sequence[str], predicted: dict[str, Any] | None
) -> list[dict[str, Any]]:
    """Each watched token's probability before and after, and its demeaned-logit change as
    measured and as the graph predicts it (when the graph has that logit)."""
    import torch

    r = run.result
    p_base = torch.softmax(r.base_last_logits.double(), -1)
    p_steer = torch.softmax(r.last_logits.double(), -1)
    graph_logits: list[int] = []
    n_feat = 0
    if predicted is not None and run.graph is not None:
        from atlas.interventions.predict import graph_view

        view = graph_view(run.graph)
        graph_logits = [int(t) for t in view.logit_tokens]
        n_feat = len(predicted["rows"]) - len(graph_logits)
    out = []
    for token in tokens:
        tid = _token_id(engine, token)
        row: dict[str, Any] = {
            "token": token,
            "token_id": tid,
            "base": float(p_base[tid]),
            "steered": float(p_steer[tid]),
            "predicted_logit": None,
            "measured_logit": None,
        }
        if predicted is not None and tid in graph_logits:
            k = n_feat + graph_logits.index(tid)
            row["predicted_logit"] = predicted["direct_effect"][k]
            row["measured_logit"] = predicted["measured"][k]
        out.append(row)
    return out


def _token(engine: Engine, token_id: int) -> str:
    return str(engine.model.tokenizer.decode([token_id]))


def result_json(run: _Run, spec: InterventionSpec) -> dict[str, Any]:
    """The answer of ``atlas intervene --format json`` (and the task's result)."""
    r, engine = run.result, run.engine
    out: dict[str, Any] = {
        "id": spec.content_id(),
        "prompt_id": run.prompt_id,
        "base_logits": [float(x) for x in r.base_last_logits.float().cpu()],
        "steered_logits": [float(x) for x in r.last_logits.float().cpu()],
        "top": [
            {"token": _token(engine, t), "token_id": t, "base": pb, "steered": ps}
            for t, pb, ps in r.top(TOP_K)
        ],
        "kl": _finite_or_none(r.kl()),
        "predicted": _predicted(engine, run.graph, r, run.changes),
        "interventions": [list(c) for c in run.changes],
    }
    if spec.watch:
        out["watch"] = _watch(engine, run, spec.watch, out["predicted"])
    if spec.generate:
        out["generated"] = r.generated_text
        out["generated_ids"] = [
            int(x) for x in (r.generated_ids if r.generated_ids is not None else [])
        ]
    return out


def _finite_or_none(x: float) -> float | None:
    return x if math.isfinite(x) else None


def intervene_step(
    spec: InterventionSpec,
    settings: AtlasSettings,
    *,
    driver: Any = None,
    engines: EngineCache | None = None,
) -> dict[str, Any]:
    """Run one intervention; store it when ``spec.store`` (needs ``driver``). Refusals are
    :class:`InputError` raised before anything is written."""
    if spec.store and driver is None:
        raise InputError("storing an intervention needs the store (Neo4j)")
    engine = _engine(spec, settings, engines)
    result, touched, donor_id = _run(spec, engine, settings, driver)
    prompt_id = _prompt_id(spec, engine, settings)
    run = _Run(
        engine, prompt_id, result, _changes(result), touched, donor_id, _graph(prompt_id, settings)
    )
    named = canonical_spec(spec, settings, store_images=spec.store)
    answer = result_json(run, named)
    if spec.store:
        from atlas.store.interventions import store_intervention

        store_intervention(
            driver,
            named,
            answer,
            tset_hash=engine.transcoder_info.content_hash,
            touched=touched,
            donor_id=donor_id,
            database=settings.neo4j_database,
        )
    return answer


# --------------------------------------------------------------------------- jobs
def intervene_item_step(
    payload: Any,
    settings: AtlasSettings,
    *,
    driver: Any,
    engines: EngineCache | None = None,
    holder: str | None = None,
) -> dict[str, Any]:
    """One job item: held by ``holder`` while it runs (so a lost worker's item shows as stale
    and is sent again), then marked done with its prompt id, or failed with the one-line reason
    of a refusal (that item alone)."""
    from atlas.store.jobs import JobStore

    tracked = payload.job_id is not None and payload.item is not None
    jobs = JobStore(driver, settings.neo4j_database) if tracked else None
    if jobs is not None:
        jobs.mark(payload.job_id, payload.item, state="attributing", attempt=True)
        if holder is not None:
            jobs.hold(payload.job_id, [payload.item], holder)
    t0 = time.perf_counter()
    try:
        answer = intervene_step(payload.spec, settings, driver=driver, engines=engines)
    except InputError as exc:
        if jobs is not None:
            jobs.mark(payload.job_id, payload.item, state="failed", reason=str(exc))
        return {"outcome": "failed", "reason": str(exc)}
    finally:
        if jobs is not None and holder is not None:
            jobs.release(payload.job_id, [payload.item], holder)
    if jobs is not None:
        jobs.mark(
            payload.job_id,
            payload.item,
            state="done",
            prompt_id=answer["prompt_id"],
            outcome="computed",
            timings={"intervene_s": time.perf_counter() - t0},
        )
    return {"outcome": "computed", "id": answer["id"], "kl": answer["kl"]}


def _dispatch(settings: AtlasSettings, driver: Any, payloads: list[Any]) -> None:
    """Send the payloads to the GPU queue, or with no broker run them here."""
    if settings.redis_url:
        from workers.app import send_interventions

        send_interventions(settings, [p.model_dump(mode="json") for p in payloads])
        return
    from atlas.pipeline.liveness import holder_id

    holder = holder_id("inline")
    for payload in payloads:
        intervene_item_step(payload, settings, driver=driver, holder=holder)


def _queued(spec: InterventionSpec, settings: AtlasSettings) -> InterventionSpec:
    """A spec as a worker can read it: its images stored and named by content. An image that
    cannot be read here stays a path, so its item fails alone, with the reason, on the worker."""
    try:
        return canonical_spec(spec, settings, store_images=True)
    except InputError:
        return spec


def resend_interventions(
    settings: AtlasSettings, driver: Any, job_id: str, items: Sequence[Any]
) -> int:
    """``atlas jobs retry`` and the reaper for an intervention job: its items queued again."""
    from atlas.pipeline.intervention_payloads import InterventionPayload
    from atlas.pipeline.submit import job_store

    payloads = [
        InterventionPayload(
            spec=InterventionSpec.model_validate(it.spec), job_id=job_id, item=it.idx
        )
        for it in items
    ]
    job_store(driver, settings).requeue(job_id, [it.idx for it in items])
    _dispatch(settings, driver, payloads)
    return len(payloads)


def submit_interventions(
    settings: AtlasSettings, driver: Any, specs: list[InterventionSpec]
) -> str:
    """Record a job of intervention items and send one ``atlas.gpu.intervene`` message per
    item, or with no broker (``REDIS_URL`` unset) run them here, inline. Returns the job id."""
    from atlas.pipeline.intervention_payloads import InterventionPayload
    from atlas.pipeline.submit import job_store, mode_of
    from atlas.store.jobs import new_job_id

    store = job_store(driver, settings)
    job_id = new_job_id()
    specs = [_queued(s, settings) for s in specs]
    dumped = [s.model_dump(mode="json") for s in specs]
    ids = [s.content_id() for s in specs]
    store.create(job_id, dumped, ids, source=INTERVENE_SOURCE, mode=mode_of(settings))
    payloads = [InterventionPayload(spec=s, job_id=job_id, item=i) for i, s in enumerate(specs)]
    _dispatch(settings, driver, payloads)
    return job_id


# --------------------------------------------------------------------------- faithfulness
def faithfulness_step(
    prompt_id: str,
    settings: AtlasSettings,
    *,
    model_ref: str | None = None,
    tc_ref: str | None = None,
    n_sources: int = 10,
    engines: EngineCache | None = None,
) -> dict[str, Any]:
    """The faithfulness report of a stored prompt's graph (its artifact in ``ARTIFACT_DIR``),
    on the model and transcoders its graph records unless others are given."""
    from atlas.graph import Graph, artifact_path
    from atlas.interventions import faithfulness

    path = artifact_path(settings.resolved_artifact_dir, prompt_id)
    if not path.is_file():
        raise InputError(
            f"no graph artifact of prompt {prompt_id} in {settings.resolved_artifact_dir}"
        )
    graph = Graph.load(path)
    meta = graph.metadata
    model_ref = model_ref or meta.model.name
    tc_ref = tc_ref or meta.transcoders.name
    engine = (engines or PROCESS_ENGINES).get(model_ref, tc_ref, settings)
    if engine.transcoder_info.content_hash != meta.transcoders.content_hash:
        raise InputError(f"prompt {prompt_id}: its graph comes from another transcoder set")
    image = f"sha256:{meta.image_sha256}" if meta.image_sha256 else None
    inputs = _model_inputs(engine, meta.prompt, image, settings)
    report = faithfulness(engine.model, engine.transcoders, inputs, graph, n_sources=n_sources)
    return {
        "prompt_id": prompt_id,
        "prompt": meta.prompt,
        "n_sources": len(report.sources),
        "n_pairs": int(report.influence.numel()),
        "spearman": _finite_or_none(report.spearman),
        "log_log_pearson": _finite_or_none(report.log_log_pearson),
        "sources": [list(s) for s in report.sources],
        "logit_influence": [float(x) for x in report.logit_influence],
        "kl": [float(x) for x in report.kl],
    }
