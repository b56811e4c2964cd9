"""The pure cores of the atlas questions: proposals recover planted groups from arrays, the
global circuit keeps the planted route, contrasts find the planted difference."""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import sparse

from atlas.circuits.contrast import contrast_items, rank_items, summarise
from atlas.circuits.global_graph import FROM, TO, PairStat, global_circuit
from atlas.circuits.proposals import (
    ProposalInputs,
    best_match,
    coherence,
    concepts,
    name_from_labels,
    precision_recall,
    propose,
)


def _planted_inputs(seed: int = 0) -> tuple[ProposalInputs, list[list[str]]]:
    rng = np.random.default_rng(seed)
    n_prompts, groups, noise = 60, [[f"g{g}/{i}" for i in range(4)] for g in range(3)], 30
    fids = [f for g in groups for f in g] + [f"n/{i}" for i in range(noise)]
    index = {f: i for i, f in enumerate(fids)}
    prompt = np.zeros((len(fids), n_prompts))
    units = np.zeros((len(fids), n_prompts * 6))
    for p in range(n_prompts):
        for g in groups:
            if rng.random() < 0.4:
                pos = rng.integers(6)
                for f in g:
                    prompt[index[f], p] = 1
                    units[index[f], p * 6 + pos] = 1
        for i in rng.choice(noise, 6, replace=False):
            f = f"n/{i}"
            prompt[index[f], p] = 1
            units[index[f], p * 6 + rng.integers(6)] = 1
    edges = []
    for gi, g in enumerate(groups):
        for a, b in itertools.pairwise(g):
            edges.append((a, b, 0.9, 20))
        for f in g:
            edges.append((f, f"logit{gi}", 0.5, 20))
    labels = [f"on: hand{f[1]} → says: five" if f.startswith("g") else None for f in fids]
    inputs = ProposalInputs(
        fids=fids,
        prompt_occ=sparse.csr_matrix(prompt),
        pos_occ=sparse.csr_matrix(units),
        edges=edges,
        labels=labels,
    )
    return inputs, groups


def test_proposals_recover_planted_groups() -> None:
    inputs, groups = _planted_inputs()
    props = propose(inputs)
    for g in groups:
        best, prec, rec = best_match(props, g)
        assert best is not None
        assert prec == 1.0 and rec == 1.0, (g, best.members)
        assert best.coherence is not None and best.coherence > 0.9
        assert best.coactivation > 0.9
    top = props[0]
    assert top.members[0].startswith("g") and top.name.startswith("hand")


def test_decoder_similarity_alone_groups_directions() -> None:
    inputs, groups = _planted_inputs()
    rng = np.random.default_rng(1)
    base = rng.normal(size=(3, 16))
    dec = rng.normal(size=(len(inputs.fids), 16))
    for gi, g in enumerate(groups):
        for f in g:
            dec[inputs.fids.index(f)] = base[gi] + 0.01 * rng.normal(size=16)
    inputs.decoder = dec
    from atlas.circuits.proposals import ProposalSettings

    props = propose(
        inputs, ProposalSettings(w_coactivation=0, w_edges=0, w_decoder=1.0, distance_threshold=0.1)
    )
    for g in groups:
        _, prec, rec = best_match(props, g)
        assert (prec, rec) == (1.0, 1.0)


def test_coherence_follows_the_sign_rule() -> None:
    members = ["a", "b"]
    good = [("a", "b", 1.0, 3), ("a", "x", 0.5, 3), ("b", "x", 0.4, 3)]
    bad = [("a", "b", -1.0, 3), ("a", "x", 0.5, 3), ("b", "x", -0.5, 3)]
    assert coherence(members, good)[0] == 1.0
    c, internal, downstream = coherence(members, bad)
    assert internal == 0.0 and downstream == 0.0 and c == 0.0
    assert coherence(members, []) == (None, None, None)


def test_names_and_precision_recall() -> None:
    assert name_from_labels(["on: hand → says: 5", "on: hand, left"], "x") == "hand/5"
    assert name_from_labels([None, ""], "fallback") == "fallback"
    assert precision_recall(["a", "b"], ["b", "c", "d"]) == (0.5, 1 / 3)
    assert math.isnan(precision_recall([], ["a"])[0])


def test_global_circuit_keeps_the_route_and_prunes_noise() -> None:
    pairs = [
        PairStat(FROM, "f1", 10, 10.0, 20.0, 10.0),
        PairStat("f1", "f2", 10, 8.0, 16.0, 8.0),
        PairStat("f2", TO, 10, 9.0, 9.0, 9.0),
        PairStat(FROM, "noise", 2, 0.02, 0.02, 0.02),
        PairStat("noise", "elsewhere", 2, 1.0, 1.0, 1.0),
        PairStat("tok", "f2", 10, 1.0, 1.0, 1.0),
    ]
    acts = {"f1": (10, 20.0), "f2": (10, 20.0), TO: (10, 10.0)}
    gc = global_circuit(pairs, acts, 10)
    assert gc.nodes == [FROM, "f1", "f2", TO]
    edges = {(e.source, e.target): e for e in gc.edges}
    assert set(edges) == {(FROM, "f1"), ("f1", "f2"), ("f2", TO)}
    e = edges[("f1", "f2")]
    assert e.n_prompts == 10 and e.mean_w == 0.8 and e.era == 0.8 and e.twera == 16.0 / 20.0


def test_contrast_finds_the_planted_difference() -> None:
    a = [f"a{i}" for i in range(12)]
    b = [f"b{i}" for i in range(12)]
    values = {
        "planted": {p: 3.0 for p in a} | {b[0]: 1.0},
        "shared": {p: 1.0 for p in a + b},
    }
    rows = contrast_items(values, a, b)
    assert rows[0]["item"] == "planted"
    top = rows[0]
    assert top["k_a"] == 12 and top["k_b"] == 1 and top["effect"] > 0.9
    assert top["q_value"] < 1e-3 and top["p_presence"] < 1e-3
    shared = next(r for r in rows if r["item"] == "shared")
    assert shared["p_value"] == 1.0 and shared["effect"] == 0.0
    assert contrast_items(values, a, []) == []
    summary = summarise(rank_items(values, a, b))
    assert summary["n_tested"] == 2 and summary["n_significant"] == 1
    assert summary["min_q"] == top["q_value"]
    assert summary["n_shared"] == 1 and summary["shared"] == ["shared"]
    assert summarise([])["min_q"] is None


def test_label_sources() -> None:
    import pytest

    from atlas.circuits.label_sources import (
        FeatureEvidence,
        context,
        label_source,
        label_sources,
        register_label_source,
    )
    from atlas.errors import InputError

    ev = FeatureEvidence("t/1/2", lens_tokens=[" fingers"], activating_tokens=[" hand", " hand"])
    assert label_source().labels([ev, FeatureEvidence("t/1/3")]) == [
        "on: hand → says: fingers",
        None,
    ]
    with pytest.raises(InputError, match="unknown label source"):
        label_source("nope")

    class First:
        name = "first"

        def labels(self, evidence: object) -> list[str | None]:
            return [e.contexts[0] if e.contexts else None for e in evidence]  # type: ignore[attr-defined]

    register_label_source("first", First)
    assert "first" in label_sources()
    assert context(["a", " b", " c", " d"], 2) == "a b[ c] d"
    assert label_source("first").labels([FeatureEvidence("x", contexts=["q"])]) == ["q"]


def test_concepts_join_groups_that_share_prompts_at_other_positions() -> None:
    """A concept read at two positions (each half fires at its own token, in the same prompts)
    is two tight groups at the first level and one concept at the second; noise stays out."""
    rng = np.random.default_rng(3)
    n_prompts, noise = 80, 30
    halves = [[f"c{h}/{i}" for i in range(4)] for h in range(2)]
    other = [f"o/{i}" for i in range(4)]
    fids = [f for h in halves for f in h] + other + [f"n/{i}" for i in range(noise)]
    index = {f: i for i, f in enumerate(fids)}
    prompt = np.zeros((len(fids), n_prompts))
    units = np.zeros((len(fids), n_prompts * 6))
    tokens = np.zeros((len(fids), 20))
    for p in range(n_prompts):
        if rng.random() < 0.4:  # the concept: half 0 at position 1 ("hand"), half 1 at 4
            for h, pos, tok in ((0, 1, 0), (1, 4, 1)):
                if rng.random() < 0.3:  # each half is missing from some of its prompts
                    continue
                for f in halves[h]:
                    prompt[index[f], p] = units[index[f], p * 6 + pos] = 1
                    tokens[index[f], tok] += 1
        if rng.random() < 0.4:  # an unrelated group
            pos = int(rng.integers(6))
            for f in other:
                prompt[index[f], p] = units[index[f], p * 6 + pos] = 1
                tokens[index[f], 2] += 1
        for i in rng.choice(noise, 6, replace=False):
            f, pos = f"n/{i}", int(rng.integers(6))
            prompt[index[f], p] = units[index[f], p * 6 + pos] = 1
            tokens[index[f], 3 + int(rng.integers(17))] += 1
    inputs = ProposalInputs(
        fids=fids,
        prompt_occ=sparse.csr_matrix(prompt),
        pos_occ=sparse.csr_matrix(units),
        token_occ=sparse.csr_matrix(tokens),
    )
    props = propose(inputs)
    union = halves[0] + halves[1]
    for h in halves:
        assert best_match(props, h)[1:] == (1.0, 1.0)
    assert best_match(props, union)[2] <= 0.5  # the first level keeps the halves apart
    cons = concepts(inputs, props)
    best, prec, rec = best_match(cons, union)
    assert best is not None and (prec, rec) == (1.0, 1.0), best.members
    assert best.level == 2 and len(best.parts) == 2
    assert {m for k in best.parts for m in props[k].members} == set(union)
    assert best_match(props + cons, other)[1:] == (1.0, 1.0)
    assert all(not set(c.members) & set(other) for c in cons if set(c.members) & set(union))
