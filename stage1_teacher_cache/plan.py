"""Documents -> packed teacher sequences, each with the exact text its tokens cover, streamed to disk.

Documents arrive one at a time (``documents.iter_documents``), are tokenized in small batches,
joined by the end-of-document token and cut into sequences of ``seq_len`` tokens, each split
packed on its own (the last partial sequence of a split is dropped). Finished sequences go
straight into the plan folder (``plan_store``); memory holds one batch of documents and one
sequence under construction per split, whatever the corpus size.

Chat documents (``chat.py``) also give each token a loss mask: 1 when its last character lies
in an assistant span (the end-of-document token: 0); plain-text tokens are all 1.

For every sequence we keep ``text`` (the characters its tokens cover; an end-of-document token
stands for ``doc_separator``) and ``char_end[t]``, the end of token t in ``text``, so another
tokenizer can re-tokenize the same characters and align its tokens to ours by end offset.

Reading stops early once every split is full: train at ``data.max_train_tokens``; eval at
``data.max_eval_tokens``, or, without that cap, once train is full and every named eval document
was met (with ``eval_fraction``, eval then holds the documents held out among those read).
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from pipeline.cache.store import open_storage, user_cache_dir
from pipeline.config import Config
from pipeline.errors import DataError
from pipeline.fingerprint import tokenizer_hash

from . import pieces
from .chat import char_mask, chat_template_hash, render, token_mask
from .documents import Document, EvalChooser, iter_documents
from .plan_store import PLAN_VERSION, Plan, PlanWriter, read_plan_info
from .sources import Source

TOKENIZE_DOCS = 64
TOKENIZE_CHARS = 1 << 20


def tokenize_batch(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Token ids [n] and character offsets [n, 2] of each text (no special tokens)."""
    if not texts:
        return []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    return [(np.asarray(ids, np.int64), np.asarray(offs, np.int64).reshape(-1, 2))
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"])]


class Packer:
    """Packs one split's documents into sequences of ``seq_len`` tokens for ``emit``."""

    def __init__(self, seq_len: int, eos_id: int, separator: str, max_seqs: int | None,
                 emit: Callable[[np.ndarray, str, np.ndarray, np.ndarray, np.ndarray], None]):
        self.seq_len, self.eos_id, self.separator, self.max_seqs, self.emit = seq_len, eos_id, separator, max_seqs, emit
        self.done = 0
        self._reset()

    def _reset(self) -> None:
        self._ids: list[np.ndarray] = []
        self._text: list[str] = []
        self._ends: list[np.ndarray] = []
        self._docs: list[np.ndarray] = []
        self._mask: list[np.ndarray] = []
        self._fill = 0
        self._chars = 0

    @property
    def full(self) -> bool:
        return self.max_seqs is not None and self.done >= self.max_seqs

    def add(self, doc_id: int, text: str, ids: np.ndarray, offsets: np.ndarray,
            spans: tuple[tuple[int, int], ...] | None = None, start: int | None = None, last: bool = True) -> int:
        """Append a document and its end-of-document token; emit every sequence it completes.
        ``spans``: a chat document's target characters (None: every token is a target).
        A long document comes in consecutive pieces (``tokenize_pieces``): ``start`` is where the
        piece begins in ``text`` (what the previous call returned), ``last`` whether the document
        ends with it. Returns where the next piece begins (the end of this one's last token)."""
        n = len(ids)
        if start is None:
            start = int(offsets[0, 0]) if n else 0
        # Where each token's characters end. A token starts where the previous one ended (two
        # byte-level tokens can share a character), so consecutive pieces tile the text.
        ends = np.maximum.accumulate(np.maximum(offsets[:, 1], start)) if n else np.zeros(0, np.int64)
        all_ids = np.append(ids, self.eos_id) if last else ids
        lengths = np.diff(ends, prepend=start)
        if last:
            lengths = np.append(lengths, len(self.separator))
        total = len(all_ids)
        mask = (np.ones(n, np.uint8) if spans is None else
                token_mask(ends, char_mask(len(text), spans)).astype(np.uint8))
        if last:  # the end-of-document token is a target of raw text only
            mask = np.append(mask, np.uint8(spans is None))
        t = 0
        while t < total and not self.full:
            k = min(self.seq_len - self._fill, total - t)
            real_end = min(t + k, n)
            begin = int(ends[t - 1]) if t > 0 else start
            piece = text[begin:int(ends[real_end - 1])] if real_end > t else ""
            if last and t + k == total:
                piece += self.separator
            self._ids.append(all_ids[t:t + k])
            self._text.append(piece)
            self._ends.append(self._chars + np.cumsum(lengths[t:t + k]))
            self._docs.append(np.full(k, doc_id, np.int64))
            self._mask.append(mask[t:t + k])
            self._chars += len(piece)
            self._fill += k
            t += k
            if self._fill == self.seq_len:
                self.emit(np.concatenate(self._ids), "".join(self._text), np.concatenate(self._ends),
                          np.concatenate(self._docs), np.concatenate(self._mask))
                self.done += 1
                self._reset()
        return int(ends[-1]) if n else start


def add_long_document(packer: Packer, tokenizer, doc: Document, bar) -> None:
    """Pack a document longer than ``PIECE_CHARS`` piece by piece (``pieces.tokenize_pieces``):
    memory stays flat in the document's size, and tokenizing stops once the split is full."""
    stream = pieces.tokenize_pieces(tokenizer, doc.text, pieces.PIECE_CHARS, pieces.MARGIN)
    piece = next(stream)
    start = None
    for following in stream:
        start = packer.add(doc.doc_id, doc.text, *piece, doc.spans, start=start, last=False)
        bar.update(len(piece[0]))
        if packer.full:
            return
        piece = following
    packer.add(doc.doc_id, doc.text, *piece, doc.spans, start=start, last=True)
    bar.update(len(piece[0]) + 1)


class DatasetHash:
    """sha256 over ``name \\0 split \\0 text`` of each document, length-prefixed (as
    ``fingerprint.sha256_text``), fed one document at a time."""

    def __init__(self):
        self._h = hashlib.sha256()

    def update(self, doc: Document) -> None:
        data = f"{doc.name}\0{doc.split}\0{doc.text}".encode("utf-8")
        if doc.spans is not None:  # a chat document: its targets are content too (plain text: as before)
            data += f"\0{list(doc.spans)}".encode("utf-8")
        self._h.update(len(data).to_bytes(8, "little"))
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()[:16]


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in documents:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= TOKENIZE_DOCS or chars >= TOKENIZE_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


def max_sequences(max_tokens: dict[str, int], seq_len: int) -> dict[str, int | None]:
    out: dict[str, int | None] = {}
    for split in ("train", "eval"):
        limit = max_tokens.get(split, 0)
        if limit and limit < seq_len:
            raise DataError(f"data.max_{split}_tokens={limit} is below data.seq_len={seq_len}; raise it")
        out[split] = limit // seq_len if limit else None
    return out


def build_plan(documents: Iterable[Document], tokenizer, seq_len: int, eos_id: int, doc_separator: str,
               max_tokens: dict[str, int], folder: Path, rows: int, info: dict | None = None,
               eval_done: Callable[[], bool] = lambda: True, show_progress: bool = True,
               named_eval: bool = False) -> Plan:
    """Pack ``documents`` into the plan folder ``folder`` (replacing what is there) and return it.

    ``eval_done()``: whether eval may stop short of ``max_eval_tokens`` (no cap) once train is
    full (e.g. every named eval document was met); ``named_eval``: eval is a list of named
    documents (checked at batch ends). ``info`` is recorded in plan.json."""
    limits = max_sequences(max_tokens, seq_len)
    writer = PlanWriter(folder, seq_len, rows)
    packers = {s: Packer(seq_len, eos_id, doc_separator, limits[s],
                         lambda *a, s=s: writer.add_sequence(s, *a)) for s in ("train", "eval")}
    digest = DatasetHash()
    train_docs, early, chat = 0, False, False
    bar = tqdm(desc="plan", unit="tok", unit_scale=True, disable=not show_progress, leave=False, mininterval=1.0)
    try:
        for batch in _batches(documents):
            todo = [d for d in batch if not packers[d.split].full and len(d.text) <= pieces.PIECE_CHARS]
            encoded = dict(zip((d.doc_id for d in todo), tokenize_batch(tokenizer, [d.text for d in todo])))
            for doc in batch:
                digest.update(doc)
                writer.add_document(doc.doc_id, doc.name, doc.split, len(doc.text))
                train_docs += doc.split == "train"
                chat = chat or doc.spans is not None
                packer = packers[doc.split]
                if not packer.full and doc.doc_id in encoded:
                    ids, offsets = encoded[doc.doc_id]
                    packer.add(doc.doc_id, doc.text, ids, offsets, doc.spans)
                    bar.update(len(ids) + 1)
                elif not packer.full:  # a long document: in bounded pieces, only as far as the split needs
                    add_long_document(packer, tokenizer, doc, bar)
                if packers["train"].full and (packers["eval"].full or limits["eval"] is None and eval_done()
                                               and not named_eval):
                    early = True
                    break
            # Named eval documents and no eval cap: stop only at a batch's end. ``eval_done`` knows
            # every document the batch pulled from the stream, and a named one after the point
            # where train filled up must still be packed.
            if early or named_eval and packers["train"].full and limits["eval"] is None and eval_done():
                early = True
                break
        if train_docs == 0:
            raise DataError("every document read is held out for eval (data.eval_documents / data.eval_fraction); "
                            "leave some for training")
        if packers["train"].done == 0:
            raise DataError(f"the training documents hold fewer than seq_len={seq_len} tokens; "
                            "add text or lower data.seq_len")
        if chat:
            require_targets(writer)
        plan = writer.close({**(info or {}), "dataset_hash": digest.hexdigest(), "stopped_early": early,
                             "loss_mask": chat})
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    return plan


def require_targets(writer: PlanWriter) -> None:
    """A chat plan whose train or held-out sequences hold no assistant token would train on
    nothing (every step's loss 0) or evaluate nothing: refused, naming the split."""
    for split in ("train", "eval"):
        if writer.count[split] and not writer.targets[split]:
            raise DataError(f"the {split} sequences hold no assistant (completion) token: the chat documents of "
                            f"that split are shorter than data.seq_len={writer.seq_len} tokens and the last partial "
                            "sequence is dropped, or they have no assistant turn; add chat rows to it, or lower "
                            "data.seq_len")


def plan_key(cfg: Config, tokenizer) -> dict:
    """The inputs a plan is made from: a stored plan with the same key and source signature is reused."""
    d = cfg.data
    return {"source": d.source, "subset": d.subset, "split": d.split, "text_field": d.text_field,
            "seq_len": d.seq_len, "eval_documents": list(d.eval_documents), "eval_fraction": d.eval_fraction,
            "max_train_tokens": d.max_train_tokens, "max_eval_tokens": d.max_eval_tokens,
            "doc_separator": d.doc_separator, "tokenizer_hash": tokenizer_hash(tokenizer),
            "format": d.format, "chat_template": chat_template_hash(tokenizer),
            "eos_token_id": tokenizer.eos_token_id, "rows": cfg.cache.shard_sequences, "version": PLAN_VERSION}


def uses_document_mask(cfg: Config, plan: Plan) -> bool:
    """``data.document_mask`` with ``auto`` resolved: on for chat data, off for plain text."""
    setting = cfg.data.document_mask
    return bool(plan.info.get("loss_mask")) if setting == "auto" else bool(setting)


def plan_folder(cfg: Config) -> Path:
    """``cache.plan_dir``, or ``.<cache name>.plan`` beside a local cache; for a remote cache
    (an fsspec URL) a local folder named by the URL in this user's cache folder."""
    if cfg.cache.plan_dir:
        return Path(cfg.cache.plan_dir)
    store = open_storage(cfg.cache.dir)
    if store.remote:
        return user_cache_dir() / "plans" / hashlib.sha256(store.url.encode()).hexdigest()[:16]
    root = store.root
    return root.parent / f".{root.name}.plan"


def ensure_plan(cfg: Config, tokenizer, show_progress: bool = True) -> Plan:
    """The plan for ``cfg``: the stored one when its key and the source's signature match (a
    rerun after a crash does not tokenize again), else a new one, streamed to ``plan_folder``."""
    folder = plan_folder(cfg)
    source = Source(cfg.data)
    key, signature = plan_key(cfg, tokenizer), source.signature()
    stored = read_plan_info(folder)
    if stored is not None and stored.get("key") == key and stored.get("signature") == signature:
        plan = Plan(folder)
        plan.reused = True
        return plan
    limits = {"train": cfg.data.max_train_tokens, "eval": cfg.data.max_eval_tokens}
    max_sequences(limits, cfg.data.seq_len)  # a bad cap fails before any reading
    chooser = EvalChooser(cfg.data, source.document_names())
    documents = iter_documents(cfg.data, source, chooser, render=lambda messages, where: render(tokenizer, messages, where))
    return build_plan(documents, tokenizer, cfg.data.seq_len, tokenizer.eos_token_id, cfg.data.doc_separator,
                      limits, folder, cfg.cache.shard_sequences, info={"key": key, "signature": signature},
                      eval_done=lambda: not chooser.named or chooser.all_named_seen, show_progress=show_progress,
                      named_eval=bool(chooser.named))
