"""Short feature labels from the logit lens, the top activating tokens and the top activating image
regions (pure Python)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

MAX_LABEL_LEN = 80


def _clean(token: str) -> str:
    text = token.strip()
    return text if text else repr(token)


def short_label(
    top_tokens: Sequence[str] | None,
    activating_tokens: Sequence[str] | None,
    *,
    n_lens: int = 3,
    n_act: int = 2,
    image_regions: Sequence[str] | None = None,
    image_tags: Sequence[Sequence[str]] | None = None,
    n_tags: int = 2,
) -> str | None:
    """``"on: capital, Texas → says: Austin, Dallas"``-style label, or None with no evidence.

    ``activating_tokens`` are the input tokens at the feature's strongest activations (most
    activating first); the most frequent ones are named. ``top_tokens`` are its logit-lens top
    tokens, in order. ``image_regions`` (``"row,col"`` grid cells of its strongest activations
    at image soft tokens, most activating first) add ``"sees: image 3,1, 3,2"``: a feature read
    off pictures is named by where in them it fires. ``image_tags`` (per top activation, the
    tags of its prompt's image) add ``"images: hand"``: the tags that at least two thirds of the
    top activations carry, most frequent first (a feature of one kind of picture is named by
    it; a bare majority would name a common tag by chance: with a tag on 3 of 8 of a feature's
    pictures, 5 of its top 10 carry it about one time in three, 7 of 10 one in 25).
    """
    parts = []
    tags = common_tags(image_tags or [], n_tags)
    if tags:
        parts.append("images: " + ", ".join(tags))
    if image_regions:
        cells = list(dict.fromkeys(image_regions))[:n_act]
        parts.append("sees: image " + ", ".join(cells))
    if activating_tokens:
        counts = Counter(_clean(t) for t in activating_tokens)
        order = {t: i for i, t in reversed(list(enumerate(_clean(t) for t in activating_tokens)))}
        best = sorted(counts, key=lambda t: (-counts[t], order[t]))[:n_act]
        parts.append("on: " + ", ".join(best))
    if top_tokens:
        seen: list[str] = []
        for t in top_tokens:
            c = _clean(t)
            if c not in seen:
                seen.append(c)
            if len(seen) == n_lens:
                break
        parts.append("says: " + ", ".join(seen))
    if not parts:
        return None
    label = " → ".join(parts)
    return label if len(label) <= MAX_LABEL_LEN else label[: MAX_LABEL_LEN - 1] + "…"


def common_tags(
    per_activation: Sequence[Sequence[str]], n: int = 2, share: float = 2 / 3
) -> list[str]:
    """The tags that at least ``share`` of ``per_activation`` carry (each counted once per
    activation), most frequent first, then in order of first appearance; at most ``n``."""
    if not per_activation or n < 1:
        return []
    counts: Counter[str] = Counter()
    order: dict[str, int] = {}
    for tags in per_activation:
        for t in dict.fromkeys(tags):
            counts[t] += 1
            order.setdefault(t, len(order))
    need = share * len(per_activation) - 1e-9
    kept = [t for t, c in counts.items() if c >= need]
    return sorted(kept, key=lambda t: (-counts[t], order[t]))[:n]
