"""A synthetic atlas with planted feature groups (for the proposal, global-circuit and contrast
tests): every prompt switches some groups on; an active group's features fire at one position
(one per layer), each promotes the next member and the group's logit, and noise features fire
at random with random edges of random sign."""

from __future__ import annotations

import itertools
import random

from atlas.graph import (
    AttributionSettings,
    Graph,
    GraphMetadata,
    ModelInfo,
    NodeKind,
    TranscoderInfo,
)

TSET = "tsetP"
N_LAYERS = 4
N_POS = 6
VOCAB = 20
#: group g: features (layer, 100 + 10 g + layer), its logit token id 10 + g
GROUPS = [[(layer, 100 + 10 * g + layer) for layer in range(N_LAYERS)] for g in range(3)]
NOISE = [(layer, 500 + i) for layer in range(N_LAYERS) for i in range(12)]
WORD = [f"w{i}" for i in range(VOCAB)]


def group_fids(g: int) -> list[str]:
    return [f"{TSET}/{layer}/{index}" for layer, index in GROUPS[g]]


def planted_graph(seed: int, on: list[int]) -> Graph:
    """Prompt ``seed`` with groups ``on`` active (its answer: the first active group's logit,
    or token 19 when none is)."""
    rng = random.Random(seed)
    feats: dict[tuple[int, int, int], float] = {}  # (layer, pos, index) -> activation
    group_pos = {g: rng.randrange(1, N_POS) for g in on}
    for g in on:
        for layer, index in GROUPS[g]:
            feats[(layer, group_pos[g], index)] = 2.0 + rng.random()
    for layer, index in rng.sample(NOISE, 10):
        feats.setdefault((layer, rng.randrange(1, N_POS), index), 0.5 + rng.random())
    order = sorted(feats)
    kind, layer_c, pos_c, feat_c, tok_c, act = [], [], [], [], [], []
    for lay, p, index in order:
        kind.append(NodeKind.FEATURE)
        layer_c.append(lay)
        pos_c.append(p)
        feat_c.append(index)
        tok_c.append(-1)
        act.append(feats[(lay, p, index)])
    input_ids = [0] + [rng.randrange(1, 10) for _ in range(N_POS - 1)]
    tok0 = len(kind)
    for p in range(N_POS):
        kind.append(NodeKind.TOKEN)
        layer_c.append(-1)
        pos_c.append(p)
        feat_c.append(-1)
        tok_c.append(input_ids[p])
        act.append(0.0)
    logits = [10 + g for g in range(3)] + [19]
    answer = 10 + on[0] if on else 19
    logit0 = len(kind)
    probs = []
    for t in logits:
        kind.append(NodeKind.LOGIT)
        layer_c.append(N_LAYERS)
        pos_c.append(N_POS - 1)
        feat_c.append(-1)
        tok_c.append(t)
        act.append(0.0)
        probs.append(0.7 if t == answer else 0.1)
    idx = {key: i for i, key in enumerate(order)}
    edges: dict[tuple[int, int], float] = {}
    for g in on:
        members = [idx[(lay, group_pos[g], index)] for lay, index in GROUPS[g]]
        edges[(tok0 + group_pos[g], members[0])] = 1.0
        for a, b in itertools.pairwise(members):
            edges[(a, b)] = 0.8 + 0.2 * rng.random()
        for m in members:
            edges[(m, logit0 + g)] = 0.5 + 0.2 * rng.random()
    noise = [i for i, key in enumerate(order) if key[2] >= 500]
    for i in noise:
        for _ in range(2):
            j = rng.choice([*noise, logit0 + 3])
            if j >= logit0 or layer_c[j] > layer_c[i]:
                edges.setdefault((i, j), rng.choice([-1, 1]) * (0.1 + 0.4 * rng.random()))
    meta = GraphMetadata(
        prompt=f"planted prompt {seed} groups {' '.join(map(str, on)) or 'none'}",
        tokens=[WORD[t] for t in input_ids],
        model=ModelInfo(
            name="planted-model", family="synthetic", n_layers=N_LAYERS, d_model=8, vocab_size=VOCAB
        ),
        transcoders=TranscoderInfo(
            name="planted", kind="transcoder_set", content_hash=TSET, d_transcoder=1024
        ),
        settings=AttributionSettings(),
        replacement_score=0.5,
        completeness_score=0.8,
        extra={"logit_tokens": [WORD[t] for t in logits]},
    )
    src = [s for s, _ in sorted(edges)]
    tgt = [t for _, t in sorted(edges)]
    w = [edges[k] for k in sorted(edges)]
    return Graph.from_columns(
        meta,
        input_ids,
        {
            "kind": kind,
            "layer": layer_c,
            "pos": pos_c,
            "feature": feat_c,
            "token_id": tok_c,
            "activation": act,
            "logit_prob": [0.0] * logit0 + probs,
        },
        {"target": tgt, "source": src, "weight": w},
    )


def planted_atlas(n: int = 40, seed: int = 0) -> list[Graph]:
    """``n`` prompts: each group on with probability 0.45 (independently)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        on = [g for g in range(3) if rng.random() < 0.45]
        out.append(planted_graph(1000 * seed + i, on))
    return out
