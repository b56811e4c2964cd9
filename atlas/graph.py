"""The attribution graph object and its pickle-free artifact.

A :class:`Graph` is the hand-off between computing (``atlas.attribution``) and storing
(``atlas.store``): the engine returns one, the artifact store keeps it as one safetensors file,
ingestion reads it back. It is columnar: one row per node, one row per edge.

Node layout (the reference's order, kept so indices mean the same thing everywhere)::

    [ features (sorted by layer, pos, feature) | errors (layer-major: l * n_pos + p) |
      tokens (one per position) | logits (k targets, most probable first) ]

An image + text prompt keeps this layout: the embedding node of an image soft token is the token
node at its position, with kind :attr:`NodeKind.IMAGE` (its vector is the projector's output row,
not a vocabulary embedding). The image's provenance, processor settings and rollout parameters are
:attr:`GraphMetadata.image`; the soft tokens' positions, their ``(row, col)`` on the pooled grid
and the rollout maps are the optional tensors ``image_positions`` ``(T,)``, ``image_grid``
``(T, 2)`` and ``rollout`` ``(T, rows, cols)`` (float32, unclipped). Text graphs have none of
them, and their artifacts are byte for byte what they were before images existed.

Edges are a sparse list of ``(target, source, weight)`` with ``weight = A[target, source]``, the
raw direct effect of the source on the target (a feature's pre-activation or a logit's demeaned
value). Rows are targets, columns are sources, as in the reference's adjacency matrix.

Node ids (interchange JSON, also the per-prompt node key in Neo4j):

    feature  ``{layer}_{feature}_{pos}``
    error    ``{layer}_-1_{pos}``          (never collides with a feature id, whose feature >= 0;
                                            circuit-tracer 0.5.0's ``0_{layer}_{pos}`` does, #78)
    token    ``E_{token_id}_{pos}``        (image soft tokens too, as the paper's viewer expects)
    logit    ``{n_layers + 1}_{token_id}_{pos}``   (pos = last position)

Node kinds (:class:`NodeKind`) are one table: code, Neo4j text and label, interchange
``feature_type`` and id format; the store's and the interchange's maps derive from it. Graphs are
built from columns by :meth:`Graph.from_columns` (the engine's result, the JSON importer, the
store's export and the synthetic generator all use it).

Artifact format: one ``.safetensors`` file whose tensors are the columns below and whose header
metadata holds ``{"atlas.graph": <GraphMetadata JSON>}``. No pickle anywhere. :meth:`Graph.load`
is the one reader (``atlas import`` and the ingest workers): it refuses, with one line naming the
file, every artifact that breaks this contract (:meth:`Graph.validate`) before anything is stored.

The module imports torch only inside the functions that need it, so the settings and metadata
models (and the kind table) load in processes that never touch a tensor.
"""

from __future__ import annotations

import enum
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Self, TypeAlias

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    ValidationError,
    model_serializer,
)

from atlas.errors import InputError

if TYPE_CHECKING:
    import torch

ARTIFACT_FORMAT_VERSION = 1
_META_KEY = "atlas.graph"


class NodeKind(enum.IntEnum):
    """The kinds of graph node, with everything that names a kind outside this module.

    Each member is one row ``(code, text, label, feature_type, id_format)``:

    code          the ``int8`` stored in the artifact's ``kind`` column
    text          the ``kind`` property of a stored node (Neo4j) and the word in queries
    label         the second Neo4j label of a stored node
    feature_type  the interchange JSON ``feature_type`` written for it
    id_format     its node id (:func:`node_id`); fields ``layer``, ``feature``, ``pos``,
                  ``token_id`` and ``logit_layer`` (``n_layers + 1``)

    The store's and the interchange's maps are derived from these rows, so a new kind is one row
    here plus whatever the new kind computes. ``IMAGE`` shares the token's ``feature_type`` and id
    format (the paper's viewer draws image soft tokens as embedding nodes ``E_{id}_{pos}``); the
    JSON importer tells them apart by the image fields our exporter writes beside them.
    """

    text: str
    label: str
    feature_type: str
    id_format: str

    # The defaults only let ``NodeKind(code)`` type-check: after class creation, calling the enum
    # looks a member up by its code and never reaches this method.
    def __new__(
        cls, code: int, text: str = "", label: str = "", feature_type: str = "", id_format: str = ""
    ) -> Self:
        member = int.__new__(cls, code)
        member._value_ = code
        member.text = text
        member.label = label
        member.feature_type = feature_type
        member.id_format = id_format
        return member

    FEATURE = (0, "feature", "FeatureNode", "cross layer transcoder", "{layer}_{feature}_{pos}")
    ERROR = (1, "error", "ErrorNode", "mlp reconstruction error", "{layer}_-1_{pos}")
    TOKEN = (2, "token", "TokenNode", "embedding", "E_{token_id}_{pos}")
    LOGIT = (3, "logit", "LogitNode", "logit", "{logit_layer}_{token_id}_{pos}")
    IMAGE = (4, "image", "ImageTokenNode", "embedding", "E_{token_id}_{pos}")

    @classmethod
    def from_text(cls, text: str) -> NodeKind:
        """The kind whose :attr:`text` is ``text`` (:class:`InputError` for an unknown one)."""
        for kind in cls:
            if kind.text == text:
                return kind
        raise InputError(f"unknown node kind {text!r}")


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
    """The knobs that change a graph: the single definition of their names and defaults.

    ``attribute()``, ``AttributionResult.to_graph()``, the CLI options and the job specs all read
    their defaults from here. The whole object is part of the prompt's content hash, so adding a
    field changes every prompt id.
    """

    model_config = ConfigDict(extra="forbid")

    max_n_logits: int = 10
    """At most this many logit targets."""
    desired_logit_prob: float = 0.95
    """Logit targets: the smallest top-probability prefix whose mass reaches this."""
    max_feature_nodes: int | None = None
    """Keep only the most influential features as graph rows (``None``: every active one)."""
    explicit_logit_tokens: list[int] | None = None
    """Use these token ids as logit targets instead of the top-probability ones."""
    node_threshold: float = 0.8
    """Pruning: keep feature and error nodes up to this share of cumulative influence."""
    edge_threshold: float = 0.98
    """Pruning: keep edges up to this share of cumulative edge score."""
    pruned: bool = True
    """Whether the graph was pruned (``False``: every node and non-zero edge)."""
    dtype: str = "float32"
    """The model's dtype when the graph was computed."""

    @classmethod
    def merged(cls, base: AttributionSettings | None = None, **knobs: Any) -> AttributionSettings:
        """``base`` (default: the defaults above) with every knob that is not ``None`` replaced.

        The engine's keyword arguments are shorthands for these fields; ``None`` means "not
        given", so a default lives only in this class.
        """
        start = base if base is not None else cls()
        given = {k: v for k, v in knobs.items() if v is not None}
        unknown = sorted(set(given) - set(cls.model_fields))
        if unknown:
            raise InputError(f"unknown attribution setting {unknown[0]!r}")
        try:
            return cls.model_validate({**start.model_dump(), **given})
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise InputError(f"attribution setting {where}: {first['msg']}") from exc


class ImageMeta(BaseModel):
    """The image of an image + text prompt, as its graph records it (the tensors aside)."""

    model_config = ConfigDict(extra="forbid")

    sha256: str | None
    """Hex sha256 of the image file's bytes: its address in the artifact store's image store
    (``None`` only for inputs built without a file)."""
    width: int | None = None
    height: int | None = None
    format: str | None = None
    """Pillow's format name of the file (PNG, JPEG, ...)."""
    n_tokens: int
    """Image soft tokens in the prompt (rows of ``image_positions``)."""
    processor: dict[str, Any] = Field(default_factory=dict)
    """The processor settings that made the pixels and the soft tokens (size, resample,
    rescale, mean and std, tokens per image, placeholder)."""
    rollout: dict[str, Any] | None = None
    """How the rollout maps were computed (method, grid, pooled grid, block, layers, head
    fraction, ...); ``None`` when the artifact holds no maps."""


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
    image: ImageMeta | None = None
    """The image of an image + text prompt (``None`` for text, and then not written at all)."""

    @model_serializer(mode="wrap")
    def _without_absent_image(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Leave ``image`` out of text graphs' metadata, so their artifacts, JSON and stored
        metadata stay exactly what they were before images existed."""
        data = handler(self)
        if isinstance(data, dict) and data.get("image") is None:
            data.pop("image", None)
        return data

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
    Image columns (image + text prompts only, ``T`` soft tokens; see the module docstring):
        image_positions int64 (T,), image_grid int64 (T, 2), rollout float32 (T, rows, cols)
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
    image_positions: torch.Tensor | None = None
    image_grid: torch.Tensor | None = None
    rollout: torch.Tensor | None = None
    _node_ids: list[str] | None = field(default=None, repr=False, compare=False)

    _NODE_COLUMNS = (
        ("kind", "int8"),
        ("layer", "int32"),
        ("pos", "int32"),
        ("feature", "int64"),
        ("token_id", "int64"),
        ("activation", "float32"),
        ("influence", "float32"),
        ("logit_prob", "float32"),
    )
    _EDGE_COLUMNS = (
        ("edge_target", "int64"),
        ("edge_source", "int64"),
        ("edge_weight", "float32"),
    )
    _IMAGE_TENSORS = (
        ("image_positions", "int64"),
        ("image_grid", "int64"),
        ("rollout", "float32"),
    )

    def __post_init__(self) -> None:
        import torch

        n = self.kind.shape[0]
        for name, dtype in self._NODE_COLUMNS:
            col = getattr(self, name)
            if col.shape != (n,):
                raise InputError(f"graph column {name!r} has shape {tuple(col.shape)}, want ({n},)")
            setattr(self, name, col.to(getattr(torch, dtype)).contiguous())
        m = self.edge_target.shape[0]
        for name, dtype in self._EDGE_COLUMNS:
            col = getattr(self, name)
            if col.shape != (m,):
                raise InputError(f"graph column {name!r} has shape {tuple(col.shape)}, want ({m},)")
            setattr(self, name, col.to(getattr(torch, dtype)).contiguous())
        self.input_ids = self.input_ids.to(torch.int64).contiguous()
        for name, dtype in self._IMAGE_TENSORS:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.detach().cpu().to(getattr(torch, dtype)).contiguous())
        for ends in (self.edge_target, self.edge_source) if m else ():
            low, high = torch.aminmax(ends)
            if int(low) < 0 or int(high) >= n:
                raise InputError("graph edge refers to a node index out of range")
        if m and not bool(torch.isfinite(self.edge_weight).all()):
            raise InputError("graph has non-finite (NaN or inf) edge weights")

    @classmethod
    def from_columns(
        cls,
        metadata: GraphMetadata,
        input_ids: ColumnLike,
        nodes: Mapping[str, ColumnLike],
        edges: Mapping[str, ColumnLike],
        image: Mapping[str, torch.Tensor | None] | None = None,
    ) -> Graph:
        """The one way to build a graph from columns (tensors or plain sequences).

        ``nodes`` holds the node columns by name (``kind`` as :class:`NodeKind` codes); the
        columns that only some kinds use may be left out: ``feature`` and ``token_id`` default
        to -1, ``activation`` and ``logit_prob`` to 0, ``influence`` to NaN (not computed).
        ``edges`` holds ``target``, ``source`` and ``weight``. Edges come out in the canonical
        order, sorted by ``(target, source)``. ``image`` holds an image prompt's
        ``image_positions``, ``image_grid`` and (optionally) ``rollout`` tensors.
        """
        import torch

        unknown_image = sorted(set(image or {}) - {name for name, _ in cls._IMAGE_TENSORS})
        if unknown_image:
            raise InputError(f"unknown graph image tensor {unknown_image[0]!r}")
        unknown = sorted(set(nodes) - {name for name, _ in cls._NODE_COLUMNS})
        if unknown:
            raise InputError(f"unknown graph node column {unknown[0]!r}")
        kind = _column(nodes["kind"], "int8")
        n = int(kind.shape[0])
        cols: dict[str, torch.Tensor] = {}
        for name, dtype in cls._NODE_COLUMNS:
            if name in nodes:
                cols[name] = _column(nodes[name], dtype)
            elif name in _NODE_DEFAULTS:
                cols[name] = torch.full((n,), _NODE_DEFAULTS[name], dtype=getattr(torch, dtype))
            else:
                raise InputError(f"graph node column {name!r} is required")
        target = _column(edges["target"], "int64")
        source = _column(edges["source"], "int64")
        weight = _column(edges["weight"], "float32")
        key = target * max(n, 1) + source if target.shape == source.shape else None
        if key is not None and key.numel() > 1 and not bool((key[1:] >= key[:-1]).all()):
            order = torch.argsort(key, stable=True)
            target, source = target[order], source[order]
            if weight.shape == order.shape:
                weight = weight[order]
        return cls(
            metadata=metadata,
            input_ids=_column(input_ids, "int64"),
            kind=cols["kind"],
            layer=cols["layer"],
            pos=cols["pos"],
            feature=cols["feature"],
            token_id=cols["token_id"],
            activation=cols["activation"],
            influence=cols["influence"],
            logit_prob=cols["logit_prob"],
            edge_target=target,
            edge_source=source,
            edge_weight=weight,
            image_positions=(image or {}).get("image_positions"),
            image_grid=(image or {}).get("image_grid"),
            rollout=(image or {}).get("rollout"),
        )

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
        import torch

        adj = torch.zeros(self.n_nodes, self.n_nodes, dtype=torch.float32)
        adj[self.edge_target, self.edge_source] = self.edge_weight
        return adj

    # ------------------------------------------------------------------ artifact IO
    def tensors(self) -> dict[str, torch.Tensor]:
        names = (
            ["input_ids"] + [n for n, _ in self._NODE_COLUMNS] + [n for n, _ in self._EDGE_COLUMNS]
        )
        out = {n: getattr(self, n) for n in names}
        for name, _ in self._IMAGE_TENSORS:
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

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
            metadata = _artifact_metadata(meta[_META_KEY])
            names = {"input_ids"} | {n for n, _ in cls._NODE_COLUMNS + cls._EDGE_COLUMNS}
            names |= set(tensors) & {n for n, _ in cls._IMAGE_TENSORS}
            if set(tensors) != names:
                odd = sorted(set(tensors) ^ names)
                raise InputError(f"wrong tensor set (missing or unexpected: {', '.join(odd)})")
            graph = cls(metadata=metadata, **tensors)
            graph.validate()
        except InputError as exc:
            raise InputError(f"{path}: malformed graph artifact: {exc}") from exc
        return graph

    def validate(self) -> None:
        """Refuse a graph whose columns contradict the layout contract (module docstring).

        The artifact path is trusted by nothing: ingestion writes what it reads, so every check
        the interchange JSON importer makes holds here too, before anything is stored.
        """
        import torch

        n_layers = self.n_layers
        n_pos = len(self.metadata.tokens)
        if n_layers < 1:
            raise InputError(f"metadata says {n_layers} layers")
        if int(self.input_ids.shape[0]) != n_pos:
            raise InputError(f"{int(self.input_ids.shape[0])} input ids for {n_pos} prompt tokens")
        known = torch.tensor([int(k) for k in NodeKind], dtype=torch.int8)
        bad = ~torch.isin(self.kind, known)
        if bool(bad.any()):
            raise InputError(f"unknown node kind {int(self.kind[bad][0])}")
        if self.n_nodes and (int(self.pos.min()) < 0 or int(self.pos.max()) >= n_pos):
            raise InputError(f"a node position lies outside the {n_pos} prompt tokens")
        _check_layers(self, NodeKind.FEATURE, 0, n_layers - 1)
        _check_layers(self, NodeKind.ERROR, 0, n_layers - 1)
        _check_layers(self, NodeKind.TOKEN, -1, -1)
        _check_layers(self, NodeKind.IMAGE, -1, -1)
        _check_layers(self, NodeKind.LOGIT, n_layers, n_layers)
        feats = self.kind == NodeKind.FEATURE
        if bool((self.feature[feats] < 0).any()):
            raise InputError("a feature node has a negative feature index")
        if not bool(torch.isfinite(self.activation[feats]).all()):
            raise InputError("a feature node has a non-finite activation")
        vocab_nodes = (
            (self.kind == NodeKind.TOKEN)
            | (self.kind == NodeKind.LOGIT)
            | (self.kind == NodeKind.IMAGE)
        )
        if bool((self.token_id[vocab_nodes] < 0).any()):
            raise InputError("a token or logit node has no vocabulary id")
        identity = torch.stack(
            [self.kind.long(), self.layer.long(), self.pos.long(), self.feature, self.token_id]
        )
        if self.n_nodes and torch.unique(identity, dim=1).shape[1] != self.n_nodes:
            raise InputError("two nodes have the same identity")
        pairs = self.edge_target * self.n_nodes + self.edge_source
        if int(torch.unique(pairs).numel()) != self.n_edges:
            raise InputError("duplicated edges (same target and source)")
        _check_image(self)


def node_id(
    kind: NodeKind, layer: int, pos: int, feature: int, token_id: int, n_layers: int
) -> str:
    """The interchange-JSON id of one node (its kind's :attr:`NodeKind.id_format`)."""
    return kind.id_format.format(
        layer=layer, feature=feature, pos=pos, token_id=token_id, logit_layer=n_layers + 1
    )


ColumnLike: TypeAlias = "torch.Tensor | Sequence[int] | Sequence[float]"
"""A column as :meth:`Graph.from_columns` accepts it."""

#: Node columns some kinds leave unset, and their value there.
_NODE_DEFAULTS: dict[str, float] = {
    "feature": -1,
    "token_id": -1,
    "activation": 0.0,
    "logit_prob": 0.0,
    "influence": math.nan,
}


def _column(values: ColumnLike, dtype: str) -> torch.Tensor:
    import torch

    if isinstance(values, torch.Tensor):
        return values.detach().cpu().to(getattr(torch, dtype))
    return torch.tensor(list(values), dtype=getattr(torch, dtype))


def _check_layers(graph: Graph, kind: NodeKind, low: int, high: int) -> None:
    layers = graph.layer[graph.kind == kind]
    if layers.numel() and (int(layers.min()) < low or int(layers.max()) > high):
        bad = int(layers[(layers < low) | (layers > high)][0])
        want = f"{low}" if low == high else f"{low}..{high}"
        raise InputError(
            f"a {kind.text} node at layer {bad} (want {want} for {graph.n_layers} layers)"
        )


def _check_image(graph: Graph) -> None:
    """An image prompt's tensors agree with its metadata and its nodes; a text graph has none.

    Positions ascend inside the prompt, the grid has one ``(row, col)`` per soft token, the image
    kind sits exactly at those positions (on the token block, whose nodes are never pruned), and
    the rollout has one map per soft token.
    """
    import torch

    meta = graph.metadata.image
    image_nodes = graph.kind == NodeKind.IMAGE
    if meta is None:
        if any(getattr(graph, name) is not None for name, _ in Graph._IMAGE_TENSORS):
            raise InputError("image tensors in a graph whose metadata has no image")
        if bool(image_nodes.any()):
            raise InputError("image token nodes in a graph whose metadata has no image")
        return
    if graph.metadata.image_sha256 != meta.sha256:
        raise InputError("metadata image_sha256 and image.sha256 differ")
    pos, grid = graph.image_positions, graph.image_grid
    if pos is None or grid is None:
        raise InputError("an image graph needs the image_positions and image_grid tensors")
    t = meta.n_tokens
    if tuple(pos.shape) != (t,) or tuple(grid.shape) != (t, 2):
        raise InputError(
            f"image tensors of shapes {tuple(pos.shape)} and {tuple(grid.shape)} "
            f"for {t} image tokens"
        )
    n_pos = len(graph.metadata.tokens)
    if t and (int(pos.min()) < 0 or int(pos.max()) >= n_pos or bool((pos[1:] <= pos[:-1]).any())):
        raise InputError("image positions must ascend inside the prompt")
    if t and int(grid.min()) < 0:
        raise InputError("negative image grid coordinates")
    if not torch.equal(torch.unique(graph.pos[image_nodes]), pos):
        raise InputError("image token nodes are not exactly at the image positions")
    _check_rollout(graph.rollout, meta.rollout, t)


def _check_rollout(maps: torch.Tensor | None, params: dict[str, Any] | None, t: int) -> None:
    import torch

    if maps is None:
        return
    if params is None:
        raise InputError("rollout maps without their parameters (metadata image.rollout)")
    if maps.dim() != 3 or int(maps.shape[0]) != t:
        raise InputError(f"rollout of shape {tuple(maps.shape)} for {t} image tokens")
    if not bool(torch.isfinite(maps).all()):
        raise InputError("rollout maps contain NaN or inf")


def _artifact_metadata(text: str) -> GraphMetadata:
    """The artifact's metadata, refusing a format version this code does not read."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"metadata is not JSON: {exc.msg}") from exc
    version = raw.get("format_version") if isinstance(raw, dict) else None
    if version != ARTIFACT_FORMAT_VERSION:
        raise InputError(
            f"unsupported artifact format version {version!r} "
            f"(this version reads {ARTIFACT_FORMAT_VERSION})"
        )
    try:
        return GraphMetadata.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(x) for x in first["loc"])
        raise InputError(f"metadata {where}: {first['msg']}") from exc


def artifact_path(artifact_dir: str | Path, prompt_id: str) -> Path:
    """Where the content-addressed artifact of a prompt lives in the artifact store."""
    return Path(artifact_dir) / prompt_id[:2] / f"{prompt_id}.safetensors"
