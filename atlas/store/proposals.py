"""Supernode proposals in the atlas: read the arrays :mod:`atlas.circuits.proposals` clusters,
store its groups as supernodes of kind ``proposed`` with their scores, accept (rename) or reject
them, and validate one by ablating it on the real model.

What is read, for the prompts a filter selects (:mod:`atlas.store.prompt_filter`):

* every feature instance (feature, prompt, position): the occurrence matrices; features active
  in fewer than ``min_prompts`` prompts are dropped, and at most ``max_features`` (the most
  frequent) are clustered (the similarity is dense: ``max_features``\\ :sup:`2` floats);
* the aggregated edges (``AGG``) from and to the candidates seen in at least
  ``min_pair_prompts`` prompts. ``AGG`` sums over every stored prompt, not only the selected
  ones (it is the atlas' aggregate; the selection decides which features are candidates);
* the input tokens of the selected prompts (for the second level's token profiles);
* the candidates' labels (names), and optionally their decoder rows (given by the caller).

Both levels are stored (``P{rank} name`` tight groups, ``C{rank} name`` concepts with their
parts' names), all in one transaction with the removal of the earlier proposals: a failure
leaves the earlier ones in place and nothing new written. A new proposal run replaces the
earlier proposals (kind ``proposed``); accepted ones (kind ``accepted``) and hand-made
supernodes stay.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict
from typing import Any

import neo4j
import numpy as np
from scipy import sparse
from scipy.special import softmax

from atlas.circuits.proposals import (
    Proposal,
    ProposalInputs,
    ProposalSettings,
    concepts,
    propose,
)
from atlas.errors import InputError
from atlas.store import queries as Q
from atlas.store.connection import read_rows, write_rows, write_tx
from atlas.store.prompt_filter import select_prompts
from atlas.store.read import DEFAULT_TIMEOUT_S
from atlas.store.supernodes import define_in, validate_name

log = logging.getLogger(__name__)

PROPOSED = "proposed"
ACCEPTED = "accepted"
#: prompts per instance read (one statement each)
CHUNK = 200


def gather_inputs(
    driver: neo4j.Driver,
    prompt_ids: Sequence[str],
    *,
    min_prompts: int = 2,
    max_features: int = 2000,
    min_pair_prompts: int = 1,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    decoder: Callable[[list[str]], np.ndarray | None] | None = None,
) -> ProposalInputs:
    """The clustering's arrays for these prompts (see the module docstring)."""
    if min_prompts < 1 or max_features < 2 or min_pair_prompts < 1:
        raise InputError("--min-prompts and --min-pair-prompts must be >= 1, --max-features >= 2")

    def rows(query: str, params: dict[str, Any], what: str) -> list[dict[str, Any]]:
        return read_rows(driver, query, params, database=database, what=what, timeout_s=timeout_s)

    by_feature: dict[str, set[tuple[int, int]]] = {}
    p_index = {p: i for i, p in enumerate(prompt_ids)}
    tokens: dict[int, list[str]] = {}
    for start in range(0, len(prompt_ids), CHUNK):
        ids = list(prompt_ids[start : start + CHUNK])
        for r in rows(Q.PROP_FEATURE_INSTANCES, {"ids": ids}, "reading feature instances"):
            p = p_index[r["prompt"]]
            for ref, pos in zip(r["refs"], r["pos"], strict=True):
                by_feature.setdefault(ref, set()).add((p, int(pos)))
        for r in rows(Q.PROMPT_TOKENS, {"ids": ids}, "reading prompt tokens"):
            tokens[p_index[r["id"]]] = list(r["tokens"] or [])
    counts = {f: len({p for p, _ in occ}) for f, occ in by_feature.items()}
    fids = sorted((f for f, c in counts.items() if c >= min_prompts), key=lambda f: (-counts[f], f))
    if len(fids) > max_features:
        log.info("clustering the %d most frequent of %d features", max_features, len(fids))
        fids = fids[:max_features]
    fids.sort()
    units: dict[tuple[int, int], int] = {}
    vocab: dict[str, int] = {}
    pr, pc, ur, uc, tr, tc = [], [], [], [], [], []
    for i, f in enumerate(fids):
        for p, pos in by_feature[f]:
            ur.append(i)
            uc.append(units.setdefault((p, pos), len(units)))
            toks = tokens.get(p, [])
            if 0 <= pos < len(toks):
                tr.append(i)
                tc.append(vocab.setdefault(toks[pos], len(vocab)))
        for p in {p for p, _ in by_feature[f]}:
            pr.append(i)
            pc.append(p)
    n = len(fids)
    prompt_occ = sparse.csr_matrix((np.ones(len(pr)), (pr, pc)), shape=(n, max(len(prompt_ids), 1)))
    pos_occ = sparse.csr_matrix((np.ones(len(ur)), (ur, uc)), shape=(n, max(len(units), 1)))
    token_occ = sparse.csr_matrix((np.ones(len(tr)), (tr, tc)), shape=(n, max(len(vocab), 1)))
    edges: dict[tuple[str, str], tuple[float, int]] = {}
    for query in (Q.PROP_AGG_OUT, Q.PROP_AGG_IN):
        for start in range(0, n, 500):
            params = {"fids": fids[start : start + 500], "min_pair": min_pair_prompts}
            for r in rows(query, params, "reading aggregated edges"):
                edges[(r["s"], r["t"])] = (float(r["sum_w"]) / int(r["n"]), int(r["n"]))
    meta = {r["fid"]: r for r in rows(Q.PROP_FEATURE_META, {"fids": fids}, "feature labels")}
    return ProposalInputs(
        fids=fids,
        prompt_occ=prompt_occ,
        pos_occ=pos_occ,
        edges=[(s, t, w, k) for (s, t), (w, k) in sorted(edges.items())],
        labels=[meta.get(f, {}).get("label") for f in fids],
        decoder=decoder(fids) if decoder is not None and fids else None,
        layers=[int(meta.get(f, {}).get("layer") or 0) for f in fids],
        token_occ=token_occ,
    )


def proposal_names(
    proposals: Sequence[Proposal], prefix: str = "P", taken: Collection[str] = ()
) -> list[str]:
    """Stored names: ``P{rank} {name}`` (``C`` for concepts; unique within one run). A name in
    ``taken`` (an accepted or hand-made supernode) gets `` (2)``, `` (3)``... until free, so a
    new run never overwrites a supernode that is not a proposal."""
    used = set(taken)
    names = []
    for i, p in enumerate(proposals):
        base = f"{prefix}{i + 1} {p.name}"[:190]
        name, k = base, 1
        while name in used:
            k += 1
            name = f"{base} ({k})"
        used.add(name)
        names.append(validate_name(name))
    return names


def propose_supernodes(
    driver: neo4j.Driver,
    prompt_filter: str | None = None,
    *,
    min_prompts: int = 2,
    max_features: int = 2000,
    min_pair_prompts: int = 1,
    settings: ProposalSettings | None = None,
    limit: int = 50,
    store: bool = True,
    database: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    decoder: Callable[[list[str]], np.ndarray | None] | None = None,
    with_concepts: bool = True,
) -> list[dict[str, Any]]:
    """Propose supernodes over the prompts ``prompt_filter`` selects; with ``store`` they
    replace the earlier proposals in the atlas (one transaction). Returns one dict per
    proposal: the tight groups best first, then the concepts (``level`` 2, with ``parts``, the
    names of their stored first-level parts) best first; ``name``, ``members``, ``labels``,
    the scores. At most ``limit`` of each level."""
    ids = select_prompts(driver, prompt_filter, database=database, timeout_s=timeout_s)
    inputs = gather_inputs(
        driver,
        ids,
        min_prompts=min_prompts,
        max_features=max_features,
        min_pair_prompts=min_pair_prompts,
        database=database,
        timeout_s=timeout_s,
        decoder=decoder,
    )
    every = propose(inputs, settings)
    props = every[:limit]
    cons = concepts(inputs, every, settings)[:limit] if with_concepts else []
    labels = dict(zip(inputs.fids, inputs.labels, strict=True))
    rows = read_rows(driver, Q.PROP_TAKEN_NAMES, {}, database=database, what="supernode names")
    taken = set(rows[0]["names"]) if rows else set()
    names = proposal_names(props, taken=taken)
    concept_names = proposal_names(cons, "C", taken=taken)
    found = [
        {
            "name": name,
            "level": p.level,
            "n_members": len(p.members),
            **_scores(p, len(ids)),
            "parts": [names[k] for k in p.parts if k < len(names)],
            "members": p.members,
            "labels": [labels.get(m) for m in p.members],
        }
        for name, p in zip([*names, *concept_names], [*props, *cons], strict=True)
    ]
    if store:
        store_proposals(driver, found, pattern=prompt_filter or "all", database=database)
    return found


def store_proposals(
    driver: neo4j.Driver,
    found: Sequence[dict[str, Any]],
    *,
    pattern: str,
    database: str | None = None,
) -> None:
    """Replace the stored proposals by ``found`` (:func:`propose_supernodes`' dicts) in one
    transaction: all of them or, on any failure, none (the earlier ones stay)."""

    def work(tx: neo4j.ManagedTransaction) -> int:
        tx.run(Q.PROP_DELETE_PROPOSED).consume()
        for prop in found:
            _store_one(tx, prop, pattern)
        return len(found)

    write_tx(driver, work, database=database, what="storing proposals")


def _store_one(tx: neo4j.ManagedTransaction, prop: dict[str, Any], pattern: str) -> None:
    """One proposal's supernode, members, aggregates and scores, inside ``tx``; a name held by
    a supernode that is not a proposal (one accepted or defined since the names were chosen)
    fails the whole transaction rather than overwrite it."""
    name = prop["name"]
    held = tx.run(Q.PROP_KIND, name=name).single()
    if held is not None and held["kind"] != PROPOSED:
        raise InputError(
            f"supernode {name!r} exists already (kind {held['kind']!r}); nothing was stored"
        )
    define_in(tx, name, sorted(set(prop["members"])), kind=PROPOSED, pattern=pattern)
    params = {k: prop[k] for k in _SCORE_KEYS}
    tx.run(
        Q.PROP_SET_SCORES, name=name, level=prop["level"], parts=prop["parts"], **params
    ).consume()


_SCORE_KEYS = (
    "coactivation",
    "coherence",
    "internal_positive",
    "downstream_agreement",
    "score",
    "n_prompts",
    "n_selected",
)


def _scores(p: Proposal, n_selected: int) -> dict[str, Any]:
    d = asdict(p)
    return {
        "coactivation": d["coactivation"],
        "coherence": d["coherence"],
        "internal_positive": d["internal_positive"],
        "downstream_agreement": d["downstream_agreement"],
        "score": d["score"],
        "n_prompts": d["n_prompts"],
        "n_selected": n_selected,
    }


def list_proposals(
    driver: neo4j.Driver, *, kind: str | None = None, database: str | None = None
) -> list[dict[str, Any]]:
    """Supernodes with their proposal scores (``kind`` None: every supernode)."""
    return read_rows(
        driver, Q.PROP_LIST, {"kind": kind}, database=database, what="listing supernodes"
    )


def accept(
    driver: neo4j.Driver, name: str, new_name: str | None = None, *, database: str | None = None
) -> str:
    """Accept a proposal (kind ``accepted``), renamed to ``new_name`` when given."""
    name = validate_name(name)
    target = validate_name(new_name) if new_name else name
    found = read_rows(driver, Q.PROP_KIND, {"name": name}, database=database, what="supernode")
    if not found:
        raise InputError(f"no supernode named {name!r}")
    if found[0]["kind"] != PROPOSED:
        raise InputError(f"supernode {name!r} is not a proposal (kind {found[0]['kind']!r})")
    if target != name and read_rows(
        driver, Q.PROP_KIND, {"name": target}, database=database, what="supernode"
    ):
        raise InputError(f"a supernode named {target!r} exists already")
    write_rows(
        driver,
        Q.PROP_ACCEPT,
        {"name": name, "new_name": target},
        database=database,
        what=f"accepting {name!r}",
    )
    return target


def reject(driver: neo4j.Driver, name: str, *, database: str | None = None) -> None:
    """Delete a proposal (only kind ``proposed``: accepted and hand-made ones stay)."""
    name = validate_name(name)
    found = read_rows(driver, Q.PROP_KIND, {"name": name}, database=database, what="supernode")
    if not found:
        raise InputError(f"no supernode named {name!r}")
    if found[0]["kind"] != PROPOSED:
        raise InputError(f"supernode {name!r} is not a proposal (kind {found[0]['kind']!r})")
    write_rows(driver, Q.PROP_REJECT, {"name": name}, database=database, what=f"rejecting {name!r}")


# --------------------------------------------------------------------------- validation
def validate_proposal(
    driver: neo4j.Driver,
    settings: Any,
    name: str,
    *,
    model: str | None = None,
    transcoders: str | None = None,
    n_prompts: int = 3,
    multiplier: float = -1.0,
    engines: Any = None,
) -> dict[str, Any]:
    """Ablate supernode ``name`` (constrained over every layer, every member times
    ``multiplier``, attention frozen) on the ``n_prompts`` stored prompts where its members are
    most active (text or image + text, the image from the artifact store), through the
    interventions step (each run is stored as an ``Intervention``
    touching the supernode). Returns and stores on the supernode the measured effect:
    ``validation_kl`` (mean KL of the steered next-token distribution from the clean one) and
    ``validation_drop`` (mean drop of the clean top token's probability)."""
    from atlas.pipeline.intervention_payloads import InterventionSpec, SupernodeEdit
    from atlas.pipeline.interventions import intervene_step

    name = validate_name(name)
    db = settings.neo4j_database
    tops = read_rows(
        driver,
        Q.PROP_TOP_PROMPTS,
        {"name": name, "limit": n_prompts},
        database=db,
        what="prompts of a supernode",
    )
    if not tops:
        raise InputError(f"supernode {name!r} is active in no stored prompt")
    kls, drops, ran = [], [], []
    for row in tops:
        meta = row["n_layers"]
        spec = InterventionSpec(
            prompt=row["text"],
            image=f"sha256:{row['image']}" if row["image"] else None,
            model=model,
            transcoders=transcoders,
            supernode=SupernodeEdit(name=name, multiplier=multiplier),
            constrained=(0, int(meta) - 1) if meta else None,
            store=True,
        )
        try:
            answer = intervene_step(spec, settings, driver=driver, engines=engines)
        except InputError as exc:
            log.warning("validation of %r on %s skipped: %s", name, row["prompt"][:12], exc)
            continue
        if answer["kl"] is not None:
            kls.append(float(answer["kl"]))
        drop = _top_token_drop(answer["base_logits"], answer["steered_logits"])
        if drop is not None:
            drops.append(drop)
        ran.append(row["prompt"])
    if not ran:
        raise InputError(f"no prompt of supernode {name!r} could be intervened on")
    result = {
        "validation_kl": sum(kls) / len(kls) if kls else math.nan,
        "validation_drop": sum(drops) / len(drops) if drops else math.nan,
        "validation_prompts": len(ran),
        "validation_multiplier": multiplier,
    }
    write_rows(
        driver, Q.PROP_SET_VALIDATION, {"name": name, **result}, database=db, what="validation"
    )
    return result


def _top_token_drop(base_logits: Sequence[float], steered_logits: Sequence[float]) -> float | None:
    """The clean run's most probable token: its probability clean minus steered (None without
    logits). Read off the full logits, since the steered run's top list may not hold it."""
    if not base_logits or len(base_logits) != len(steered_logits):
        return None
    p_base = softmax(np.asarray(base_logits, dtype=np.float64))
    p_steered = softmax(np.asarray(steered_logits, dtype=np.float64))
    t = int(np.argmax(p_base))
    return float(p_base[t] - p_steered[t])
