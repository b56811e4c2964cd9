"""The toy vision world's generator: deterministic, held-out combinations kept out of training."""

from __future__ import annotations

import hashlib
from collections import Counter

from atlas.toy.vision_data import (
    FINGER_COUNTS,
    HELDOUT_COMBOS,
    IMAGE_SIZE,
    TASKS,
    VisionWorld,
)


def _digest(samples: list) -> str:
    h = hashlib.sha256()
    for s in samples:
        h.update(s.question.encode() + s.answer.encode() + repr(s.attrs).encode())
        h.update(s.image.tobytes())
    return h.hexdigest()


def test_generator_is_deterministic() -> None:
    a, b = VisionWorld(0), VisionWorld(0)
    train_a, train_b = list(a.train_samples(40)), list(b.train_samples(40))
    assert _digest(train_a) == _digest(train_b)
    assert a.train_sample(17).png_bytes() == b.train_sample(17).png_bytes()
    assert _digest(a.eval_samples(per_count=4, per_class=3)) == _digest(
        b.eval_samples(per_count=4, per_class=3)
    )
    assert _digest(list(VisionWorld(1).train_samples(40))) != _digest(train_a)


def test_samples_are_well_formed() -> None:
    samples = list(VisionWorld(0).train_samples(300))
    assert {s.task for s in samples} == set(TASKS)
    for s in samples:
        assert s.image.size == (IMAGE_SIZE, IMAGE_SIZE) and s.image.mode == "RGB"
        assert s.answer and " " not in s.answer
        assert s.tags[0] == s.task
    fingers = Counter(int(s.answer) for s in samples if s.task == "hand")
    assert fingers.most_common(1)[0][0] == 5
    assert fingers[5] > 4 * max(fingers[n] for n in FINGER_COUNTS if n != 5)


def test_heldout_combinations_only_in_eval() -> None:
    world = VisionWorld(0)
    assert not any("heldout" in s.attr for s in world.train_samples(600))
    evals = world.eval_samples(per_count=6, per_class=9)
    held = {s.attr["heldout"] for s in evals if "heldout" in s.attr}
    assert held == {f"{a}:{b}" for a, b in HELDOUT_COMBOS}
    hands = Counter(int(s.answer) for s in evals if s.task == "hand")
    assert set(hands) == set(FINGER_COUNTS) and len(set(hands.values())) == 1
    train_pixels = {s.image.tobytes() for s in world.train_samples(200)}
    assert not any(s.image.tobytes() in train_pixels for s in evals)
