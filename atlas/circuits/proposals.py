"""Supernode proposals from an atlas: clustering features seen across many prompts (pure numpy,
scipy and scikit-learn; no database).

Three similarities between two features, each in [0, 1]:

* **co-activation**: the mean of two Jaccard indices, over the prompts where each is active and
  over the (prompt, position) pairs where each is active (features that fire together, at the
  same tokens);
* **shared edges**: the cosine of their aggregated edge profiles (mean weight to every
  downstream feature, then from every upstream one, in the atlas' ``AGG`` layer), clipped at 0:
  features that feed the same targets with the same sign and are fed by the same sources;
* **decoder direction** (when decoders are given): the cosine of their decoder rows, clipped
  at 0.

Their weighted mean is the similarity; average-linkage agglomerative clustering
(:class:`sklearn.cluster.AgglomerativeClustering`, precomputed distance ``1 - similarity``) cut
at ``distance_threshold`` gives the groups. Each group of at least ``min_size`` features is a
:class:`Proposal` with scores:

* ``coactivation``: the mean pairwise prompt-level Jaccard of its members;
* ``coherence``: Anthropic's rule, "members promote each other; their downstream effects share a
  sign": the mean of (a) the positive share ``sum max(w, 0) / sum |w|`` of the aggregated edges
  between members and (b) for every outside feature fed by two or more members, the sign
  agreement ``|sum w| / sum |w|`` of their mean weights, weighted by ``sum |w|`` (either part
  alone when the other has no edge; ``None`` with neither);
* ``n_prompts``: prompts where a member is active; ``score``: ``coactivation * coherence``
  (co-activation alone without edges), the ranking.

The name comes from the members' labels: their most frequent words (each member counted once).

**Concepts** (:func:`concepts`, a second level): those tight groups are pure but small, since a
concept such as "hand" is read by features of different roles at different positions. The
second level groups the first-level groups and the unclustered candidates by what they share
regardless of position: each candidate's occurrences across prompts and the input tokens it
fires on (its rows of ``prompt_occ`` and ``token_occ`` side by side), TF-IDF weighted
(:class:`sklearn.feature_extraction.text.TfidfTransformer`) and reduced to ``concept_dims``
latent dimensions (:class:`sklearn.decomposition.TruncatedSVD`: latent semantic analysis, so
features met in the same kind of prompt are close even when they rarely meet in one prompt),
centred. The similarity is the mean of the cosine of those embeddings (clipped at 0) and the
larger of two direct cosines: of the prompt occurrences (features of one concept that fire in
the same prompts at different positions) and of the TF-IDF input-token profiles (features that
read the same tokens); averaged with the decoder cosine when decoders are given. A unit's
distance to another is the mean over their member pairs, and
average-linkage clustering of the units cut at ``concept_threshold`` gives the concepts. A
first-level group is never split, so the two levels nest; a concept is kept when it joins at
least two units, one of them a first-level group, and has ``min_size`` to ``max_concept_size``
members. Concepts are scored like
the first level.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
from scipy import sparse

from atlas.errors import InputError

T = TypeVar("T")


@dataclass
class ProposalInputs:
    """What the clustering reads, as arrays.

    ``fids``: the candidate features (rows); ``prompt_occ`` ``(n, n_prompts)`` and ``pos_occ``
    ``(n, n_units)``: binary sparse occurrence matrices (a unit is one (prompt, position));
    ``edges``: aggregated edges ``(source, target, mean_w, n_prompts)`` between any features
    (candidates or not: outside neighbours make the profiles); ``labels`` the candidates'
    labels; ``decoder`` ``(n, d)`` their decoder rows, or ``None``.
    """

    fids: list[str]
    prompt_occ: sparse.csr_matrix
    pos_occ: sparse.csr_matrix
    edges: list[tuple[str, str, float, int]] = field(default_factory=list)
    labels: list[str | None] = field(default_factory=list)
    decoder: np.ndarray | None = None
    layers: list[int] = field(default_factory=list)
    #: ``(n, n_tokens)`` counts of the input tokens at each candidate's active positions
    token_occ: sparse.csr_matrix | None = None


@dataclass(frozen=True)
class ProposalSettings:
    """Knobs of :func:`propose` (weights of the three similarities, the cut, group sizes)."""

    w_coactivation: float = 0.5
    w_edges: float = 0.35
    w_decoder: float = 0.15
    distance_threshold: float = 0.6
    min_size: int = 2
    max_size: int = 64
    concept_threshold: float = 0.7
    concept_dims: int = 16
    max_concept_size: int = 256


@dataclass
class Proposal:
    """One proposed group: members (fids), a name from their labels, scores."""

    members: list[str]
    name: str
    coactivation: float
    coherence: float | None
    internal_positive: float | None
    downstream_agreement: float | None
    n_prompts: int
    score: float
    validation: dict[str, float] | None = None
    #: 1: a tight group (:func:`propose`); 2: a concept (:func:`concepts`)
    level: int = 1
    #: for a concept: the indices of its first-level parts in the list given to :func:`concepts`
    parts: list[int] = field(default_factory=list)


def jaccard(occ: sparse.csr_matrix) -> np.ndarray:
    """Dense ``(n, n)`` Jaccard indices of the rows of a binary sparse matrix."""
    occ = sparse.csr_matrix((occ > 0).astype(np.float64))
    inter = np.asarray((occ @ occ.T).todense())
    size = np.asarray(occ.sum(axis=1)).ravel()
    union = size[:, None] + size[None, :] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(union > 0, inter / union, 0.0)
    return out


def _cosine(m: np.ndarray | sparse.csr_matrix) -> np.ndarray:
    if sparse.issparse(m):
        m = sparse.csr_matrix(m, dtype=np.float64)
        norms = np.sqrt(np.asarray(m.multiply(m).sum(axis=1)).ravel())
        dots = np.asarray((m @ m.T).todense())
    else:
        m = np.asarray(m, dtype=np.float64)
        norms = np.linalg.norm(m, axis=1)
        dots = m @ m.T
    denom = norms[:, None] * norms[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(denom > 0, dots / denom, 0.0)


def edge_profiles(
    fids: Sequence[str], edges: Sequence[tuple[str, str, float, int]]
) -> sparse.csr_matrix:
    """``(n, 2 m)``: each candidate's mean weight to (first ``m`` columns) and from (last ``m``)
    every feature that any edge names."""
    index = {f: i for i, f in enumerate(fids)}
    names: dict[str, int] = {}
    rows, cols, vals = [], [], []
    for s, t, _w, _ in edges:
        for f in (s, t):
            names.setdefault(f, len(names))
    m = len(names)
    for s, t, w, _ in edges:
        if s in index:
            rows.append(index[s])
            cols.append(names[t])
            vals.append(w)
        if t in index:
            rows.append(index[t])
            cols.append(m + names[s])
            vals.append(w)
    return sparse.csr_matrix(
        (np.asarray(vals, dtype=np.float64), (rows, cols)), shape=(len(fids), 2 * max(m, 1))
    )


def similarity(inputs: ProposalInputs, settings: ProposalSettings) -> np.ndarray:
    """The weighted similarity ``(n, n)`` of the candidates (see the module docstring)."""
    n = len(inputs.fids)
    if inputs.prompt_occ.shape[0] != n or inputs.pos_occ.shape[0] != n:
        raise InputError("occurrence matrices do not match the candidate features")
    parts = [
        (settings.w_coactivation, 0.5 * (jaccard(inputs.prompt_occ) + jaccard(inputs.pos_occ)))
    ]
    if inputs.edges and settings.w_edges > 0:
        parts.append(
            (settings.w_edges, np.clip(_cosine(edge_profiles(inputs.fids, inputs.edges)), 0, 1))
        )
    if inputs.decoder is not None and settings.w_decoder > 0:
        if inputs.decoder.shape[0] != n:
            raise InputError("decoder rows do not match the candidate features")
        parts.append((settings.w_decoder, np.clip(_cosine(inputs.decoder), 0, 1)))
    total = sum(w for w, _ in parts)
    if total <= 0:
        raise InputError("the similarity weights must not all be zero")
    sim: np.ndarray = sum(w * s for w, s in parts) / total
    np.fill_diagonal(sim, 1.0)
    return sim


def cluster(sim: np.ndarray, settings: ProposalSettings) -> list[list[int]]:
    """Groups of candidate indices (average linkage on ``1 - sim``), largest first."""
    n = sim.shape[0]
    if n < 2:
        return []
    from sklearn.cluster import AgglomerativeClustering

    dist = np.clip(1.0 - sim, 0.0, None)
    dist = 0.5 * (dist + dist.T)
    np.fill_diagonal(dist, 0.0)
    model = AgglomerativeClustering(
        n_clusters=None,
        metric="precomputed",
        linkage="average",
        distance_threshold=settings.distance_threshold,
    )
    labels = model.fit_predict(dist)
    groups: dict[int, list[int]] = {}
    for i, lab in enumerate(labels.tolist()):
        groups.setdefault(int(lab), []).append(i)
    out = [g for g in groups.values() if settings.min_size <= len(g) <= settings.max_size]
    out.sort(key=lambda g: (-len(g), g[0]))
    return out


def coherence(
    members: Sequence[str], edges: Sequence[tuple[str, str, float, int]]
) -> tuple[float | None, float | None, float | None]:
    """``(coherence, internal positive share, downstream sign agreement)`` of a group."""
    group = set(members)
    pos = tot = 0.0
    by_target: dict[str, list[float]] = {}
    for s, t, w, _ in edges:
        if s in group and t in group:
            pos += max(w, 0.0)
            tot += abs(w)
        elif s in group:
            by_target.setdefault(t, []).append(w)
    internal = pos / tot if tot > 0 else None
    agree = weight = 0.0
    for ws in by_target.values():
        if len(ws) < 2:
            continue
        mass = sum(abs(w) for w in ws)
        if mass > 0:
            agree += abs(sum(ws))
            weight += mass
    downstream = agree / weight if weight > 0 else None
    parts = [x for x in (internal, downstream) if x is not None]
    return (sum(parts) / len(parts) if parts else None), internal, downstream


_WORD = re.compile(r"[^\W\d_]{2,}|\d+", re.UNICODE)
_STOP = {"on", "says", "sees", "image", "images", "the", "of", "and", "a", "an", "is", "has", "in"}


def name_from_labels(labels: Sequence[str | None], fallback: str, n_words: int = 2) -> str:
    """The members' most frequent label words (each member counted once), joined by ``/``."""
    counts: Counter[str] = Counter()
    first: dict[str, int] = {}
    for label in labels:
        if not label:
            continue
        words = [
            w for w in dict.fromkeys(x.lower() for x in _WORD.findall(label)) if w not in _STOP
        ]
        for w in words:
            counts[w] += 1
            first.setdefault(w, len(first))
    if not counts:
        return fallback
    best = sorted(counts, key=lambda w: (-counts[w], first[w]))[:n_words]
    return "/".join(best)


class _Scorer:
    """Scores and names groups of candidate indices (shared by both levels)."""

    def __init__(self, inputs: ProposalInputs) -> None:
        self.inputs = inputs
        self.prompt_j = jaccard(inputs.prompt_occ)
        self.labels = inputs.labels or [None] * len(inputs.fids)
        self.occ = sparse.csr_matrix(inputs.prompt_occ > 0)

    def __call__(self, group: list[int], level: int = 1) -> Proposal:
        members = [self.inputs.fids[i] for i in group]
        sub = self.prompt_j[np.ix_(group, group)]
        k = len(group)
        coact = float((sub.sum() - np.trace(sub)) / (k * (k - 1)))
        coh, internal, downstream = coherence(members, self.inputs.edges)
        n_prompts = int((np.asarray(self.occ[group].sum(axis=0)).ravel() > 0).sum())
        fallback = "features " + ",".join(
            m.rsplit("/", 2)[-2] + "/" + m.rsplit("/", 1)[-1] for m in members[:3]
        )
        return Proposal(
            members=sorted(members),
            name=name_from_labels([self.labels[i] for i in group], fallback),
            coactivation=coact,
            coherence=coh,
            internal_positive=internal,
            downstream_agreement=downstream,
            n_prompts=n_prompts,
            score=coact * (coh if coh is not None else 1.0),
            level=level,
        )


def propose(inputs: ProposalInputs, settings: ProposalSettings | None = None) -> list[Proposal]:
    """Proposals from the candidates, best ``score`` first."""
    settings = settings or ProposalSettings()
    if not inputs.fids:
        return []
    sim = similarity(inputs, settings)
    score = _Scorer(inputs)
    out = [score(group) for group in cluster(sim, settings)]
    out.sort(key=lambda p: (-p.score, -len(p.members), p.members[0]))
    return out


def concept_similarity(inputs: ProposalInputs, settings: ProposalSettings) -> np.ndarray:
    """The second level's position-free similarity ``(n, n)`` (see the module docstring)."""
    from sklearn.decomposition import TruncatedSVD
    from sklearn.feature_extraction.text import TfidfTransformer

    n = len(inputs.fids)
    blocks = [sparse.csr_matrix(inputs.prompt_occ > 0, dtype=np.float64)]
    if inputs.token_occ is not None:
        if inputs.token_occ.shape[0] != n:
            raise InputError("token occurrences do not match the candidate features")
        blocks.append(sparse.csr_matrix(inputs.token_occ, dtype=np.float64))
    x = TfidfTransformer().fit_transform(sparse.hstack(blocks).tocsr())
    dims = min(settings.concept_dims, n - 1, x.shape[1] - 1)
    emb = TruncatedSVD(dims, random_state=0).fit_transform(x) if dims >= 1 else x.toarray()
    emb = emb - emb.mean(axis=0)  # centred: the shared first component would join everything
    # the larger of: fired in the same prompts (any position); read the same tokens
    shared = _cosine(blocks[0])
    if len(blocks) > 1:
        shared = np.maximum(shared, _cosine(x[:, blocks[0].shape[1] :]))
    sim = 0.5 * (np.clip(_cosine(emb), 0, 1) + shared)
    if inputs.decoder is not None and settings.w_decoder > 0:
        if inputs.decoder.shape[0] != n:
            raise InputError("decoder rows do not match the candidate features")
        sim = 0.5 * (sim + np.clip(_cosine(inputs.decoder), 0, 1))
    np.fill_diagonal(sim, 1.0)
    return sim


def concepts(
    inputs: ProposalInputs,
    proposals: Sequence[Proposal],
    settings: ProposalSettings | None = None,
) -> list[Proposal]:
    """Second-level proposals (``level`` 2) over the first-level ``proposals`` of the same
    ``inputs`` and the candidates in none of them; each concept's ``parts`` index
    ``proposals``. Best ``score`` first."""
    settings = settings or ProposalSettings()
    n = len(inputs.fids)
    if n < 3 or not proposals:  # a concept extends at least one tight group
        return []
    from sklearn.cluster import AgglomerativeClustering

    index = {f: i for i, f in enumerate(inputs.fids)}
    units: list[list[int]] = []
    unit_part: list[int | None] = []
    placed: set[int] = set()
    for k, prop in enumerate(proposals):
        members = [index[m] for m in prop.members if m in index and index[m] not in placed]
        if members:
            units.append(members)
            unit_part.append(k)
            placed.update(members)
    for i in range(n):
        if i not in placed:
            units.append([i])
            unit_part.append(None)
    if len(units) < 2:
        return []
    dist = 1.0 - concept_similarity(inputs, settings)
    rows = [u for unit in units for u in unit]
    cols = [k for k, unit in enumerate(units) for _ in unit]
    vals = [1.0 / len(unit) for unit in units for _ in unit]
    avg = sparse.csr_matrix((vals, (cols, rows)), shape=(len(units), n))
    unit_dist = np.asarray(avg @ (avg @ dist).T)  # mean distance over member pairs
    unit_dist = np.clip(0.5 * (unit_dist + unit_dist.T), 0.0, None)
    np.fill_diagonal(unit_dist, 0.0)
    labels = AgglomerativeClustering(
        n_clusters=None,
        metric="precomputed",
        linkage="average",
        distance_threshold=settings.concept_threshold,
    ).fit_predict(unit_dist)
    joined: dict[int, list[int]] = {}
    for k, lab in enumerate(labels.tolist()):
        joined.setdefault(int(lab), []).append(k)
    score = _Scorer(inputs)
    out = []
    for ks in joined.values():
        group = sorted(i for k in ks for i in units[k])
        if len(ks) < 2 or not settings.min_size <= len(group) <= settings.max_concept_size:
            continue
        parts = sorted(p for k in ks if (p := unit_part[k]) is not None)
        if not parts:  # a concept extends at least one tight group
            continue
        concept = score(group, level=2)
        concept.parts = parts
        out.append(concept)
    out.sort(key=lambda p: (-p.score, -len(p.members), p.members[0]))
    return out


def precision_recall(proposed: Sequence[str], reference: Sequence[str]) -> tuple[float, float]:
    """Precision and recall of a proposed member set against a reference set."""
    p, r = set(proposed), set(reference)
    hit = len(p & r)
    return (hit / len(p) if p else math.nan), (hit / len(r) if r else math.nan)


def best_match(
    proposals: Sequence[T],
    reference: Sequence[str],
    members: Callable[[T], Sequence[str]] = lambda p: p.members,  # type: ignore[attr-defined]
) -> tuple[T | None, float, float]:
    """The proposal of highest F1 against ``reference`` with its precision and recall;
    ``members`` reads a proposal's members (default: a :class:`Proposal`'s)."""
    best: tuple[T | None, float, float, float] = (None, math.nan, math.nan, -1.0)
    for prop in proposals:
        prec, rec = precision_recall(members(prop), reference)
        f1 = 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0
        if f1 > best[3]:
            best = (prop, prec, rec, f1)
    return best[0], best[1], best[2]
