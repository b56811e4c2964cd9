"""The engine's output: :class:`AttributionResult`, and its conversion to :class:`atlas.graph.Graph`."""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import torch

import atlas
from atlas.attribution.pruning import compute_influence, cumulative_influence, graph_scores
from atlas.attribution.pruning import prune as prune_fn
from atlas.attribution.rollout import Rollout
from atlas.graph import (
    AttributionSettings,
    Graph,
    GraphMetadata,
    ImageMeta,
    ModelInfo,
    NodeKind,
    TranscoderInfo,
)
from atlas.images import ImageInfo


@dataclass
class ImageAttribution:
    """The image of an image + text prompt, as an artifact must keep it (``T`` soft tokens).

    Its soft tokens are ordinary positions of the graph: token node ``n_features + n_errors +
    positions[k]`` is image token ``k``'s embedding node (its vector: the projector's output
    row), and features and errors at those positions are nodes like any other.

    info        ImageInfo | None   sha256 of the file bytes (the content address), width, height,
                                   format (``None`` only for inputs built without a file)
    positions   (T,) int64         sequence position of each soft token, ascending
    grid        (T, 2) int64       ``(row, col)`` of each soft token on the pooled grid
                                   (row-major; LLaVA: the patch grid itself)
    settings    dict               JSON-ready processor settings (image processor class, size,
                                   resample, rescale, mean/std, pan-and-scan, tokens per image,
                                   placeholder)
    rollout     Rollout | None     attention-rollout maps, ``rollout.maps`` float32
                                   ``[T, grid, grid]`` (unclipped; map ``k`` for soft token ``k``)
                                   with their parameters in ``rollout.metadata()``; ``None``
                                   when not asked for
    """

    info: ImageInfo | None
    positions: torch.Tensor
    grid: torch.Tensor
    settings: dict[str, object]
    rollout: Rollout | None = None

    @property
    def n_tokens(self) -> int:
        return int(self.positions.shape[0])

    def metadata(self) -> ImageMeta:
        """What the graph's metadata records of the image (the tensors aside)."""
        info = self.info
        return ImageMeta(
            sha256=info.sha256 if info else None,
            width=info.width if info else None,
            height=info.height if info else None,
            format=info.format if info else None,
            n_tokens=self.n_tokens,
            processor=dict(self.settings),
            rollout=self.rollout.metadata() if self.rollout is not None else None,
        )

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The graph's image tensors: positions, grid and (when computed) the rollout maps."""
        return {
            "image_positions": self.positions.cpu(),
            "image_grid": self.grid.cpu(),
            "rollout": self.rollout.maps.cpu() if self.rollout is not None else None,
        }


@dataclass
class AttributionResult:
    """A full (unpruned) attribution graph for one prompt.

    Layout (the reference's; ``P = n_pos``, ``L = n_layers``, ``F = n_active``,
    ``S = n_selected``, ``k = n_logits``, ``N = S + L·P + P + k``):

    input_ids            (P,) int64       prompt tokens, a special token first
    active_features      (F, 3) int64     every active ``[layer, pos, feature]``, sorted
    activation_values    (F,) float32     their activations
    selected_features    (S,) int64       indices into ``active_features`` that are graph nodes
                                          (all of them unless ``max_feature_nodes`` was set)
    logit_tokens         (k,) int64       logit targets, most probable first
    logit_probabilities  (k,) float32     their probabilities
    adjacency            (N, N) float32   dense, rows = targets, columns = sources, nodes ordered
                                          ``[selected features | errors (l * P + p) | tokens |
                                          logits]``; ``adjacency[t, s]`` = raw direct effect of
                                          ``s`` on ``t``'s pre-activation (feature) or demeaned
                                          logit. Error, token rows are zero; logit columns zero.
    image                ImageAttribution | None   an image prompt's image: provenance,
                                          soft-token positions and grid, rollout maps (see
                                          :class:`ImageAttribution`); ``None`` for text
    """

    prompt: str
    tokens: list[str]
    input_ids: torch.Tensor
    active_features: torch.Tensor
    activation_values: torch.Tensor
    selected_features: torch.Tensor
    logit_tokens: torch.Tensor
    logit_probabilities: torch.Tensor
    adjacency: torch.Tensor
    model: ModelInfo
    transcoders: TranscoderInfo
    settings: AttributionSettings
    elapsed_s: float
    stats: dict[str, float] = field(default_factory=dict)
    image: ImageAttribution | None = None
    _influence: tuple[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    # ------------------------------------------------------------------ layout
    @property
    def n_pos(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def n_layers(self) -> int:
        return self.model.n_layers

    @property
    def n_features(self) -> int:
        """Feature nodes (selected features)."""
        return int(self.selected_features.shape[0])

    @property
    def n_errors(self) -> int:
        return self.n_layers * self.n_pos

    @property
    def n_logits(self) -> int:
        return int(self.logit_tokens.shape[0])

    @property
    def n_nodes(self) -> int:
        return int(self.adjacency.shape[0])

    def logit_weights(self) -> torch.Tensor:
        w = torch.zeros(self.n_nodes, dtype=torch.float32, device=self.adjacency.device)
        w[self.n_nodes - self.n_logits :] = self.logit_probabilities.float().to(w.device)
        return w

    def influence(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(node influence, inverse row sums)`` of the unpruned graph, computed once: pruning
        and both scores read them (recomputed if the adjacency was written to since)."""
        key = (id(self.adjacency), self.adjacency._version)
        cached = self._influence
        if cached is None or cached[0] != key:
            value = compute_influence(
                self.adjacency, self.logit_weights(), n_features=self.n_features
            )
            cached = (key, value)
            self._influence = cached
        return cached[1]

    def scores(self) -> tuple[float, float]:
        """``(replacement_score, completeness_score)``."""
        return graph_scores(
            self.adjacency,
            self.logit_weights(),
            self.n_features,
            self.n_errors,
            self.n_pos,
            influence=self.influence(),
        )

    # ------------------------------------------------------------------ graph
    def node_columns(self) -> dict[str, torch.Tensor]:
        """Per-node columns of :class:`atlas.graph.Graph` (unpruned, influence NaN)."""
        s, lp, p, k = self.n_features, self.n_errors, self.n_pos, self.n_logits
        feats = self.active_features[self.selected_features].cpu()
        acts = self.activation_values[self.selected_features].float().cpu()
        err_layer = torch.arange(self.n_layers).repeat_interleave(p)
        err_pos = torch.arange(p).repeat(self.n_layers)
        kind = torch.cat(
            [
                torch.full((s,), NodeKind.FEATURE),
                torch.full((lp,), NodeKind.ERROR),
                torch.full((p,), NodeKind.TOKEN),
                torch.full((k,), NodeKind.LOGIT),
            ]
        )
        layer = torch.cat(
            [feats[:, 0], err_layer, torch.full((p,), -1), torch.full((k,), self.n_layers)]
        )
        pos = torch.cat([feats[:, 1], err_pos, torch.arange(p), torch.full((k,), p - 1)])
        feature = torch.cat([feats[:, 2], torch.full((lp + p + k,), -1)])
        token_id = torch.cat(
            [torch.full((s + lp,), -1), self.input_ids.cpu(), self.logit_tokens.cpu()]
        )
        activation = torch.cat([acts, torch.zeros(lp + p + k)])
        logit_prob = torch.cat([torch.zeros(s + lp + p), self.logit_probabilities.float().cpu()])
        if self.image is not None:  # an image soft token's embedding node is an image node
            kind[s + lp + self.image.positions.cpu()] = NodeKind.IMAGE
        return {
            "kind": kind,
            "layer": layer,
            "pos": pos,
            "feature": feature,
            "token_id": token_id,
            "activation": activation,
            "logit_prob": logit_prob,
        }

    def to_graph(
        self,
        prune: bool | None = None,
        node_threshold: float | None = None,
        edge_threshold: float | None = None,
        *,
        settings: AttributionSettings | None = None,
    ) -> Graph:
        """Convert to a :class:`Graph` (influence column filled).

        Pruning follows ``settings`` (default: the settings the result was computed with, see
        :attr:`settings`); ``prune``, ``node_threshold`` and ``edge_threshold`` replace the
        fields ``pruned``, ``node_threshold`` and ``edge_threshold`` when given. Pruned: the
        nodes and edges :mod:`atlas.attribution.pruning` keeps; unpruned: every node and every
        non-zero edge.
        """
        knobs = AttributionSettings.merged(
            settings if settings is not None else self.settings,
            pruned=prune,
            node_threshold=node_threshold,
            edge_threshold=edge_threshold,
        )
        cols = self.node_columns()
        if knobs.pruned:
            res = prune_fn(
                self.adjacency,
                self.logit_weights(),
                self.n_pos,
                self.n_logits,
                self.n_features,
                node_threshold=knobs.node_threshold,
                edge_threshold=knobs.edge_threshold,
                influence=self.influence()[0],
            )
            cols["influence"] = res.cumulative_scores.float().cpu()
            keep = res.node_mask.cpu()
            edges = self._pruned_edges(res.edge_index, keep)
            cols = {name: col[keep] for name, col in cols.items()}
        else:  # every node: only the influence column is needed, not the cut
            cols["influence"] = cumulative_influence(self.influence()[0]).float().cpu()
            edges = self._all_edges()
        replacement, completeness = self.scores()
        image = self.image
        meta = GraphMetadata(
            prompt=self.prompt,
            image_sha256=image.info.sha256 if image is not None and image.info else None,
            image=image.metadata() if image is not None else None,
            tokens=self.tokens,
            model=self.model,
            transcoders=self.transcoders,
            settings=self.settings.model_copy(
                update={
                    "node_threshold": knobs.node_threshold,
                    "edge_threshold": knobs.edge_threshold,
                    "pruned": knobs.pruned,
                }
            ),
            replacement_score=replacement,
            completeness_score=completeness,
            code_version=atlas.__version__,
            elapsed_s=self.elapsed_s,
            created_at=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        )
        image_tensors = image.tensors() if image is not None else None
        return Graph.from_columns(meta, self.input_ids, cols, edges, image=image_tensors)

    def _pruned_edges(
        self, edge_index: torch.Tensor, keep: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """The kept edges' columns, renumbered to the kept nodes (zero weights dropped)."""
        new_index = torch.full((self.n_nodes,), -1, dtype=torch.long)
        new_index[keep] = torch.arange(int(keep.sum()))
        et, es = edge_index[0].cpu(), edge_index[1].cpu()
        weights = self.adjacency[edge_index[0], edge_index[1]].float().cpu()
        nz = weights != 0
        return {"target": new_index[et[nz]], "source": new_index[es[nz]], "weight": weights[nz]}

    def _all_edges(self, block: int = 1024) -> dict[str, torch.Tensor]:
        """Every non-zero entry of the adjacency, read in row blocks (no dense copy)."""
        et_l, es_l, w_l = [], [], []
        for i in range(0, self.n_nodes, block):
            blk = self.adjacency[i : i + block]
            t, s_ = torch.nonzero(blk, as_tuple=True)
            et_l.append((t + i).cpu())
            es_l.append(s_.cpu())
            w_l.append(blk[t, s_].float().cpu())
        return {"target": torch.cat(et_l), "source": torch.cat(es_l), "weight": torch.cat(w_l)}


__all__ = ["AttributionResult", "ImageAttribution"]
