"""Synthetic attribution graphs for tests and the store benchmark (no model needed).

The graphs respect the real layout (features sorted by layer/pos/index, then errors, tokens,
logits; edges only from lower to higher layers) and draw feature indices from a skewed
distribution over a shared pool, so features recur across prompts as in a real atlas.
"""

from __future__ import annotations

import torch

from atlas.graph import (
    AttributionSettings,
    Graph,
    GraphMetadata,
    ModelInfo,
    NodeKind,
    TranscoderInfo,
)

WORDS = [
    "The", " capital", " of", " Texas", " is", " Austin", " Dallas", " city", " state", " in",
    " France", " Paris", " river", " big", " small", " red", " the", " a", " and", " not",
]  # fmt: skip


def word(token_id: int) -> str:
    """Text of a synthetic vocabulary entry (the vocabulary cycles through :data:`WORDS`)."""
    return WORDS[token_id % len(WORDS)] + ("" if token_id < len(WORDS) else f"#{token_id}")


def synthetic_graph(
    seed: int,
    *,
    n_layers: int = 8,
    n_pos: int = 10,
    n_features: int = 405,
    n_logits: int = 5,
    n_edges: int = 5000,
    d_transcoder: int = 4096,
    feature_pool: int = 2000,
    vocab_size: int = 64,
    model_name: str = "synthetic-model",
    tset_hash: str = "tset0",
) -> Graph:
    """A random but well-formed graph; the same seed gives the same graph (and prompt id)."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (n_pos,), generator=gen)
    input_ids[0] = 0  # a BOS-like first token
    # Features: pool indices drawn with a Zipf-like skew, unique per (layer, pos).
    ranks = torch.arange(1, feature_pool + 1, dtype=torch.float64)
    probs = 1.0 / ranks
    pool = torch.randperm(d_transcoder, generator=gen)[:feature_pool]
    feats: set[tuple[int, int, int]] = set()
    while len(feats) < n_features:
        need = n_features - len(feats)
        draw = torch.multinomial(probs, need, replacement=True, generator=gen)
        lay = torch.randint(0, n_layers, (need,), generator=gen)
        pos = torch.randint(1, n_pos, (need,), generator=gen)
        for d, lay_i, p in zip(draw.tolist(), lay.tolist(), pos.tolist(), strict=True):
            feats.add((lay_i, p, int(pool[d])))
    feat_list = sorted(feats)[:n_features]

    kind: list[int] = []
    layer: list[int] = []
    pos_l: list[int] = []
    feature: list[int] = []
    token_id: list[int] = []
    for lay_i, p, f in feat_list:
        kind.append(NodeKind.FEATURE)
        layer.append(lay_i)
        pos_l.append(p)
        feature.append(f)
        token_id.append(-1)
    for lay_i in range(n_layers):
        for p in range(n_pos):
            kind.append(NodeKind.ERROR)
            layer.append(lay_i)
            pos_l.append(p)
            feature.append(-1)
            token_id.append(-1)
    for p in range(n_pos):
        kind.append(NodeKind.TOKEN)
        layer.append(-1)
        pos_l.append(p)
        feature.append(-1)
        token_id.append(int(input_ids[p]))
    logit_ids = torch.randperm(vocab_size, generator=gen)[:n_logits].tolist()
    for t in logit_ids:
        kind.append(NodeKind.LOGIT)
        layer.append(n_layers)
        pos_l.append(n_pos - 1)
        feature.append(-1)
        token_id.append(int(t))
    n = len(kind)
    k = torch.tensor(kind)
    lay_t = torch.tensor(layer)
    is_feat = k == NodeKind.FEATURE
    activation = torch.where(is_feat, torch.rand(n, generator=gen) * 10, torch.zeros(n))
    influence = torch.rand(n, generator=gen)
    logit_prob = torch.zeros(n)
    logit_prob[k == NodeKind.LOGIT] = torch.softmax(torch.randn(n_logits, generator=gen), 0)

    # Edges: random (target, source) pairs with layer(source) < layer(target); logits are only
    # targets, tokens only sources. Sample, filter, deduplicate until n_edges.
    is_target = (k == NodeKind.FEATURE) | (k == NodeKind.ERROR) | (k == NodeKind.LOGIT)
    is_target &= k != NodeKind.ERROR  # errors are sources only, as in the reference
    is_source = k != NodeKind.LOGIT
    targets = torch.nonzero(is_target).flatten()
    sources = torch.nonzero(is_source).flatten()
    keys = torch.zeros(0, dtype=torch.int64)
    for _ in range(50):
        if keys.numel() >= n_edges:
            break
        m = 4 * (n_edges - keys.numel()) + 16
        t = targets[torch.randint(0, len(targets), (m,), generator=gen)]
        s = sources[torch.randint(0, len(sources), (m,), generator=gen)]
        ok = lay_t[s] < lay_t[t]
        keys = torch.unique(torch.cat([keys, t[ok] * n + s[ok]]))
        if keys.numel() > n_edges:
            keep = torch.randperm(keys.numel(), generator=gen)[:n_edges]
            keys = torch.sort(keys[keep]).values
    weight = torch.randn(keys.numel(), generator=gen) * 0.5

    meta = GraphMetadata(
        prompt=f"synthetic prompt {seed}",
        tokens=[word(int(t)) for t in input_ids.tolist()],
        model=ModelInfo(
            name=model_name,
            family="synthetic",
            n_layers=n_layers,
            d_model=64,
            vocab_size=vocab_size,
        ),
        transcoders=TranscoderInfo(
            name="synthetic-transcoders",
            kind="transcoder_set",
            content_hash=tset_hash,
            d_transcoder=d_transcoder,
        ),
        settings=AttributionSettings(),
        replacement_score=0.5,
        completeness_score=0.8,
        extra={"logit_tokens": [word(t) for t in logit_ids]},
    )
    return Graph.from_columns(
        meta,
        input_ids,
        {
            "kind": k,
            "layer": lay_t,
            "pos": pos_l,
            "feature": feature,
            "token_id": token_id,
            "activation": activation,
            "influence": influence,
            "logit_prob": logit_prob,
        },
        {"target": keys // n, "source": keys % n, "weight": weight},
    )
