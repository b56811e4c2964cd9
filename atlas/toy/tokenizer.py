"""The toy world's word-level tokenizer, built with the ``tokenizers`` library.

One token per word or punctuation mark of the toy corpus (lower case, whitespace separated),
plus four special tokens. The post-processor prepends ``<bos>`` to every encoded text, so
``tokenizer("a hand has").input_ids`` is ``[<bos>, a, hand, has]`` and an engine that prepends
BOS "unless the first token already is one" leaves it alone. Decoding joins words with single
spaces, which round-trips corpus text exactly.

It is saved with :meth:`transformers.PreTrainedTokenizerFast.save_pretrained`, so
``AutoTokenizer.from_pretrained(model_dir)`` loads it like any downloaded tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


def build_tokenizer(words: Iterable[str]) -> Any:
    """A :class:`transformers.PreTrainedTokenizerFast` over ``words`` (order kept, deduplicated).

    Ids 0-3 are ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>``; words follow in the given order.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for word in words:
        if word not in vocab:
            vocab[word] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return wrap_tokenizer(tok, BOS_ID, model_max_length=64, clean_up_tokenization_spaces=False)


def wrap_tokenizer(tok: Any, bos_id: int | None, *, model_max_length: int, **kwargs: Any) -> Any:
    """``tok`` (a ``tokenizers.Tokenizer`` over a vocabulary with :data:`SPECIAL_TOKENS`) as a
    :class:`transformers.PreTrainedTokenizerFast` with those special tokens; ``<bos>`` (id
    ``bos_id``) is prepended to every encoded text unless ``bos_id`` is None. ``kwargs`` go to
    the ``PreTrainedTokenizerFast``."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    if bos_id is not None:
        tok.post_processor = processors.TemplateProcessing(
            single="<bos> $A",
            pair="<bos> $A $B",
            special_tokens=[("<bos>", bos_id)],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=model_max_length,
        **kwargs,
    )


def save_tokenizer(tokenizer: Any, out_dir: Path) -> None:
    """Save with ``save_pretrained`` (tokenizer.json, tokenizer_config.json, special tokens)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
