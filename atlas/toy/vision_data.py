"""The toy vision world's drawn images and their questions: a pure function of a seed (Pillow).

Tasks (:data:`TASKS`), each a :class:`VisionSample` (a 48 x 48 RGB image, a question whose
answer is the next word, the answer word, attributes and tags):

* ``hand``: a hand with 3 to 7 fingers in varied sizes, rotations, skin colours and positions;
  question ``"how many ?"``, answer the digit. In training five fingers is far more
  common than any other count (:data:`TRAIN_FINGER_WEIGHTS`), as in the world.
* ``dots``: 1 to 9 dots or five-pointed stars to count, with the same question
  ``"how many ?"``: only the picture tells a hand from dots, so the answer depends on what the
  model sees.
* ``planet``: a red cratered Mars, a blue-green Earth with clouds or a ringed Saturn on a starry
  sky; prompt ``"this is the planet"``, answer ``mars`` / ``earth`` / ``saturn``.
* ``colour`` and ``shape``: one circle, square or triangle in red, green, blue or yellow
  (``"what colour is the shape ?"`` / ``"what shape is this ?"``).

Every image also has a caption word (:attr:`VisionSample.caption`: ``hand``, ``dots``,
``stars``, ``planet``, or the shape's name), the next word after the image alone in the toy
VLM's captioning task.

Splits: ``train`` samples are drawn from a seeded stream (:meth:`VisionWorld.train_samples`);
``eval`` samples (:meth:`VisionWorld.eval_samples`) come from a different seed stream (held-out
images) and include the held-out combinations :data:`HELDOUT_COMBOS` (a shape in a colour it
never has in training, stars in a count never shown as stars), which training never draws.

Images are drawn at 4x and reduced with a box filter, so edges are smooth; every random choice
comes from one ``random.Random`` seeded by a string, so a sample is the same on every machine
and Pillow version that draws the same primitives.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image, ImageDraw

IMAGE_SIZE = 48
"""Side of every image in pixels (the toy VLM's input size)."""
_SS = 4
"""Supersampling factor of the drawing canvas."""

Task = Literal["hand", "dots", "planet", "colour", "shape"]
TASKS: tuple[Task, ...] = ("hand", "dots", "planet", "colour", "shape")
#: Share of each task in training batches.
TRAIN_TASK_WEIGHTS: dict[Task, float] = {
    "hand": 0.30,
    "dots": 0.40,
    "planet": 0.10,
    "colour": 0.10,
    "shape": 0.10,
}
FINGER_COUNTS = (3, 4, 5, 6, 7)
#: Finger counts of training hands: five fingers far more often than any other count.
TRAIN_FINGER_WEIGHTS: dict[int, float] = {3: 0.03, 4: 0.04, 5: 0.86, 6: 0.04, 7: 0.03}
DOT_COUNTS = tuple(range(1, 10))
PLANETS = ("mars", "earth", "saturn")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 210, 40),
}
SHAPES = ("circle", "square", "triangle")
#: Dark, high-contrast colours of dots and stars (on the light backgrounds).
DOT_COLOURS = ((30, 30, 30), (30, 40, 140), (140, 30, 30), (30, 110, 40))
#: Combinations training never draws; the eval set has them (``heldout`` attribute).
HELDOUT_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {("triangle", "green"), ("circle", "yellow"), ("stars", "7")}
)

QUESTIONS: dict[str, str] = {
    "hand": "how many ?",
    "dots": "how many ?",
    "stars": "how many ?",
    "planet": "this is the planet",
    "colour": "what colour is the shape ?",
    "shape": "what shape is this ?",
}
#: Words the questions and answers use (the toy tokenizer must know them all).
VISION_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        " ".join(QUESTIONS.values()).split()
        + [str(n) for n in range(1, 10)]
        + list(PLANETS)
        + list(COLOURS)
        + list(SHAPES)
        + ["hand", "dots", "stars", "planet"]
    )
)

SKIN = ((241, 194, 160), (224, 172, 105), (198, 134, 66), (141, 85, 36), (255, 219, 172))


@dataclass(frozen=True)
class VisionSample:
    """One image with its question and answer."""

    task: Task
    question: str
    """The text after the image; the answer is the next word."""
    answer: str
    image: Image.Image = field(compare=False, repr=False)
    attrs: tuple[tuple[str, str], ...] = ()
    """Sorted ``(name, value)`` pairs: ``fingers``, ``count``, ``kind``, ``planet``, ``colour``,
    ``shape``, ``heldout`` (the held-out combination, if any)."""

    @property
    def attr(self) -> dict[str, str]:
        return dict(self.attrs)

    @property
    def tags(self) -> list[str]:
        """Tags for a prompt: the task, then ``name:value`` per attribute (``fingers:6``,
        ``dots:4``, ``stars:7``, ``planet:mars``, ``colour:red``, ``shape:circle``)."""
        a = self.attr
        out: list[str] = [self.task]
        if self.task == "hand":
            out.append(f"fingers:{a['fingers']}")
        elif self.task == "dots":
            out += [a["kind"], f"{a['kind']}:{a['count']}"]
        elif self.task == "planet":
            out.append(f"planet:{a['planet']}")
        else:
            out += [f"colour:{a['colour']}", f"shape:{a['shape']}"]
        if "heldout" in a:
            out.append("heldout")
        return out

    @property
    def caption(self) -> str:
        """The object's word: ``hand``, ``dots`` / ``stars``, ``planet``, or the shape."""
        if self.task in ("hand", "planet"):
            return self.task
        a = self.attr
        return a["kind"] if self.task == "dots" else a["shape"]

    def png_bytes(self) -> bytes:
        import io

        buf = io.BytesIO()
        self.image.save(buf, format="PNG", optimize=False, compress_level=6)
        return buf.getvalue()


# ---------------------------------------------------------------------- drawing
def _canvas(bg: tuple[int, int, int]) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    img = Image.new("RGB", (IMAGE_SIZE * _SS, IMAGE_SIZE * _SS), bg)
    return img, ImageDraw.Draw(img)


def _finish(img: Image.Image) -> Image.Image:
    return img.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BOX)


def _background(rng: random.Random) -> tuple[int, int, int]:
    """A light, low-saturation background."""
    base = rng.randint(200, 250)
    return tuple(min(255, max(0, base + rng.randint(-25, 10))) for _ in range(3))  # type: ignore[return-value]


def _jitter(c: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[int, int, int]:
    return tuple(min(255, max(0, v + rng.randint(-amount, amount))) for v in c)  # type: ignore[return-value]


def draw_hand(rng: random.Random, fingers: int) -> Image.Image:
    """A hand: palm, wrist and ``fingers`` fingers fanned above the palm, rotated and moved."""
    img, d = _canvas(_background(rng))
    s = IMAGE_SIZE * _SS
    skin = _jitter(rng.choice(SKIN), rng, 12)
    outline = tuple(max(0, v - 70) for v in skin)
    scale = rng.uniform(0.95, 1.2) * s / 48
    angle = math.radians(rng.uniform(-25, 25))
    cx = s / 2 + rng.uniform(-4, 4) * s / 48
    cy = s / 2 + rng.uniform(3, 7) * s / 48
    ca, sa = math.cos(angle), math.sin(angle)

    def pt(x: float, y: float) -> tuple[float, float]:
        x, y = x * scale, y * scale
        return (cx + x * ca - y * sa, cy + x * sa + y * ca)

    palm_w, palm_h = rng.uniform(6.5, 7.5), rng.uniform(6.0, 7.0)
    # wrist
    wrist = [pt(-4.5, 4), pt(4.5, 4), pt(4.0, 16), pt(-4.0, 16)]
    d.polygon(wrist, fill=skin, outline=outline)
    # fingers: evenly spread over a fan, roots on the palm's upper arc
    spread = math.radians(rng.uniform(125, 150) + 8 * (fingers - 5))
    length = rng.uniform(9.5, 11.5)
    width = rng.uniform(2.4, 3.0) * scale
    for i in range(fingers):
        t = (i / (fingers - 1)) - 0.5 if fingers > 1 else 0.0
        a = t * spread
        root = (math.sin(a) * palm_w * 0.8, -math.cos(a) * palm_h * 0.8)
        flen = length * rng.uniform(0.85, 1.1) * (1.0 - 0.35 * abs(t))
        tip = (root[0] + math.sin(a) * flen, root[1] - math.cos(a) * flen)
        p0, p1 = pt(*root), pt(*tip)
        d.line([p0, p1], fill=outline, width=int(width + 2 * _SS * 0.5))
        d.line([p0, p1], fill=skin, width=int(width))
        r = width / 2
        d.ellipse([p1[0] - r, p1[1] - r, p1[0] + r, p1[1] + r], fill=skin)
    # palm on top of the finger roots
    poly = [
        pt(palm_w * math.cos(k * math.pi / 16), palm_h * math.sin(k * math.pi / 16))
        for k in range(32)
    ]
    d.polygon(poly, fill=skin, outline=outline)
    return _finish(img)


def _star(cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    pts = []
    for k in range(10):
        rr = r if k % 2 == 0 else r * 0.45
        a = rot + k * math.pi / 5 - math.pi / 2
        pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
    return pts


def draw_dots(rng: random.Random, count: int, kind: str) -> Image.Image:
    """``count`` dots or stars of one size, each in its own cell of the 6 x 6 grid of the
    toy VLM's 8-pixel patches (jittered inside it, never overlapping)."""
    img, d = _canvas(_background(rng))
    s = IMAGE_SIZE * _SS
    colour = _jitter(rng.choice(DOT_COLOURS), rng, 12)
    grid = IMAGE_SIZE // 8
    cell = s / grid
    r = (rng.uniform(2.9, 3.2) if kind == "stars" else rng.uniform(2.3, 2.6)) * _SS
    for c in rng.sample(range(grid * grid), count):
        row, col = divmod(c, grid)
        x = (col + 0.5) * cell + rng.uniform(-0.6, 0.6) * _SS
        y = (row + 0.5) * cell + rng.uniform(-0.6, 0.6) * _SS
        if kind == "stars":
            d.polygon(_star(x, y, r, rng.uniform(-0.3, 0.3)), fill=colour)
        else:
            d.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    return _finish(img)


def draw_planet(rng: random.Random, planet: str) -> Image.Image:
    """A planet on a dark starry sky: red cratered Mars, blue Earth with green land and white
    clouds, or a tan Saturn with a ring."""
    sky = (rng.randint(0, 25), rng.randint(0, 25), rng.randint(15, 45))
    img, d = _canvas(sky)
    s = IMAGE_SIZE * _SS
    for _ in range(rng.randint(4, 10)):
        x, y = rng.uniform(0, s), rng.uniform(0, s)
        d.ellipse([x - 2, y - 2, x + 2, y + 2], fill=(230, 230, 230))
    r = rng.uniform(11, 15) * _SS * (0.8 if planet == "saturn" else 1.0)
    cx = s / 2 + rng.uniform(-4, 4) * _SS
    cy = s / 2 + rng.uniform(-4, 4) * _SS
    tilt = rng.uniform(-0.35, 0.35)
    if planet == "saturn":
        ring = _jitter((200, 180, 130), rng, 12)
        _ring(d, cx, cy, r * 2.0, r * 0.55, tilt, ring, width=int(1.6 * _SS), back=True)
    body = {"mars": (190, 70, 40), "earth": (40, 90, 200), "saturn": (215, 185, 120)}[planet]
    d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=_jitter(body, rng, 14))
    if planet == "mars":
        for _ in range(rng.randint(3, 6)):
            a, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.7) * r
            cr = rng.uniform(0.12, 0.25) * r
            x, y = cx + dist * math.cos(a), cy + dist * math.sin(a)
            d.ellipse([x - cr, y - cr, x + cr, y + cr], fill=(120, 40, 25), outline=(90, 25, 15))
    elif planet == "earth":
        for _ in range(rng.randint(2, 4)):
            a, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.6) * r
            lw, lh = rng.uniform(0.25, 0.45) * r, rng.uniform(0.15, 0.35) * r
            x, y = cx + dist * math.cos(a), cy + dist * math.sin(a)
            d.ellipse([x - lw, y - lh, x + lw, y + lh], fill=_jitter((50, 160, 70), rng, 12))
        for _ in range(rng.randint(1, 3)):
            a, dist = rng.uniform(0, 2 * math.pi), rng.uniform(0, 0.7) * r
            x, y = cx + dist * math.cos(a), cy + dist * math.sin(a)
            w = rng.uniform(0.2, 0.4) * r
            d.ellipse([x - w, y - w * 0.3, x + w, y + w * 0.3], fill=(240, 240, 245))
    else:
        for k in (-0.35, 0.2):
            y = cy + k * r
            half = math.sqrt(max(0.0, r * r - (k * r) ** 2))
            d.line([(cx - half, y), (cx + half, y)], fill=(180, 150, 95), width=int(1.2 * _SS))
        ring = _jitter((200, 180, 130), rng, 12)
        _ring(d, cx, cy, r * 2.0, r * 0.55, tilt, ring, width=int(1.6 * _SS), back=False)
    return _finish(img)


def _ring(
    d: ImageDraw.ImageDraw,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    tilt: float,
    colour: tuple[int, int, int],
    width: int,
    back: bool,
) -> None:
    """Half of a tilted ellipse: the back (upper) half or the front (lower) half."""
    ct, st = math.cos(tilt), math.sin(tilt)
    ks = range(0, 33) if not back else range(32, 65)
    pts = []
    for k in ks:
        a = k * math.pi / 32
        x, y = rx * math.cos(a), ry * math.sin(a)
        pts.append((cx + x * ct - y * st, cy + x * st + y * ct))
    d.line(pts, fill=colour, width=width)


def draw_shape(rng: random.Random, shape: str, colour: str) -> Image.Image:
    """One filled circle, square or triangle of ``colour``, sized, moved and rotated."""
    img, d = _canvas(_background(rng))
    s = IMAGE_SIZE * _SS
    fill = _jitter(COLOURS[colour], rng, 16)
    r = rng.uniform(9, 15) * _SS
    cx = s / 2 + rng.uniform(-6, 6) * _SS
    cy = s / 2 + rng.uniform(-6, 6) * _SS
    rot = rng.uniform(0, 2 * math.pi)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        n = 4 if shape == "square" else 3
        rr = r * (1.15 if n == 3 else 1.0)
        pts = [
            (
                cx + rr * math.cos(rot + k * 2 * math.pi / n),
                cy + rr * math.sin(rot + k * 2 * math.pi / n),
            )
            for k in range(n)
        ]
        d.polygon(pts, fill=fill)
    return _finish(img)


# ---------------------------------------------------------------------- samples
def make_sample(rng: random.Random, task: Task, **attrs: object) -> VisionSample:
    """Draw one sample of ``task``; ``attrs`` fix its attributes (``fingers``, ``count``,
    ``kind``, ``planet``, ``colour``, ``shape``), the rest are drawn from ``rng``."""
    if task == "hand":
        n = int(attrs.get("fingers") or rng.choice(FINGER_COUNTS))  # type: ignore[call-overload]
        img = draw_hand(rng, n)
        return VisionSample("hand", QUESTIONS["hand"], str(n), img, (("fingers", str(n)),))
    if task == "dots":
        n = int(attrs.get("count") or rng.choice(DOT_COUNTS))  # type: ignore[call-overload]
        kind = str(attrs.get("kind") or rng.choice(("dots", "stars")))
        img = draw_dots(rng, n, kind)
        a = [("count", str(n)), ("kind", kind)]
        if (kind, str(n)) in HELDOUT_COMBOS:
            a.append(("heldout", f"{kind}:{n}"))
        return VisionSample("dots", QUESTIONS[kind], str(n), img, tuple(sorted(a)))
    if task == "planet":
        planet = str(attrs.get("planet") or rng.choice(PLANETS))
        img = draw_planet(rng, planet)
        return VisionSample("planet", QUESTIONS["planet"], planet, img, (("planet", planet),))
    if task in ("colour", "shape"):
        shape = str(attrs.get("shape") or rng.choice(SHAPES))
        colour = str(attrs.get("colour") or rng.choice(list(COLOURS)))
        img = draw_shape(rng, shape, colour)
        a = [("colour", colour), ("shape", shape)]
        if (shape, colour) in HELDOUT_COMBOS:
            a.append(("heldout", f"{shape}:{colour}"))
        answer = colour if task == "colour" else shape
        return VisionSample(task, QUESTIONS[task], answer, img, tuple(sorted(a)))
    raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")


def _is_heldout(sample: VisionSample) -> bool:
    return "heldout" in sample.attr


def _weighted(rng: random.Random, weights: Mapping[Any, float]) -> Any:
    keys = list(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys], k=1)[0]


class VisionWorld:
    """The seeded generator: training stream and evaluation set (see the module docstring)."""

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def train_sample(self, index: int) -> VisionSample:
        """The ``index``-th training sample (never a held-out combination)."""
        rng = random.Random(f"toy-vision-train-{self.seed}-{index}")
        while True:
            task: Task = _weighted(rng, TRAIN_TASK_WEIGHTS)
            attrs: dict[str, object] = {}
            if task == "hand":
                attrs["fingers"] = _weighted(rng, TRAIN_FINGER_WEIGHTS)
            sample = make_sample(rng, task, **attrs)
            if not _is_heldout(sample):
                return sample

    def train_samples(self, n: int, start: int = 0) -> Iterator[VisionSample]:
        for i in range(start, start + n):
            yield self.train_sample(i)

    def eval_samples(
        self, per_count: int = 40, per_class: int = 30, seed_offset: int = 0
    ) -> list[VisionSample]:
        """Held-out images: ``per_count`` hands of every finger count, ``per_count // 2`` dots
        and stars of every count, ``per_class`` planets of each kind and shapes per
        (task, shape); the held-out combinations among them. Same list for the same seed."""
        rng = random.Random(f"toy-vision-eval-{self.seed}-{seed_offset}")
        out: list[VisionSample] = []
        for n in FINGER_COUNTS:
            out += [make_sample(rng, "hand", fingers=n) for _ in range(per_count)]
        for kind in ("dots", "stars"):
            for n in DOT_COUNTS:
                out += [make_sample(rng, "dots", count=n, kind=kind) for _ in range(per_count // 2)]
        for planet in PLANETS:
            out += [make_sample(rng, "planet", planet=planet) for _ in range(per_class)]
        for task in ("colour", "shape"):
            for shape in SHAPES:
                out += [make_sample(rng, task, shape=shape) for _ in range(per_class // 3 * 2)]
        return out


def write_sample_images(
    samples: list[VisionSample], out_dir: Path, prefix: str = "img"
) -> list[Path]:
    """Save each sample's image as ``{prefix}_{i:04d}.png`` under ``out_dir``; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, sample in enumerate(samples):
        path = out_dir / f"{prefix}_{i:04d}.png"
        path.write_bytes(sample.png_bytes())
        paths.append(path)
    return paths
