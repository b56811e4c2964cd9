"""The attribution graph object and its pickle-free artifact.

A :class:`Graph` is the hand-off between computing (``atlas.attribution``) and storing
(``atlas.store``): the engine returns one, the artifact store keeps it as one safetensors file,
ingestion reads it back. It is columnar: one row per node, one row per edge.

Node layout (the reference's order, kept so indices mean the same thing everywhere)::

    [ features (sorted by layer, pos, feature) | errors (layer-major: l * n_pos + p) |
      tokens (one per position) | logits (k targets, most probable first) ]

Edges are a sparse list of ``(target, source, weight)`` with ``weight = A[target, source]``, the
raw direct effect of the source on the target (a feature's pre-activation or a logit's demeaned
value). Rows are targets, columns are sources, as in the reference's adjacency matrix.

Node ids (interchange JSON, also the per-prompt node key in Neo4j):

    feature  ``{layer}_{feature}_{pos}``
    error    ``{layer}_-1_{pos}``          (never collides with a feature id, whose feature >= 0;
                                            circuit-tracer 0.5.0's ``0_{layer}_{pos}`` does, #78)
    token    ``E_{token_id}_{pos}``
    logit    ``{n_layers + 1}_{token_id}_{pos}``   (pos = last position)

Artifact format: one ``.safetensors`` file whose tensors are the columns below and whose header
metadata holds ``{"atlas.graph": <GraphMetadata JSON>}``. No pickle anywhere.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from atlas.errors import InputError

ARTIFACT_FORMAT_VERSION = 1
_META_KEY = "atlas.graph"


class NodeKind(enum.IntEnum):
    FEATURE = 0
    ERROR = 1
    TOKEN = 2
    LOGIT = 3


class ModelInfo(BaseModel):
    """Provenance of the model a graph was computed on."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Hub id or local path as the user gave it."""
    family: str
    """Adapter family (gemma2, gemma3, llama, qwen2, qwen3, gpt2)."""
    revision: str | None = None
    """Hub revision, or a content hash of the local weights."""
    n_layers: int
    d_model: int
    vocab_size: int


class TranscoderInfo(BaseModel):
    """Provenance of the transcoder set."""

    model_config = ConfigDict(extra="forbid")

    name: str
    """Path or reference as the user gave it."""
    kind: str
    """``transcoder_set`` (per layer) or ``cross_layer_transcoder``."""
    content_hash: str
    """Hash of the transcoder files: the identity of the set (features are unique per set)."""
    d_transcoder: int
    feature_input_hook: str = ""
    feature_output_hook: str = ""


class AttributionSettings(BaseModel):
    """The knobs that change a graph (part of the prompt's content hash)."""

    model_config = ConfigDict(extra="forbid")

    max_n_logits: int = 10
    desired_logit_prob: float = 0.95
    max_feature_nodes: int | None = None
    explicit_logit_tokens: list[int] | None = None
    node_threshold: float = 0.8
    edge_threshold: float = 0.98
    pruned: bool = True
    dtype: str = "float32"


class GraphMetadata(BaseModel):
    """Everything about a graph that is not a tensor."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = ARTIFACT_FORMAT_VERSION
    prompt: str
    """The prompt text (for image prompts: the text part)."""
    image_sha256: str | None = None
    """Content hash of the image for image+text prompts."""
    tokens: list[str]
    """Decoded text of each input token (BOS included)."""
    model: ModelInfo
    transcoders: TranscoderInfo
    settings: AttributionSettings
    replacement_score: float | None = None
    completeness_score: float | None = None
    code_version: str = ""
    elapsed_s: float | None = None
    created_at: str | None = None
    extra: dict[str, Any] = Field(default_factory=dict)
    """Free-form provenance (e.g. where an imported JSON came from)."""

    def prompt_id(self) -> str:
        """Content hash of model, transcoders, input and settings: the prompt's identity."""
        key = {
            "model": [self.model.name, self.model.revision],
            "transcoders": self.transcoders.content_hash,
            "prompt": self.prompt,
            "image": self.image_sha256,
            "settings": self.settings.model_dump(mode="json"),
        }
        blob = json.dumps(key, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]


@dataclass
class Graph:
    """A (possibly pruned) attribution graph for one prompt.

    Node columns (length ``n_nodes``):
        kind        int8   NodeKind
        layer       int32  feature/error: layer; token: -1; logit: n_layers
        pos         int32  token position (logits: the last position)
        feature     int64  feature index (features), -1 otherwise
        token_id    int64  vocabulary id (tokens, logits), -1 otherwise
        activation  float32 feature activation (0 for other kinds)
        influence   float32 cumulative influence from pruning (NaN when not computed)
        logit_prob  float32 probability of a logit target (0 for other kinds)
    Edge columns (length ``n_edges``):
        edge_target int64, edge_source int64 (node indices), edge_weight float32 (= A[t, s])
    """

    metadata: GraphMetadata
    input_ids: torch.Tensor
    kind: torch.Tensor
    layer: torch.Tensor
    pos: torch.Tensor
    feature: torch.Tensor
    token_id: torch.Tensor
    activation: torch.Tensor
    influence: torch.Tensor
    logit_prob: torch.Tensor
    edge_target: torch.Tensor
    edge_source: torch.Tensor
    edge_weight: torch.Tensor
    _node_ids: list[str] | None = field(default=None, repr=False, compare=False)

    _NODE_COLUMNS = (
        ("kind", torch.int8),
        ("layer", torch.int32),
        ("pos", torch.int32),
        ("feature", torch.int64),
        ("token_id", torch.int64),
        ("activation", torch.float32),
        ("influence", torch.float32),
        ("logit_prob", torch.float32),
    )
    _EDGE_COLUMNS = (
        ("edge_target", torch.int64),
        ("edge_source", torch.int64),
        ("edge_weight", torch.float32),
    )

    def __post_init__(self) -> None:
        n = self.kind.shape[0]
        for name, dtype in self._NODE_COLUMNS:
            col = getattr(self, name)
            if col.shape != (n,):
                raise InputError(f"graph column {name!r} has shape {tuple(col.shape)}, want ({n},)")
            setattr(self, name, col.to(dtype).contiguous())
        m = self.edge_target.shape[0]
        for name, dtype in self._EDGE_COLUMNS:
            col = getattr(self, name)
            if col.shape != (m,):
                raise InputError(f"graph column {name!r} has shape {tuple(col.shape)}, want ({m},)")
            setattr(self, name, col.to(dtype).contiguous())
        self.input_ids = self.input_ids.to(torch.int64).contiguous()
        if m and (int(self.edge_target.max()) >= n or int(self.edge_source.max()) >= n):
            raise InputError("graph edge refers to a node index out of range")
        if m and not bool(torch.isfinite(self.edge_weight).all()):
            raise InputError("graph has non-finite (NaN or inf) edge weights")

    # ------------------------------------------------------------------ accessors
    @property
    def n_nodes(self) -> int:
        return int(self.kind.shape[0])

    @property
    def n_edges(self) -> int:
        return int(self.edge_target.shape[0])

    @property
    def n_layers(self) -> int:
        return self.metadata.model.n_layers

    @property
    def prompt_id(self) -> str:
        return self.metadata.prompt_id()

    def node_ids(self) -> list[str]:
        """Interchange-JSON node id of every node (see the module docstring)."""
        if self._node_ids is None:
            self._node_ids = [
                node_id(NodeKind(k), lay, p, f, t, self.n_layers)
                for k, lay, p, f, t in zip(
                    self.kind.tolist(),
                    self.layer.tolist(),
                    self.pos.tolist(),
                    self.feature.tolist(),
                    self.token_id.tolist(),
                    strict=True,
                )
            ]
        return self._node_ids

    def dense_adjacency(self) -> torch.Tensor:
        """The ``(n_nodes, n_nodes)`` adjacency, rows = targets, columns = sources."""
        adj = torch.zeros(self.n_nodes, self.n_nodes, dtype=torch.float32)
        adj[self.edge_target, self.edge_source] = self.edge_weight
        return adj

    # ------------------------------------------------------------------ artifact IO
    def tensors(self) -> dict[str, torch.Tensor]:
        names = (
            ["input_ids"] + [n for n, _ in self._NODE_COLUMNS] + [n for n, _ in self._EDGE_COLUMNS]
        )
        return {n: getattr(self, n) for n in names}

    def save(self, path: str | Path) -> Path:
        """Write the artifact atomically (temp file + rename) and return its path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".safetensors")
        os.close(fd)
        try:
            save_file(self.tensors(), tmp, metadata={_META_KEY: self.metadata.model_dump_json()})
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Graph:
        """Read an artifact written by :meth:`save`. Raises :class:`InputError` on bad files."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise InputError(f"no graph artifact at {path}")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises several unrelated types
            raise InputError(f"{path} is not a readable graph artifact: {exc}") from exc
        if _META_KEY not in meta:
            raise InputError(f"{path} is a safetensors file but not a Circuit Atlas graph")
        try:
            metadata = GraphMetadata.model_validate_json(meta[_META_KEY])
            return cls(metadata=metadata, **tensors)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{path}: malformed graph artifact: {exc}") from exc


def node_id(
    kind: NodeKind, layer: int, pos: int, feature: int, token_id: int, n_layers: int
) -> str:
    """The interchange-JSON id of one node."""
    if kind == NodeKind.FEATURE:
        return f"{layer}_{feature}_{pos}"
    if kind == NodeKind.ERROR:
        return f"{layer}_-1_{pos}"
    if kind == NodeKind.TOKEN:
        return f"E_{token_id}_{pos}"
    return f"{n_layers + 1}_{token_id}_{pos}"


def artifact_path(artifact_dir: str | Path, prompt_id: str) -> Path:
    """Where the content-addressed artifact of a prompt lives in the artifact store."""
    return Path(artifact_dir) / prompt_id[:2] / f"{prompt_id}.safetensors"
