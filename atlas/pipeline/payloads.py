"""What travels between the pipeline's steps: prompt specs, task messages and step results.

Every model is strict (``extra="forbid"``) and JSON-only, because these are the Celery messages
and the job records' copy of each request. A :class:`PromptSpec` carries its attribution knobs as
one :class:`atlas.graph.AttributionSettings` (the single definition of those knobs and their
defaults); a batch-file line may still give them flat (``{"prompt": ..., "max_n_logits": 3}``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    field_serializer,
    field_validator,
    model_serializer,
    model_validator,
)

from atlas.errors import InputError
from atlas.graph import AttributionSettings

#: Longest prompt text accepted in a spec (characters); the engine checks tokens separately.
MAX_PROMPT_CHARS = 20_000

#: Attribution fields a request may not set: they are the worker's (its ``dtype`` setting) and
#: the pipeline's (it always stores pruned graphs), filled in where the work runs.
WORKER_FIELDS = frozenset({"dtype", "pruned"})

#: The knobs a request may set, each with the bounds a request must keep:
#: name -> (lowest, lowest allowed itself, highest).
REQUEST_BOUNDS: dict[str, tuple[float, bool, float]] = {
    "max_n_logits": (1, True, 1000),
    "desired_logit_prob": (0.0, False, 1.0),
    "max_feature_nodes": (1, True, float("inf")),
    "node_threshold": (0.0, False, 1.0),
    "edge_threshold": (0.0, False, 1.0),
}

#: Attribution fields a batch-file line or a CLI option may give at the top level.
REQUEST_FIELDS = tuple(n for n in AttributionSettings.model_fields if n not in WORKER_FIELDS)


def _check_bounds(attribution: AttributionSettings) -> AttributionSettings:
    """Every knob out of its bounds, named in one message (``name: why; name: why``)."""
    problems = []
    for name, (low, low_ok, high) in REQUEST_BOUNDS.items():
        value = getattr(attribution, name)
        if value is None:
            continue
        if value < low or (value == low and not low_ok) or value > high:
            lowest = f"at least {low:g}" if low_ok else f"above {low:g}"
            upper = "" if high == float("inf") else f" and at most {high:g}"
            problems.append(f"{name}: must be {lowest}{upper}")
    for name in sorted(WORKER_FIELDS & attribution.model_fields_set):
        problems.append(f"{name}: set by the worker, not by a request")
    if problems:
        raise ValueError("; ".join(problems))
    return attribution


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
    attribution: AttributionSettings = Field(default_factory=AttributionSettings)
    """The attribution knobs (``dtype`` and ``pruned`` come from the worker)."""
    force: bool = False
    """Recompute and re-ingest even if the prompt is already in the atlas."""
    image: str | None = None
    """The image of an image + text prompt: a file path as a batch line or the CLI gives it
    (relative to the batch file), replaced at submission by its content address
    ``sha256:<hex>`` in the artifact store (:mod:`atlas.pipeline.images`), which is all that
    messages and job records carry."""
    image_name: str | None = None
    """The image file as the submitter named it, for error messages only (not part of the
    prompt's identity)."""
    tags: list[str] | None = None
    """Tags of the image (stored on its ``Image`` node; not part of the prompt's identity)."""

    @model_serializer(mode="wrap")
    def _without_absent_image(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Text specs serialise exactly as before images existed (messages, job records)."""
        data = handler(self)
        if isinstance(data, dict):
            for key in ("image", "image_name", "tags"):
                if data.get(key) is None:
                    data.pop(key, None)
        return data

    @model_validator(mode="before")
    @classmethod
    def _nest_flat_knobs(cls, data: Any) -> Any:
        """Batch files and CLI options give the knobs at the top level; nest them."""
        if not isinstance(data, dict):
            return data
        flat = {k: data[k] for k in REQUEST_FIELDS if k in data}
        if not flat:
            return data
        rest = {k: v for k, v in data.items() if k not in flat}
        nested = rest.get("attribution") or {}
        if isinstance(nested, AttributionSettings):
            nested = nested.model_dump(exclude_unset=True)
        rest["attribution"] = {**nested, **flat} if isinstance(nested, dict) else nested
        return rest

    @field_validator("prompt")
    @classmethod
    def _prompt_ok(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty")
        if len(value) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt is longer than {MAX_PROMPT_CHARS} characters")
        return value

    @field_validator("image")
    @classmethod
    def _image_ok(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("image path is empty")
        return value

    @field_validator("tags")
    @classmethod
    def _tags_ok(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not t.strip() or len(t) > 200 for t in value):
            raise ValueError("tags must be non-empty strings of at most 200 characters")
        return value

    @field_validator("attribution")
    @classmethod
    def _attribution_ok(cls, value: AttributionSettings) -> AttributionSettings:
        return _check_bounds(value)

    @field_serializer("attribution")
    def _request_knobs(self, value: AttributionSettings) -> dict[str, Any]:
        """Messages and job records carry only what a request may set."""
        return value.model_dump(mode="json", exclude=set(WORKER_FIELDS))

    def recorded_settings(self, dtype: str) -> AttributionSettings:
        """The settings the engine records for this spec on a worker computing in ``dtype``:
        what goes into the prompt id."""
        return self.attribution.model_copy(update={"dtype": dtype, "pruned": True})

    def spec_id(self) -> str:
        """Hash of the request (not of the model files): the CLI's cheap identity for skipping.

        Hashed flat (the knobs beside the prompt, as a batch-file line gives them), so a request
        has one id however its knobs are written.
        """
        body = self.model_dump(mode="json", exclude={"force", "attribution", "tags", "image_name"})
        knobs = self._request_knobs(self.attribution)
        blob = json.dumps(body | knobs, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


def _field_error(err: Any) -> str:
    """``field: why`` for one pydantic error, the field named as a batch-file line gives it."""
    loc = [str(x) for x in err.get("loc", ())]
    msg = " ".join(str(err["msg"]).removeprefix("Value error, ").split())
    if loc[:1] == ["attribution"]:
        loc = loc[1:]
    if not loc and ":" in msg:  # a bound checked on the whole object names its own field
        return msg
    return f"{'.'.join(loc) or 'line'}: {msg}"


def spec_error(exc: ValidationError) -> str:
    """One line for a refused spec: every bad field (``field: why``), joined by ``; `` (pydantic's
    own message spans several lines per field)."""
    return "; ".join(_field_error(err) for err in exc.errors())


def parse_spec(obj: Any, where: str = "") -> PromptSpec:
    """A spec from one JSON value (a bare string is a prompt); ``where`` (a file and line)
    prefixes the one-line error."""
    prefix = f"{where}: " if where else ""
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        raise InputError(f"{prefix}expected a JSON object with a 'prompt' field")
    try:
        return PromptSpec.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"{prefix}{spec_error(exc)}") from exc


class AttributePayload(BaseModel):
    """One spec of an ``attribute`` message."""

    model_config = ConfigDict(extra="forbid")

    spec: PromptSpec
    job_id: str | None = None
    item: int | None = None
    """Index of the item in its job (the job record key is ``{job_id}/{item}``)."""
    enqueued_at: float | None = None
    """Unix time the message was sent (queueing time is measured from it)."""


class IngestPayload(BaseModel):
    """One artifact of an ``ingest`` message."""

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
    image_tags: list[str] = Field(default_factory=list)
    """Tags of the prompt's image, for its ``Image`` node."""


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
