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
) -> str | None:
    """``"on: capital, Texas → says: Austin, Dallas"``-style label, or None with no evidence.

    ``activating_tokens`` are the input tokens at the feature's strongest activations (most
    activating first); the most frequent ones are named. ``top_tokens`` are its logit-lens top
    tokens, in order. ``image_regions`` (``"row,col"`` grid cells of its strongest activations
    at image soft tokens, most activating first) add ``"sees: image 3,1, 3,2"``: a feature read
    off pictures is named by where in them it fires.
    """
    parts = []
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
