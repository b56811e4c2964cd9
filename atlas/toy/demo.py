"""The prompts ``atlas demo`` and the pipeline bench attribute: toy-corpus facts, hand facts first."""

from __future__ import annotations

import random


def demo_prompts(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts from the toy corpus: every hand/finger fact first, then other facts.

    The others are drawn (seeded) from the other count objects, arithmetic (some answering 5,
    so "paths to 5" has competition), colours and two-hop facts.
    """
    from atlas.toy import ToyCorpus

    corpus = ToyCorpus(seed=0)
    hand = [f.prompt for f in corpus.facts if f.family == "count" and "hand" in f.subject]
    rng = random.Random(f"demo-{seed}")
    others: list[str] = []
    pools = {
        "count": [f for f in corpus.facts if f.family == "count" and "hand" not in f.subject],
        "arith": [f for f in corpus.facts if f.family == "arith"],
        "colour": [f for f in corpus.facts if f.family == "colour"],
        "twohop": [f for f in corpus.facts if f.family == "twohop"],
    }
    shares = {"count": 0.4, "arith": 0.3, "colour": 0.2, "twohop": 0.1}
    n_other = max(0, n - len(hand))
    for family, share in shares.items():
        pool = pools[family]
        k = min(len(pool), round(n_other * share))
        others += [f.prompt for f in rng.sample(pool, k)]
    prompts = list(dict.fromkeys(hand + others))  # unique, order kept
    extra = [f.prompt for f in corpus.facts if f.prompt not in set(prompts)]
    rng.shuffle(extra)
    prompts += extra[: max(0, n - len(prompts))]
    return prompts[:n]
