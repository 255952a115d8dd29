"""Documents -> packed teacher sequences, each with the exact text its tokens cover.

Documents of one split are tokenized, joined by the end-of-document token and cut into
sequences of ``seq_len`` tokens (the last partial sequence of a split is dropped). Train
sequences come first, eval sequences after them, so each split is one contiguous range.

For every sequence we keep ``text`` (the characters its tokens cover; an end-of-document token
stands for ``doc_separator``) and ``char_end[t]``, the end of token t in ``text``, so another
tokenizer can re-tokenize the same characters and align its tokens to ours by end offset.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from tqdm import tqdm

from pipeline.errors import DataError

from .documents import Document


@dataclass
class PackedSequence:
    input_ids: np.ndarray  # [L] int64
    text: str
    char_end: list[int]
    doc_id: list[int]


@dataclass
class Plan:
    seq_len: int
    sequences: list[PackedSequence] = field(default_factory=list)
    splits: dict[str, list[int]] = field(default_factory=dict)

    @property
    def num_sequences(self) -> int:
        return len(self.sequences)


def tokenize_document(tokenizer, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def build_plan(documents: list[Document], tokenizer, seq_len: int, eos_id: int, doc_separator: str,
               max_tokens: dict[str, int], show_progress: bool = True) -> Plan:
    plan = Plan(seq_len=seq_len)
    for split in ("train", "eval"):
        docs = [d for d in documents if d.split == split]
        start = plan.num_sequences
        limit = max_tokens.get(split, 0)
        max_seqs = limit // seq_len if limit else None
        if limit and max_seqs == 0:
            raise DataError(f"data.max_{split}_tokens={limit} is below data.seq_len={seq_len}; raise it")
        plan.sequences += _pack(docs, tokenizer, seq_len, eos_id, doc_separator, max_seqs, show_progress, split)
        plan.splits[split] = [start, plan.num_sequences]
    if plan.splits["train"][1] == plan.splits["train"][0]:
        raise DataError(f"the training documents hold fewer than seq_len={seq_len} tokens; "
                        "add text or lower data.seq_len")
    if plan.splits["eval"][1] == plan.splits["eval"][0]:
        del plan.splits["eval"]
    return plan


def _pack(docs: list[Document], tokenizer, seq_len: int, eos_id: int, separator: str,
          max_seqs: int | None, show_progress: bool, split: str) -> list[PackedSequence]:
    out: list[PackedSequence] = []
    # The current sequence under construction.
    ids: list[int] = []
    pieces: list[str] = []
    char_end: list[int] = []
    doc_ids: list[int] = []
    length = 0
    for doc in tqdm(docs, desc=f"tokenize {split}", unit="doc", disable=not show_progress, leave=False):
        tok_ids, offsets = tokenize_document(tokenizer, doc.text)
        # End of this document's text already emitted. It carries across a sequence boundary, so
        # consecutive sequences tile the document even when two byte-level tokens share a character.
        cursor = None
        for tid, (s, e) in [*zip(tok_ids, offsets), (eos_id, (None, None))]:
            if e is None:  # end-of-document token
                piece = separator
            else:
                if cursor is None:  # a document starts: its text begins at its first token
                    cursor = s
                piece = doc.text[cursor:e] if e > cursor else ""
                cursor = max(cursor, e)
            ids.append(tid)
            pieces.append(piece)
            length += len(piece)
            char_end.append(length)
            doc_ids.append(doc.doc_id)
            if len(ids) == seq_len:
                out.append(PackedSequence(np.asarray(ids, np.int64), "".join(pieces), char_end, doc_ids))
                ids, pieces, char_end, doc_ids, length = [], [], [], [], 0
                if max_seqs is not None and len(out) >= max_seqs:
                    return out
    return out
