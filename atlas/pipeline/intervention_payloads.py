"""What an intervention request is: :class:`InterventionSpec`, strict JSON like every payload.

A spec names the model and transcoders, the prompt (and optionally its image), the feature edits
by mode, and the optional supernode, donor and constraint. Its content hash is the stored
``Intervention`` node's id, so running the same spec twice stores one node.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from atlas.errors import InputError
from atlas.pipeline.payloads import MAX_PROMPT_CHARS, spec_error

Mode = Literal["set", "scale", "add", "ablate"]

#: The ``source`` of an intervention job's record (how a retry knows its items' kind).
INTERVENE_SOURCE = "intervene"


def _finite(value: float, what: str) -> float:
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite, got {value!r}")
    return value


class EditSpec(BaseModel):
    """One feature edit: feature ``feature`` of layer ``layer`` at ``pos`` by ``mode``.

    ``pos`` is a position of the model's token sequence (BOS included), ``"last"``, or ``"P:"``
    (every position from P on, generated tokens included).
    """

    model_config = ConfigDict(extra="forbid")

    layer: int = Field(ge=0)
    pos: int | str
    feature: int = Field(ge=0)
    mode: Mode = "set"
    amount: float = 0.0

    @field_validator("pos")
    @classmethod
    def _position(cls, pos: int | str) -> int | str:
        """Only ``"last"`` and ``"P:"`` strings mean anything to the engine."""
        if isinstance(pos, str) and pos != "last":
            head = pos.removesuffix(":")
            if not pos.endswith(":") or not head.lstrip("-").isdigit():
                raise ValueError(f"position must be an integer, 'last' or 'P:', not {pos!r}")
        return pos

    @field_validator("amount")
    @classmethod
    def _amount(cls, amount: float) -> float:
        return _finite(amount, "amount")

    def position(self) -> int | slice:
        """The position as the compute core takes it (``last`` is -1)."""
        if self.pos == "last":
            return -1
        if isinstance(self.pos, str):
            return slice(int(self.pos[:-1]), None)
        return self.pos


class SupernodeEdit(BaseModel):
    """Every member of a stored supernode active in this prompt, times ``multiplier``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    multiplier: float = 0.0

    @field_validator("multiplier")
    @classmethod
    def _multiplier(cls, m: float) -> float:
        return _finite(m, "supernode multiplier")


class InterventionSpec(BaseModel):
    """One intervention on one prompt (a job item, a Celery message, the stored spec)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    transcoders: str | None = None
    image: str | None = None
    """The image of an image + text prompt: a file path readable where the work runs, or
    ``sha256:<hex>`` of an image in the artifact store (what queued specs carry)."""
    edits: list[EditSpec] = Field(default_factory=list)
    supernode: SupernodeEdit | None = None
    donor: str | None = None
    """A stored prompt's id, or a donor prompt's text (its activations of the edited features
    replace the recipient's)."""
    patch_image_tokens: bool = False
    """With a donor: patch every transcoder feature at the donor's image-token positions (those
    active in the donor or in the recipient there), besides the features the edits name."""
    donor_image: str | None = None
    """The image of a donor given by text (a path or ``sha256:<hex>``); a donor given by id
    brings its own stored image."""
    constrained: tuple[int, int] | None = None
    """Layers ``a`` through ``b`` inclusive with frozen MLP outputs; unset: iterative."""
    freeze_attention: bool = True
    generate: int = Field(default=0, ge=0, le=512)
    watch: list[str] = Field(default_factory=list, max_length=32)
    """Tokens (one vocabulary token each) whose last-position probability before and after,
    and whose demeaned-logit change measured and predicted by the graph, the answer reports."""
    store: bool = False

    @field_validator("constrained")
    @classmethod
    def _range(cls, r: tuple[int, int] | None) -> tuple[int, int] | None:
        if r is not None and not 0 <= r[0] <= r[1]:
            raise ValueError(f"constrained layers must be 0 <= a <= b, got {r[0]}:{r[1]}")
        return r

    def layer_range(self) -> range | None:
        """The constrained layers as the compute core takes them."""
        return (
            None
            if self.constrained is None
            else range(self.constrained[0], self.constrained[1] + 1)
        )

    def content_id(self) -> str:
        """The spec's content hash: what is asked, not whether it is stored."""
        body = self.model_dump(mode="json", exclude={"store"})
        text = json.dumps(body, sort_keys=True, separators=(",", ":"))
        return "iv-" + hashlib.sha256(text.encode()).hexdigest()[:32]


class InterventionPayload(BaseModel):
    """The ``atlas.gpu.intervene`` message: one spec and its job item."""

    model_config = ConfigDict(extra="forbid")

    spec: InterventionSpec
    job_id: str | None = None
    item: int | None = None


def parse_intervention(obj: Any) -> InterventionSpec:
    """A spec from JSON-like data; anything wrong is one line of :class:`InputError`."""
    try:
        return InterventionSpec.model_validate(obj)
    except ValidationError as exc:
        raise InputError(f"bad intervention: {spec_error(exc)}") from exc
