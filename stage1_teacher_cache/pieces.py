"""Tokenizing one long document in bounded pieces, with the token ids of tokenizing it whole.

A fast tokenizer asked for offsets holds several Python objects per token: a 19 MB document
tokenized at once takes gigabytes. ``tokenize_pieces`` tokenizes windows of ``piece_chars``
characters instead, each starting where the previous one was cut, so memory is bounded by the
window whatever the document's size. A cut is made only where tokenization restarts cleanly:

- at a token boundary ``p`` that is the start of a line (``text[p-1] == "\\n"``) or a space
  that starts a word (``" w"`` after a non-space), at least ``margin`` characters from both ends
  of the window: pre-tokenizers (GPT-2, Llama 3, Qwen regexes) split there whatever follows;
- and only when the next window, tokenized from ``p``, agrees token for token (ids and offsets)
  with the current window over the ``margin / 2`` characters after ``p``, where both have context.

A document with no such cut (one unbroken line of symbols, a tokenizer that merges across lines)
is tokenized whole from the last good cut on: correct first, bounded where it can be.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

PIECE_CHARS = 1 << 16
"""Characters per tokenizer call for a long document (documents up to this length go whole)."""
MARGIN = 2048
"""Characters kept between a cut and either end of its window, and half of it checked for agreement."""


def _tokenize(tokenizer, text: str, offset: int) -> tuple[np.ndarray, np.ndarray]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)
    offsets = np.asarray(enc["offset_mapping"], np.int64).reshape(-1, 2) + offset
    return ids, offsets


def _cut(text: str, offsets: np.ndarray, lo: int, hi: int) -> tuple[int, int] | None:
    """(token index, character) of the last clean cut whose position lies in [lo, hi], or None."""
    for j in range(len(offsets) - 1, 0, -1):
        p = int(offsets[j - 1, 1])  # the end of the token before: a trimmed offset skips the space
        if p > hi or offsets[j, 0] < p:
            continue
        if p < lo:
            return None
        line = text[p - 1] == "\n" and not text[p].isspace()
        word = text[p] == " " and not text[p - 1].isspace() and p + 1 < len(text) and not text[p + 1].isspace()
        if line or word:
            return j, p
    return None


def tokenize_pieces(tokenizer, text: str, piece_chars: int = PIECE_CHARS,
                    margin: int = MARGIN) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token ids [n] and character offsets [n, 2] (into ``text``) of consecutive pieces of
    ``text``; concatenated, they equal the ids and offsets of tokenizing ``text`` whole."""
    start, stop = 0, min(len(text), piece_chars)
    ids, offsets = _tokenize(tokenizer, text[start:stop], start)
    while stop < len(text):
        found = _cut(text, offsets, start + margin, stop - margin)
        if found is None:
            break
        j, p = found
        next_stop = min(len(text), p + piece_chars)
        next_ids, next_offsets = _tokenize(tokenizer, text[p:next_stop], p)
        m = int(np.searchsorted(offsets[j:, 1], p + margin // 2, side="right"))
        if m == 0 or len(next_ids) < m or not (np.array_equal(ids[j:j + m], next_ids[:m])
                                              and np.array_equal(offsets[j:j + m], next_offsets[:m])):
            break
        yield ids[:j], offsets[:j]
        start, stop, ids, offsets = p, next_stop, next_ids, next_offsets
    if stop < len(text):  # no clean cut: the rest whole, from the last good cut
        ids, offsets = _tokenize(tokenizer, text[start:], start)
    yield ids, offsets
