"""Cache -> batches, in a deterministic order that a checkpoint can resume exactly.

The order of epoch e is a permutation of the train sequences drawn from ``(seed, e)``; the
position in it is the cursor. A resumed run restores ``(epoch, cursor)`` and sees exactly the
sequences an uninterrupted run would. Under torchrun each rank takes its slice of every global
batch (rank r: rows r, r+W, ...), so the data a step sees does not depend on the world size.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from pipeline.cache import CacheReader

TRAIN_ARRAYS = ("input_ids", "topk_ids", "topk_logprobs", "topk_log_tail", "logz")
DRAW_ARRAYS = ("draw_ids", "draw_counts")
"""Loaded only for a mode that needs them (kd.mode=sampled), from a cache that has them."""


def array_names(reader: CacheReader, need_hidden: bool, need_samples: bool = False) -> tuple[str, ...]:
    return (TRAIN_ARRAYS + (("hidden",) if need_hidden else ()) + (DRAW_ARRAYS if need_samples else ())
            + (("loss_mask",) if reader.spec.has_loss_mask else ()))


@dataclass
class Cursor:
    epoch: int = 0
    position: int = 0


class BatchStream:
    """Deterministic batches of ``indices``; ``load(ids)`` turns sequence ids into a batch."""

    def __init__(self, indices, batch_size: int, seed: int, load: Callable[[np.ndarray], dict], *,
                 rank: int = 0, world: int = 1):
        self.batch_size, self.seed, self.load = batch_size, seed, load
        self.rank, self.world = rank, world
        self.indices = np.asarray(indices)
        self.cursor = Cursor()
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return self.indices[np.random.default_rng([self.seed, epoch]).permutation(len(self.indices))]

    def state_dict(self) -> dict:
        return {"epoch": self.cursor.epoch, "position": self.cursor.position}

    def load_state_dict(self, state: dict) -> None:
        self.cursor = Cursor(state["epoch"], state["position"])
        self._order = self._permutation(self.cursor.epoch)

    def next_indices(self) -> np.ndarray:
        """The sequence ids of the next global batch (all ranks), advancing the cursor."""
        out = []
        need = self.batch_size * self.world
        while len(out) < need:
            if self.cursor.position >= len(self._order):
                self.cursor = Cursor(self.cursor.epoch + 1, 0)
                self._order = self._permutation(self.cursor.epoch)
            take = self._order[self.cursor.position:self.cursor.position + need - len(out)]
            out.extend(take.tolist())
            self.cursor.position += len(take)
        return np.asarray(out)

    def next_batch(self) -> dict[str, torch.Tensor]:
        global_ids = self.next_indices()
        return self.load(global_ids[self.rank::self.world])


class Prefetcher:
    """Batches of a ``BatchStream`` loaded ``depth`` ahead in a background thread (zarr decoding
    and numpy work release the GIL), pinned for ``non_blocking`` copies on CUDA. The order is the
    stream's; ``state_dict`` is the cursor after the last batch *handed out*, not fetched, so a
    checkpoint resumes exactly where the training loop was. ``stall_s`` sums the time the
    training loop waited for a batch (0 when the reader keeps up)."""

    def __init__(self, stream: BatchStream, depth: int = 2, pin_memory: bool = False):
        self.stream, self.depth, self.pin_memory = stream, max(1, depth), pin_memory
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batch-prefetch")
        self._queue: deque = deque()
        self._consumed = stream.state_dict()
        self.stall_s = 0.0

    def _load(self, ids: np.ndarray) -> dict[str, torch.Tensor]:
        batch = self.stream.load(ids)
        return {k: v.pin_memory() for k, v in batch.items()} if self.pin_memory else batch

    def _fill(self) -> None:
        while len(self._queue) < self.depth:
            ids = self.stream.next_indices()[self.stream.rank::self.stream.world]
            self._queue.append((self.stream.state_dict(), self._pool.submit(self._load, ids)))

    def next_batch(self) -> dict[str, torch.Tensor]:
        self._fill()
        cursor, future = self._queue.popleft()
        self._fill()  # the thread starts on the next one while this step runs
        t0 = time.perf_counter()
        batch = future.result()
        self.stall_s += time.perf_counter() - t0
        self._consumed = cursor
        return batch

    def state_dict(self) -> dict:
        return dict(self._consumed)

    def load_state_dict(self, state: dict) -> None:
        for _, future in self._queue:
            future.cancel()
        self._queue.clear()
        self.stream.load_state_dict(state)
        self._consumed = self.stream.state_dict()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def load_batch(reader: CacheReader, indices: np.ndarray, names: tuple[str, ...],
               docs: DocIds | None = None) -> dict[str, torch.Tensor]:
    """Stack the cached arrays of ``indices`` as torch tensors (ids int64, floats fp32); with
    ``docs`` (a cache with ``document_mask``) also ``doc_ids`` [B, L], what the student's mask is made of."""
    arrays = reader.read_indices(indices, names)
    batch = {}
    for name in names:
        arr = arrays[name]
        batch[name] = torch.from_numpy(arr > 0 if name == "loss_mask" else arr.astype(
            np.int64 if arr.dtype.kind in "ui" and name != "hidden" else np.float32))
    batch["sample_ids"] = torch.from_numpy(np.asarray(indices, np.int64))
    if docs is not None:
        batch["doc_ids"] = torch.from_numpy(docs(indices))
    return batch


class DocIds:
    """Per-token document ids [n, L] of cached sequences, from the shards' Arrow metadata
    (``doc_id``), each shard's converted once. Stage 2 of a ``document_mask`` cache masks the
    student's attention between the documents they mark (``pipeline/document_mask.py``)."""

    def __init__(self, reader: CacheReader):
        self.reader, self._shards = reader, {}

    def shard(self, shard: int) -> np.ndarray:
        if shard not in self._shards:
            column = self.reader.meta(shard).column("doc_id").combine_chunks()
            self._shards[shard] = np.asarray(column.flatten(), np.int64).reshape(len(column), -1)
        return self._shards[shard]

    def __call__(self, indices) -> np.ndarray:
        rows = self.reader.spec.shard_sequences
        return np.stack([self.shard(int(i) // rows)[int(i) % rows] for i in np.asarray(indices).reshape(-1)])


def target_bytes(reader: CacheReader, index: int) -> int:
    """UTF-8 bytes of the text that a sequence's targets (tokens 1..L-1) cover: for bits per byte.
    A chat cache: only the characters of its targets (``loss_mask``)."""
    text, char_end = reader.text(index)
    if reader.spec.has_loss_mask:
        return masked_bytes(text, masked_chars(reader, index, text, char_end), int(char_end[0]))
    return len(text[int(char_end[0]):].encode("utf-8"))


def masked_chars(reader: CacheReader, index: int, text: str, char_end: np.ndarray) -> np.ndarray:
    """[len(text)] bool: the characters covered by the sequence's target tokens (``loss_mask``)."""
    mask = reader.read_range(index, index + 1, ("loss_mask",))["loss_mask"][0]
    chars = np.zeros(len(text), bool)
    starts = np.concatenate([[0], char_end[:-1]])
    for a, b in zip(starts[mask > 0], char_end[mask > 0]):
        chars[a:b] = True
    return chars


def masked_bytes(text: str, chars: np.ndarray, first: int) -> int:
    """UTF-8 bytes of the masked characters from ``first`` on (the first token is never a target)."""
    keep = np.flatnonzero(chars[first:]) + first
    return sum(len(text[i].encode("utf-8")) for i in keep)


@dataclass
class DataAccess:
    """How a run reads the cache: ``load(ids)`` -> batch, ``target_bytes(i)`` for bits per byte,
    the student's sequence length, and (cross-tokenizer) the alignment coverage."""

    load: Callable[[np.ndarray], dict]
    target_bytes: Callable[[int], int]
    seq_len: int
    coverage: dict | None = None
    counted: str = "all tokens"
    """Which targets the held-out numbers count (a chat cache: its loss_mask's)."""


def data_access(reader: CacheReader, tokenizer, same_tokenizer: bool, need_hidden: bool, dist=None,
                show_progress: bool = True, need_samples: bool = False, need_chunks: bool = False) -> DataAccess:
    """Same tokenizer: the cached teacher tokens. Otherwise the cached text through the student's
    tokenizer, aligned once per (cache, tokenizer) and stored beside the cache (rank 0 builds it)."""
    if same_tokenizer:
        names = array_names(reader, need_hidden, need_samples)
        docs = DocIds(reader) if reader.spec.document_mask else None
        return DataAccess(lambda ids: load_batch(reader, ids, names, docs), lambda i: target_bytes(reader, i),
                          reader.spec.seq_len, counted=counted_targets(reader))
    from .cross import cross_batch, load_or_build_view
    from .student import load_teacher_tokenizer

    teacher_tok = load_teacher_tokenizer(reader)
    is_main = dist is None or dist.is_main
    if dist is not None:
        dist.run_on_main(lambda: load_or_build_view(reader, teacher_tok, tokenizer, show_progress))
        dist.barrier()
    view = load_or_build_view(reader, teacher_tok, tokenizer, show_progress=show_progress and dist is None)
    if is_main and show_progress:
        print("cross-tokenizer: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in view.coverage.items()))

    def cross_bytes(i: int) -> int:
        text, char_end = reader.text(i)
        if reader.spec.has_loss_mask:
            return masked_bytes(text, masked_chars(reader, i, text, char_end), int(view.first_end[i]))
        return len(text[int(view.first_end[i]):].encode("utf-8"))

    return DataAccess(lambda ids: cross_batch(reader, view, ids, need_hidden, need_samples, need_chunks), cross_bytes,
                      view.seq_len,
                      view.coverage, counted=counted_targets(reader))


def counted_targets(reader: CacheReader) -> str:
    return ("assistant/completion tokens only (the cache's loss_mask)" if reader.spec.has_loss_mask
            else "all tokens")
