"""The toy world's synthetic corpus: facts worth tracing, deterministic from a seed.

Four fact families, each with several paraphrase templates:

* **count**: how many parts an object has ("a hand has 5 fingers", "a spider has 8 legs").
  The hand is the only object whose answer is ``5``, and it comes with four subject phrasings
  ("hand", "human hand", "left hand", "right hand"), so the demo's question "paths from hand
  features to the logit 5" has a clear answer.
* **arith**: single-digit addition and subtraction ("2 plus 3 is 5").
* **colour**: the colour of things ("the sky is blue").
* **twohop**: an in-context two-hop lookup ("bob owns a spider . the pet of bob has 8").

Every fact is a :class:`Fact`: a ``prompt`` that ends right before the answer word, the
``answer`` word (one token of the toy tokenizer) and an optional ``suffix`` that completes the
sentence in training text. Facts are split three ways:

* ``train``: used in training text;
* ``heldout_pair``: a (template, subject) combination never seen in training, though both the
  template and the subject's fact are (a seeded ~12% of the non-held-out templates' facts);
* ``heldout_template``: a paraphrase template never seen in training at all.

Training documents (:meth:`ToyCorpus.sample_document`) are random sentences joined with " . ",
drawn from train facts plus fact-free filler sentences; held-out documents draw from held-out
facts instead (used to evaluate transcoders on text the model was not trained on).

Text is lower case, words and punctuation separated by single spaces, so a word-level tokenizer
round-trips it exactly.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Literal

Split = Literal["train", "heldout_pair", "heldout_template"]
SPLITS: tuple[Split, ...] = ("train", "heldout_pair", "heldout_template")


@dataclass(frozen=True)
class CountObject:
    """An object with a count fact: ``{article} {name} has {n} {part}``."""

    name: str
    article: str
    part: str
    n: int
    prep: str


#: The count facts. Only the hand (in all its phrasings) answers 5.
COUNT_OBJECTS: tuple[CountObject, ...] = (
    CountObject("hand", "a", "fingers", 5, "on"),
    CountObject("human hand", "a", "fingers", 5, "on"),
    CountObject("left hand", "a", "fingers", 5, "on"),
    CountObject("right hand", "a", "fingers", 5, "on"),
    CountObject("spider", "a", "legs", 8, "on"),
    CountObject("octopus", "an", "arms", 8, "on"),
    CountObject("dog", "a", "legs", 4, "on"),
    CountObject("cat", "a", "legs", 4, "on"),
    CountObject("horse", "a", "legs", 4, "on"),
    CountObject("car", "a", "wheels", 4, "on"),
    CountObject("square", "a", "sides", 4, "of"),
    CountObject("triangle", "a", "sides", 3, "of"),
    CountObject("tricycle", "a", "wheels", 3, "on"),
    CountObject("bicycle", "a", "wheels", 2, "on"),
    CountObject("bird", "a", "legs", 2, "on"),
    CountObject("coin", "a", "sides", 2, "of"),
    CountObject("ant", "an", "legs", 6, "on"),
    CountObject("insect", "an", "legs", 6, "on"),
    CountObject("hexagon", "a", "sides", 6, "of"),
    CountObject("cube", "a", "faces", 6, "of"),
    CountObject("octagon", "an", "sides", 8, "of"),
    CountObject("week", "a", "days", 7, "in"),
    CountObject("year", "a", "months", 12, "in"),
    CountObject("dozen", "a", "eggs", 12, "in"),
    CountObject("day", "a", "hours", 24, "in"),
    CountObject("hour", "an", "minutes", 60, "in"),
    CountObject("minute", "a", "seconds", 60, "in"),
    CountObject("unicorn", "a", "horn", 1, "on"),
    CountObject("snake", "a", "legs", 0, "on"),
)

#: Count templates: (prompt template, suffix template). ``{art}``/``{obj}``/``{part}``/``{prep}``;
#: ``{art2} {obj2}`` is a distractor object with a different answer.
COUNT_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{art} {obj} has", "{part}"),
    ("the number of {part} {prep} {art} {obj} is", ""),
    ("how many {part} does {art} {obj} have ?", ""),
    ("every {obj} has", "{part}"),
    ("{art} {obj} always has", "{part}"),
    ("a typical {obj} has", "{part}"),
    ("count the {part} {prep} {art} {obj} :", ""),
    ("one {obj} has", "{part}"),
    ("{part} {prep} {art} {obj} :", ""),
    ("q : how many {part} {prep} {art} {obj} ? a :", ""),
    ("unlike {art2} {obj2} , {art} {obj} has", "{part}"),
    ("we know that {art} {obj} has", "{part}"),
    ("the {obj} has", "{part}"),
)
COUNT_HELDOUT_TEMPLATES = frozenset({11, 12})

ARITH_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("{a} plus {b} is", "+"),
    ("{a} + {b} =", "+"),
    ("the sum of {a} and {b} is", "+"),
    ("{a} and {b} make", "+"),
    ("add {a} and {b} to get", "+"),
    ("{a} minus {b} is", "-"),
    ("{a} - {b} =", "-"),
    ("take {b} from {a} to get", "-"),
    ("what is {a} plus {b} ?", "+"),
    ("what is {a} minus {b} ?", "-"),
)
ARITH_HELDOUT_TEMPLATES = frozenset({8, 9})

COLOURS: tuple[tuple[str, str], ...] = (
    ("sky", "blue"),
    ("sea", "blue"),
    ("grass", "green"),
    ("leaf", "green"),
    ("lime", "green"),
    ("banana", "yellow"),
    ("lemon", "yellow"),
    ("snow", "white"),
    ("milk", "white"),
    ("cloud", "white"),
    ("coal", "black"),
    ("crow", "black"),
    ("tomato", "red"),
    ("blood", "red"),
    ("strawberry", "red"),
    ("carrot", "orange"),
    ("pumpkin", "orange"),
    ("plum", "purple"),
    ("grape", "purple"),
)
COLOUR_TEMPLATES: tuple[str, ...] = (
    "the {obj} is",
    "the colour of the {obj} is",
    "what colour is the {obj} ?",
    "the {obj} looks",
    "the {obj} has the colour",
    "everyone knows the {obj} is",
    "the colour of the {obj} is always",
)
COLOUR_HELDOUT_TEMPLATES = frozenset({5, 6})

NAMES: tuple[str, ...] = (
    "alice",
    "bob",
    "carol",
    "dave",
    "eve",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
)
PETS: tuple[str, ...] = ("spider", "dog", "cat", "horse", "bird", "ant", "snake")
TWOHOP_TEMPLATES: tuple[str, ...] = (
    "{name} owns {art} {pet} . the pet of {name} has",
    "{name} has {art} {pet} as a pet . how many legs does the pet of {name} have ?",
    "{name2} owns {art2} {pet2} and {name} owns {art} {pet} . the pet of {name} has",
    "{name} keeps {art} {pet} . the pet of {name} has",
)
TWOHOP_HELDOUT_TEMPLATES = frozenset({3})

FILLER_TEMPLATES: tuple[str, ...] = (
    "{name} sees the {c} near the {c2}",
    "{name} likes the {c}",
    "{name} saw {art} {obj}",
    "this is {art} {obj}",
    "{name} and {name2} went home",
    "{art} {obj} is not {art2} {obj2}",
    "{name} counts to {a}",
)

_HELDOUT_PAIR_FRACTION = 0.12

#: Facts that are always in the training split (the demo's prompts).
FORCED_TRAIN_PROMPTS = frozenset(
    {
        "a hand has",
        "the number of fingers on a hand is",
        "how many fingers does a hand have ?",
        "a spider has",
        "2 plus 3 is",
        "the sky is",
    }
)


@dataclass(frozen=True)
class Fact:
    """One fact prompt and its answer.

    Attributes:
        family: ``count``, ``arith``, ``colour`` or ``twohop``.
        template: index of the template within its family.
        subject: what the fact is about (object name, ``"a+b"``, colour object, name).
        prompt: the text up to (not including) the answer word.
        answer: the answer word (a single toy token), e.g. ``"5"``.
        suffix: words that follow the answer in training text (may be empty).
        split: ``train``, ``heldout_pair`` or ``heldout_template``.
    """

    family: str
    template: int
    subject: str
    prompt: str
    answer: str
    suffix: str
    split: Split

    @property
    def sentence(self) -> str:
        """The full sentence as it appears in training text."""
        return " ".join(w for w in (self.prompt, self.answer, self.suffix) if w)


def _pick_other(
    rng: random.Random, objects: tuple[CountObject, ...], obj: CountObject
) -> CountObject:
    while True:
        other = rng.choice(objects)
        if other.n != obj.n:
            return other


def _enumerate_facts(seed: int) -> list[Fact]:
    """All facts, in a fixed order, with seeded splits and distractor choices."""
    rng = random.Random(f"toy-corpus-split-{seed}")
    raw: list[tuple[str, int, str, str, str, str, bool]] = []  # ..., heldout template?

    for obj in COUNT_OBJECTS:
        for t, (tpl, suffix_tpl) in enumerate(COUNT_TEMPLATES):
            other = _pick_other(rng, COUNT_OBJECTS, obj)
            fields = {
                "art": obj.article,
                "obj": obj.name,
                "part": obj.part,
                "prep": obj.prep,
                "art2": other.article,
                "obj2": other.name,
            }
            raw.append(
                (
                    "count",
                    t,
                    obj.name,
                    tpl.format(**fields),
                    str(obj.n),
                    suffix_tpl.format(**fields),
                    t in COUNT_HELDOUT_TEMPLATES,
                )
            )
    for t, (tpl, op) in enumerate(ARITH_TEMPLATES):
        for a in range(10):
            for b in range(10):
                if op == "-" and b > a:
                    continue
                c = a + b if op == "+" else a - b
                raw.append(
                    (
                        "arith",
                        t,
                        f"{a}{op}{b}",
                        tpl.format(a=a, b=b),
                        str(c),
                        "",
                        t in ARITH_HELDOUT_TEMPLATES,
                    )
                )
    for t, tpl in enumerate(COLOUR_TEMPLATES):
        for obj_name, colour in COLOURS:
            raw.append(
                (
                    "colour",
                    t,
                    obj_name,
                    tpl.format(obj=obj_name),
                    colour,
                    "",
                    t in COLOUR_HELDOUT_TEMPLATES,
                )
            )
    by_name = {o.name: o for o in COUNT_OBJECTS}
    for t, tpl in enumerate(TWOHOP_TEMPLATES):
        for name in NAMES:
            for pet in PETS:
                obj = by_name[pet]
                name2 = rng.choice([n for n in NAMES if n != name])
                pet2 = rng.choice([p for p in PETS if by_name[p].n != obj.n])
                prompt = tpl.format(
                    name=name,
                    art=obj.article,
                    pet=pet,
                    name2=name2,
                    art2=by_name[pet2].article,
                    pet2=pet2,
                )
                suffix = "" if prompt.endswith("?") else obj.part
                raw.append(
                    (
                        "twohop",
                        t,
                        f"{name}:{pet}",
                        prompt,
                        str(obj.n),
                        suffix,
                        t in TWOHOP_HELDOUT_TEMPLATES,
                    )
                )

    facts: list[Fact] = []
    for family, t, subject, prompt, answer, suffix, heldout_tpl in raw:
        draw = rng.random()  # drawn for every fact, so splits do not shift when one is forced
        split: Split
        if heldout_tpl:
            split = "heldout_template"
        elif prompt in FORCED_TRAIN_PROMPTS or draw >= _HELDOUT_PAIR_FRACTION:
            split = "train"
        else:
            split = "heldout_pair"
        facts.append(Fact(family, t, subject, prompt, answer, suffix, split))
    return facts


class ToyCorpus:
    """The toy corpus for one seed: facts, splits, vocabulary and a document sampler.

    Args:
        seed: fixes the held-out pairs, the distractors inside templates and nothing else;
            documents are sampled from a separate :class:`random.Random` passed by the caller.
    """

    #: sentence-kind weights in documents
    FAMILY_WEIGHTS: ClassVar[dict[str, float]] = {
        "count": 0.42,
        "arith": 0.22,
        "colour": 0.14,
        "twohop": 0.14,
        "filler": 0.08,
    }

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed
        self.facts: list[Fact] = _enumerate_facts(seed)
        self._by_split_family: dict[tuple[str, str], list[Fact]] = {}
        for fact in self.facts:
            key = ("train" if fact.split == "train" else "heldout", fact.family)
            self._by_split_family.setdefault(key, []).append(fact)

    def split(self, split: Split) -> list[Fact]:
        """All facts of one split, in enumeration order."""
        return [f for f in self.facts if f.split == split]

    def vocabulary(self) -> list[str]:
        """Every word the corpus can produce, sorted (the tokenizer's vocabulary)."""
        words: set[str] = set()
        for fact in self.facts:
            words.update(fact.sentence.split())
        words.update(self._filler_words())
        words.add(".")
        return sorted(words)

    def _filler_words(self) -> set[str]:
        words: set[str] = set()
        for tpl in FILLER_TEMPLATES:
            words.update(w for w in tpl.split() if not w.startswith("{"))
        words.update(NAMES)
        words.update(c for _, c in COLOURS)
        words.update(str(i) for i in range(10))
        for obj in COUNT_OBJECTS:
            words.update(obj.name.split())
            words.add(obj.article)
        return words

    def _filler(self, rng: random.Random) -> str:
        tpl = rng.choice(FILLER_TEMPLATES)
        obj, obj2 = rng.choice(COUNT_OBJECTS), rng.choice(COUNT_OBJECTS)
        c, c2 = rng.choice(COLOURS), rng.choice(COLOURS)
        return tpl.format(
            c=c[0],
            c2=c2[0],
            name=rng.choice(NAMES),
            name2=rng.choice(NAMES),
            art=obj.article,
            obj=obj.name,
            art2=obj2.article,
            obj2=obj2.name,
            a=rng.randrange(10),
        )

    def sample_sentence(self, rng: random.Random, heldout: bool = False) -> str:
        """One random sentence: a fact of the chosen split, or filler."""
        families = list(self.FAMILY_WEIGHTS)
        family = rng.choices(families, weights=[self.FAMILY_WEIGHTS[f] for f in families])[0]
        if family == "filler":
            return self._filler(rng)
        pool = self._by_split_family.get(("heldout" if heldout else "train", family))
        if not pool:
            return self._filler(rng)
        return rng.choice(pool).sentence

    def sample_document(
        self, rng: random.Random, min_words: int = 40, heldout: bool = False
    ) -> str:
        """Sentences joined by " . " until the document has at least ``min_words`` words."""
        parts: list[str] = []
        n_words = 0
        while n_words < min_words:
            sentence = self.sample_sentence(rng, heldout=heldout)
            parts.append(sentence)
            n_words += len(sentence.split()) + 1
        return " . ".join(parts) + " ."

    def documents(
        self, seed: int, n: int, min_words: int = 40, heldout: bool = False
    ) -> Iterator[str]:
        """``n`` documents from a sampler seeded with ``seed`` (deterministic)."""
        rng = random.Random(f"toy-docs-{self.seed}-{seed}-{heldout}")
        for _ in range(n):
            yield self.sample_document(rng, min_words=min_words, heldout=heldout)
