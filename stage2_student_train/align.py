"""Cross-tokenizer alignment: a student with another tokenizer, distilled from a cached teacher.

Stage 1 keeps, per packed teacher sequence, its exact ``text`` and ``char_end[t]``, the end
character offset of teacher token t (non-decreasing; a token with an empty span, e.g. the later
byte-tokens of a multi-byte character, repeats the previous end). The student re-tokenizes the
same ``text`` with offsets (:func:`student_tokens`) and is aligned by end offset
(:func:`align_positions`): student position j reads teacher position t when both tokens end at the
same character, so both have seen exactly ``text[:end]``; other positions get no KD (-1).

Split characters. A byte-level tokenizer may cut one character into several tokens; all of them
report the end of the whole character. Of a run of tokens with the same end only the LAST has seen
the whole of ``text[:end]``; the earlier ones have seen a byte prefix of the character. So the
teacher position chosen is the last of its run, and by default only the last student position of
a run is aligned: an earlier one, still in the middle of a character, would otherwise get the
teacher's distribution after the whole character, which predicts a different next token.
(A token that starts inside one character and ends inside the next is not visible in end
offsets; such merges are rare and the last-of-run rule is then off by a few bytes.)

Vocab map. :func:`token_bytes` gives the exact bytes each id contributes to decoded text
(byte-level BPE via the inverse GPT-2 ``bytes_to_unicode`` table; SentencePiece-style ``'▁'`` and
``<0xNN>`` byte-fallback tokens; special and added tokens -> None). :func:`vocab_map` sends a
teacher id to the student id with identical bytes, else -1. :func:`alignment_coverage` and
:func:`mapped_mass` measure how much of the teacher signal reaches the student.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from functools import lru_cache

import numpy as np

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"  # '▁', SentencePiece's stand-in for a space


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """Inverse of :func:`bytes_to_unicode`."""
    return {c: b for b, c in bytes_to_unicode().items()}


def student_tokens(tokenizer, text: str) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize ``text`` without special tokens -> (ids int64 [M], char_end int64 [M]).

    ``char_end[j]`` is the end offset of token j in ``text``, made non-decreasing with
    ``np.maximum.accumulate`` (byte-level tokenizers may report odd offsets for split characters).
    """
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int64).reshape(-1)
    offsets = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    if len(offsets) != len(ids):
        raise ValueError(f"tokenizer returned {len(ids)} ids but {len(offsets)} offsets")
    ends = np.maximum.accumulate(offsets[:, 1]) if len(ids) else np.zeros(0, np.int64)
    return ids, ends.astype(np.int64, copy=False)


def _check_sorted(name: str, a: np.ndarray) -> None:
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size > 1 and np.any(a[1:] < a[:-1]):
        raise ValueError(f"{name} must be non-decreasing")


def last_of_run(char_end: np.ndarray) -> np.ndarray:
    """bool [M]: position j is the last of its run of equal ends (the one that saw the most)."""
    last = np.ones(len(char_end), dtype=bool)
    last[:-1] = char_end[1:] != char_end[:-1]
    return last


def align_positions(teacher_char_end: np.ndarray, student_char_end: np.ndarray,
                    student_last_only: bool = True) -> np.ndarray:
    """Teacher position for each student position, int64 [M]; -1 where none.

    ``aligned[j] = max{t : teacher_char_end[t] == student_char_end[j]}`` (the last teacher token
    of an equal-end run has seen the most of ``text[:end]``), found with ``np.searchsorted``.
    -1 when no teacher token ends there, when the end is 0 (nothing seen yet) and, with
    ``student_last_only`` (default), when a later student position has the same end (j is then
    inside a split character and has not yet seen all of ``text[:end]``).
    """
    t_end = np.asarray(teacher_char_end, dtype=np.int64)
    s_end = np.asarray(student_char_end, dtype=np.int64)
    _check_sorted("teacher_char_end", t_end)
    _check_sorted("student_char_end", s_end)
    if t_end.size == 0:
        return np.full(s_end.shape, -1, dtype=np.int64)
    idx = np.searchsorted(t_end, s_end, side="right") - 1  # last t with t_end[t] <= s_end[j]
    ok = (idx >= 0) & (t_end[np.maximum(idx, 0)] == s_end) & (s_end > 0)
    if student_last_only:
        ok &= last_of_run(s_end)
    return np.where(ok, idx, -1).astype(np.int64)


def _special_ids(tokenizer) -> set[int]:
    """Special ids plus every added token (they are matched as whole strings, never as bytes)."""
    ids = {int(i) for i in getattr(tokenizer, "all_special_ids", []) if i is not None}
    added = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(int(i) for i in added)
    return ids


def _component_types(node) -> set[str]:
    """All ``type`` names in a (possibly nested Sequence) tokenizers component JSON."""
    found: set[str] = set()
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            found.add(node["type"])
        for value in node.values():
            found |= _component_types(value)
    elif isinstance(node, list):
        for value in node:
            found |= _component_types(value)
    return found


def _vocab_strings(tokenizer) -> list[str | None]:
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    return [t if isinstance(t, str) else None for t in tokens]


def is_byte_level(tokenizer, strings: Sequence[str | None] | None = None) -> bool:
    """True for a byte-level BPE (GPT-2 / Llama-3 / SmolLM style).

    Read from the backend's decoder / pre-tokenizer (a ``ByteLevel`` component); without a
    backend, every vocab string must lie in the GPT-2 byte alphabet.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        types = _component_types(spec.get("decoder")) | _component_types(spec.get("pre_tokenizer"))
        return "ByteLevel" in types
    alphabet = unicode_to_bytes()
    special = _special_ids(tokenizer)
    strings = _vocab_strings(tokenizer) if strings is None else strings
    return all(s is None or i in special or all(c in alphabet for c in s) for i, s in enumerate(strings))


def _byte_level_bytes(s: str) -> bytes | None:
    table = unicode_to_bytes()
    try:
        return bytes(table[c] for c in s)
    except KeyError:  # not a byte-level string: never matches anything
        return None


def _sentencepiece_bytes(s: str) -> bytes:
    m = _BYTE_FALLBACK.match(s)
    if m:
        return bytes([int(m.group(1), 16)])
    return s.replace(_SP_SPACE, " ").encode("utf-8")


def token_bytes(tokenizer) -> list[bytes | None]:
    """Bytes each id in ``range(len(tokenizer))`` contributes to decoded text; None if special.

    Byte-level BPE: the vocab string through the inverse ``bytes_to_unicode`` table. Otherwise
    SentencePiece style: ``<0xNN>`` is the byte NN, ``'▁'`` is a space, the rest is UTF-8 (a
    SentencePiece decoder drops the leading space of the first token; that is a decode-time rule,
    not part of the token). Special and added tokens -> None.
    """
    strings = _vocab_strings(tokenizer)
    special = _special_ids(tokenizer)
    convert = _byte_level_bytes if is_byte_level(tokenizer, strings) else _sentencepiece_bytes
    return [None if (i in special or s is None) else convert(s) for i, s in enumerate(strings)]


def vocab_map(teacher_tok, student_tok) -> np.ndarray:
    """int64 [V_teacher]: teacher id -> student id with identical bytes, else -1.

    A byte string that occurs several times in the student vocabulary maps to its lowest id.
    Special and added tokens never map.
    """
    lookup: dict[bytes, int] = {}
    for sid, b in enumerate(token_bytes(student_tok)):
        if b is not None and b not in lookup:
            lookup[b] = sid
    return np.asarray([-1 if b is None else lookup.get(b, -1) for b in token_bytes(teacher_tok)],
                      dtype=np.int64)


def alignment_coverage(aligned_list: Iterable[np.ndarray]) -> float:
    """Fraction of student positions (over all arrays) with a teacher position (>= 0); 0.0 if none."""
    total = hit = 0
    for aligned in aligned_list:
        a = np.asarray(aligned)
        total += a.size
        hit += int(np.count_nonzero(a >= 0))
    return hit / total if total else 0.0


def mapped_mass(teacher_topk_ids: np.ndarray, teacher_topk_logprobs: np.ndarray, vmap: np.ndarray) -> float:
    """Mean over positions of ``sum_k exp(logprob_k) [vmap[id_k] >= 0]``.

    The teacher top-k probability mass that lands on student tokens. Ids outside
    ``[0, len(vmap))`` count as unmapped. 0.0 for no positions.
    """
    ids = np.asarray(teacher_topk_ids, dtype=np.int64)
    logp = np.asarray(teacher_topk_logprobs, dtype=np.float64)
    if ids.shape != logp.shape or ids.ndim != 2:
        raise ValueError(f"top-k ids {ids.shape} and log-probs {logp.shape} must both be [N, K]")
    if ids.shape[0] == 0:
        return 0.0
    vmap = np.asarray(vmap, dtype=np.int64)
    inside = (ids >= 0) & (ids < len(vmap))
    mapped = inside & (vmap[np.where(inside, ids, 0)] >= 0)
    return float(np.mean(np.sum(np.exp(logp) * mapped, axis=1)))
