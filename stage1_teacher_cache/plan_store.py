"""The packed plan on disk: written as it is made, read back one shard at a time.

Stage 1 fixes its plan (sequence count, splits, shard boundaries) before the teacher runs, but
never holds it in memory: the planner streams sequences into a plan folder, and the teacher pass
reads each shard's rows back when it runs that shard. The folder (``cache.plan_dir``, by default
``.<cache name>.plan`` beside the cache) holds::

    train.arrow      Arrow IPC file, one record batch per ``rows`` sequences, in order:
    eval.arrow         input_ids list<int32> [seq_len], text large_string,
                       char_end list<int32> [seq_len], doc_id list<int32> [seq_len],
                       loss_mask list<uint8> [seq_len] (1: a target; all 1 for plain text)
    documents.arrow  Arrow IPC file: doc_id, name, split, chars; one row per document read
                     (copied into the cache as meta/documents.arrow)
    text_counts.npy  int64 token-id counts over every planned sequence (the sqrt8 pilot's
                     text frequencies)
    plan.json        written last (atomically): the plan is complete exactly when it exists.
                     Holds the plan's key (the inputs it was made from), the source signature,
                     seq_len, rows, the number of sequences per split, documents read, whether
                     reading stopped early, dataset_hash (sha256 over every document read), and
                     loss_mask (true when chat documents were read: the cache stores the mask)

The folder is deleted once the cache is complete (everything in it is then in the cache).
Sequence ``i`` of the cache is train row ``i`` when ``i < n_train``, else eval row ``i - n_train``:
train sequences first, then eval, each split one contiguous range. Rows are read with plain
file reads (no memory map), so resident memory does not grow with the plan's size.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from pipeline.atomic import atomic_write_json
from pipeline.errors import ConfigError
from pipeline.paths import require_directory_path

PLAN_VERSION = 2  # 2: loss_mask column
PLAN_FILE = "plan.json"
SPLITS = ("train", "eval")
SEQ_SCHEMA = pa.schema([("input_ids", pa.list_(pa.int32())), ("text", pa.large_string()),
                        ("char_end", pa.list_(pa.int32())), ("doc_id", pa.list_(pa.int32())),
                        ("loss_mask", pa.list_(pa.uint8()))])
DOC_SCHEMA = pa.schema([("doc_id", pa.int32()), ("name", pa.string()), ("split", pa.string()),
                        ("chars", pa.int64())])
DOC_BATCH = 512
PLAN_FILES = {PLAN_FILE, "train.arrow", "eval.arrow", "documents.arrow", "text_counts.npy"}


def remove_plan(folder: Path) -> None:
    """Delete a plan folder's plan files, then the folder if nothing else is left in it.
    ``cache.plan_dir`` may name any folder: one holding other files (hidden ones too: a ``.git``,
    a ``.env``) is an error and nothing in it is deleted; a path that is a file is an error."""
    if not folder.exists() and not folder.is_symlink():
        return
    if not folder.is_dir():
        raise ConfigError(f"the plan folder {folder} is a file, not a directory; set cache.plan_dir to a new "
                          "or empty folder")
    foreign = sorted(p.name for p in folder.iterdir() if not _is_plan_file(p.name))
    if foreign:
        raise ConfigError(f"the plan folder {folder} holds {foreign[0]!r}, which no plan holds; "
                          "set cache.plan_dir to a new or empty folder")
    for p in folder.iterdir():
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if folder.is_symlink():
        return  # the folder a link names is emptied, the link itself kept
    folder.rmdir()


def _is_plan_file(name: str) -> bool:
    """A file this tool writes in a plan folder, or the temp file of one (``.plan.json.tmpPID``)."""
    temp = re.fullmatch(r"\.(.+)\.tmp\d+", name)
    return name in PLAN_FILES or (temp is not None and temp.group(1) in PLAN_FILES)


@dataclass
class Rows:
    """Plan rows [start, stop): what the teacher and the shard's metadata need."""

    input_ids: np.ndarray  # [n, L] int64
    text: pa.Array
    char_end: pa.Array
    doc_id: pa.Array
    loss_mask: np.ndarray | None = None  # [n, L] uint8 (1: a target) when the plan is of chat data

    def __len__(self) -> int:
        return len(self.input_ids)

    def doc_matrix(self) -> np.ndarray:
        """[n, L] int64 per-token document ids (what ``data.document_mask`` keeps apart)."""
        return np.asarray(self.doc_id.flatten(), np.int64).reshape(len(self), -1)


class PlanWriter:
    """Appends sequences split by split and documents as they come; ``close`` writes plan.json."""

    def __init__(self, folder: Path, seq_len: int, rows: int):
        remove_plan(folder)
        require_directory_path(folder, "cache.plan_dir")  # a parent that is a file: one line
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.seq_len, self.rows = folder, seq_len, rows
        self._files = {s: pa.OSFile(str(folder / f"{s}.arrow"), "wb") for s in SPLITS}
        self._writers = {s: ipc.new_file(self._files[s], SEQ_SCHEMA) for s in SPLITS}
        self._pending: dict[str, list[tuple[np.ndarray, str, np.ndarray, np.ndarray, np.ndarray]]] = {
            s: [] for s in SPLITS}
        self.count = {s: 0 for s in SPLITS}
        self.targets = {s: 0 for s in SPLITS}  # positions with a target (loss_mask[1:]) per split
        self._doc_file = pa.OSFile(str(folder / "documents.arrow"), "wb")
        self._doc_writer = ipc.new_file(self._doc_file, DOC_SCHEMA)
        self._docs: list[tuple[int, str, str, int]] = []
        self.documents = 0
        self.text_counts = np.zeros(0, np.int64)

    def add_sequence(self, split: str, ids: np.ndarray, text: str, char_end: np.ndarray, doc_id: np.ndarray,
                     loss_mask: np.ndarray) -> None:
        self._pending[split].append((ids, text, char_end, doc_id, loss_mask))
        self.count[split] += 1
        self.targets[split] += int(np.count_nonzero(loss_mask[1:]))
        if len(self._pending[split]) == self.rows:
            self._flush(split)

    def add_document(self, doc_id: int, name: str, split: str, chars: int) -> None:
        self._docs.append((doc_id, name, split, chars))
        self.documents += 1
        if len(self._docs) == DOC_BATCH:
            self._flush_docs()

    def _flush(self, split: str) -> None:
        seqs = self._pending[split]
        if not seqs:
            return
        ids = np.stack([s[0] for s in seqs]).astype(np.int32)
        size = int(ids.max()) + 1
        if size > len(self.text_counts):
            self.text_counts = np.pad(self.text_counts, (0, size - len(self.text_counts)))
        self.text_counts += np.bincount(ids.ravel(), minlength=len(self.text_counts))
        n, length = ids.shape
        offsets = pa.array(np.arange(0, (n + 1) * length, length, dtype=np.int32))

        def lists(values: np.ndarray, dtype=np.int32) -> pa.Array:
            return pa.ListArray.from_arrays(offsets, pa.array(values.astype(dtype).ravel()))

        batch = pa.record_batch([lists(ids), pa.array([s[1] for s in seqs], pa.large_string()),
                                 lists(np.stack([s[2] for s in seqs])), lists(np.stack([s[3] for s in seqs])),
                                 lists(np.stack([s[4] for s in seqs]), np.uint8)],
                                schema=SEQ_SCHEMA)
        self._writers[split].write_batch(batch)
        self._pending[split] = []

    def _flush_docs(self) -> None:
        if self._docs:
            cols = list(zip(*self._docs))
            self._doc_writer.write_batch(pa.record_batch(
                [pa.array(cols[0], pa.int32()), pa.array(cols[1], pa.string()), pa.array(cols[2], pa.string()),
                 pa.array(cols[3], pa.int64())], schema=DOC_SCHEMA))
            self._docs = []

    def close(self, info: dict[str, Any]) -> Plan:
        for split in SPLITS:
            self._flush(split)
            self._writers[split].close()
            self._files[split].close()
        self._flush_docs()
        self._doc_writer.close()
        self._doc_file.close()
        np.save(self.folder / "text_counts.npy", self.text_counts)
        atomic_write_json(self.folder / PLAN_FILE, {
            "version": PLAN_VERSION, "seq_len": self.seq_len, "rows": self.rows, "sequences": self.count,
            "documents": self.documents, **info})
        return Plan(self.folder)

    def abort(self) -> None:
        for closable in [*self._writers.values(), *self._files.values(), self._doc_writer, self._doc_file]:
            try:
                closable.close()
            except Exception:
                pass
        try:
            remove_plan(self.folder)
        except (ConfigError, OSError):
            pass  # never delete what this tool did not write


def read_plan_info(folder: Path) -> dict[str, Any] | None:
    """plan.json of a complete plan of this version, or None (absent, partial, unreadable)."""
    try:
        info = json.loads((folder / PLAN_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("version") != PLAN_VERSION:
        return None
    if not all((folder / f).is_file() for f in ("train.arrow", "eval.arrow", "documents.arrow", "text_counts.npy")):
        return None
    return info


class Plan:
    """A complete plan folder, read lazily: only the record batches a range touches are read."""

    def __init__(self, folder: Path):
        info = read_plan_info(folder)
        if info is None:
            raise FileNotFoundError(f"{folder} holds no complete plan")
        self.folder, self.info = folder, info
        self.seq_len: int = info["seq_len"]
        self.rows: int = info["rows"]
        self.count: dict[str, int] = info["sequences"]
        self.dataset_hash: str = info["dataset_hash"]
        self.reused = False
        self._readers: dict[str, Any] = {}

    @property
    def num_sequences(self) -> int:
        return self.count["train"] + self.count["eval"]

    @property
    def splits(self) -> dict[str, list[int]]:
        """split -> [first, end) over the cache's sequences; eval only when it has sequences."""
        n_train = self.count["train"]
        out = {"train": [0, n_train]}
        if self.count["eval"]:
            out["eval"] = [n_train, n_train + self.count["eval"]]
        return out

    def text_counts(self, vocab: int) -> np.ndarray:
        counts = np.load(self.folder / "text_counts.npy")
        return np.pad(counts, (0, max(0, vocab - len(counts))))[:vocab]

    def _reader(self, split: str):
        if split not in self._readers:
            self._readers[split] = ipc.open_file(pa.OSFile(str(self.folder / f"{split}.arrow")))
        return self._readers[split]

    def _read(self, split: str, start: int, stop: int) -> pa.Table:
        reader = self._reader(split)
        first, last = start // self.rows, (stop - 1) // self.rows
        table = pa.Table.from_batches([reader.get_batch(b) for b in range(first, last + 1)], schema=SEQ_SCHEMA)
        return table.slice(start - first * self.rows, stop - start)

    def rows_of(self, start: int, stop: int) -> Rows:
        """Sequences [start, stop) of the cache (they may straddle the train/eval boundary)."""
        if not 0 <= start < stop <= self.num_sequences:
            raise IndexError(f"plan rows [{start}, {stop}) outside [0, {self.num_sequences})")
        n_train = self.count["train"]
        parts = []
        if start < n_train:
            parts.append(self._read("train", start, min(stop, n_train)))
        if stop > n_train:
            parts.append(self._read("eval", max(start, n_train) - n_train, stop - n_train))
        table = pa.concat_tables(parts).combine_chunks()
        ids = table.column("input_ids").chunk(0).flatten().to_numpy().astype(np.int64)
        mask = None
        if self.info.get("loss_mask"):
            mask = table.column("loss_mask").chunk(0).flatten().to_numpy().reshape(stop - start, self.seq_len)
        return Rows(ids.reshape(stop - start, self.seq_len), table.column("text").chunk(0),
                    table.column("char_end").chunk(0), table.column("doc_id").chunk(0), mask)

    def close(self) -> None:
        self._readers.clear()
