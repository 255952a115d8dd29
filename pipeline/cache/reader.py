"""Reading a cache: random access to the logical arrays of committed shards, decoded.

Only what a commit record vouches for is used (``files.py``); the reader trusts nothing the
manifest and the markers do not vouch for. Works on any ``Storage`` (a local directory or an
fsspec URL, ``store.py``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import zarr

from ..errors import CacheError
from . import summary as cache_summary
from .codecs import SamplesCodec, hidden_codec, topk_codec
from .files import ARRAYS, DONE, META, VIEWS, check_record, read_head_marker, read_shard_marker, shard_name
from .spec import DERIVED, SCHEMA_VERSION, read_manifest, spec_from_manifest
from .store import Storage, open_storage, user_cache_dir


FINISH_EXTENSION = ("finish it: rerun cache-teacher with the config of the extension (cache.extend=true, the "
                    "larger data); committed shards are kept")


@dataclass
class Sequence:
    """One cached sequence: the arrays of ``CacheSpec.array_specs`` for one row, plus its text."""

    index: int
    split: str
    arrays: dict[str, np.ndarray]
    text: str
    char_end: np.ndarray
    doc_id: np.ndarray

    def __getitem__(self, name: str) -> np.ndarray:
        return self.arrays[name]

    def hidden(self) -> np.ndarray:
        """The hidden states as float32 (the reader already dequantised int8 codes)."""
        return self.arrays["hidden"].astype(np.float32)

    def topk_logits(self) -> np.ndarray:
        return self.arrays["topk_logprobs"].astype(np.float32) + self.arrays["logz"][..., None]


class CacheReader:
    """Random access to a cache written by ``CacheWriter``.

    Only what a commit record vouches for is used: a shard without a valid marker is not
    committed, a head without a valid ``done/head.json`` does not exist. With ``verify=True``
    the array metadata is checked against the manifest's CRC32s at open, each shard's files the
    first time the shard is touched, ``rank_to_id``, the head and the documents table when first
    read, and every float array read for NaN/Inf: a damaged cache raises ``CacheError`` naming
    the file, shard or sequence, never returns wrong numbers.

    ``views_dir``: where derived student views live (``cache.views_dir``); None: inside the cache.
    """

    def __init__(self, root: str | Path | Storage, *, verify: bool = True, views_dir: str | Path | None = None):
        self.store = open_storage(root)
        self.root = self.store.location
        if not self.store.exists():
            raise CacheError(f"cache {self.root} does not exist; build it with cache-teacher (cache.dir={self.root})")
        self.manifest = read_manifest(self.store)
        self.spec = spec_from_manifest(self.manifest, self.store)
        self.verify = verify
        self.views_dir = Path(views_dir) if views_dir else None
        self._files: dict[str, Any] = self.manifest.get("files", {})
        self._legacy = "files" not in self.manifest  # written before arrays outside shards were checksummed
        self._markers: dict[int, dict[str, Any]] = {}
        self._verified: set[int] = set()
        self._meta: dict[int, pa.Table] = {}
        self._rank_to_id_cache: np.ndarray | None = None
        if verify:  # an interrupted extension may have grown the arrays before vouching for them
            self._check_files([rel for rel in self._files if rel.endswith("zarr.json")], "array metadata",
                              *([FINISH_EXTENSION] if "extending" in self.manifest else []))
        try:
            self._group = zarr.open_group(self.store.zarr_store(ARRAYS, read_only=True), mode="r")
            self._arrays = {name: self._group[name] for name in self.spec.array_specs()}
        except Exception as e:  # zarr raises many types for missing/corrupt metadata
            raise CacheError(f"{self.store.display(ARRAYS)} is damaged ({e.__class__.__name__}: {e}); "
                             "rebuild with cache-teacher cache.overwrite=true") from None
        self._head_marker = read_head_marker(self.store)
        self._head_checked = False
        self._topk = topk_codec(self.spec, lambda: self._rank_to_id)
        self._hidden = hidden_codec(self.spec)
        self._samples = SamplesCodec(self.spec, lambda: self._rank_to_id)
        self._load_markers()

    def _check_files(self, rels: list[str], what: str, remedy: str = "rebuild it with cache-teacher "
                                                                      "cache.overwrite=true") -> None:
        for rel in rels:
            problem = check_record(self.store, rel, self._files.get(rel))
            if problem is not None:
                raise CacheError(f"cache {self.root}: {rel} ({what}) is {problem}; {remedy}")

    # -- status

    def _load_markers(self) -> None:
        for shard in range(self.spec.num_shards):
            marker = read_shard_marker(self.store, shard, self.spec.shard_range(shard))
            if marker is not None:  # a truncated or malformed marker is an uncommitted shard
                self._markers[shard] = marker

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.spec.num_shards) if s not in self._markers]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def require_complete(self) -> None:
        missing = self.missing_shards()
        if missing and "extending" in self.manifest:
            raise CacheError(f"cache {self.root} is incomplete: an extension of it was interrupted "
                             f"({len(missing)} shards to write); {FINISH_EXTENSION}")
        if missing:
            raise CacheError(f"cache {self.root} is incomplete: {len(missing)} of {self.spec.num_shards} shards "
                             f"not committed (first: {missing[0]}); rerun cache-teacher with the same config to finish it")

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.spec.fingerprint

    def __len__(self) -> int:
        return self.spec.num_sequences

    def split_indices(self, split: str) -> np.ndarray:
        """The sequence indices of ``split``, in order (an extended cache's train split has two
        segments: the original train sequences, and those appended after eval)."""
        if split not in self.spec.splits:
            raise CacheError(f"cache {self.root} has no split {split!r} (it has {sorted(self.spec.splits)})")
        return self.spec.split_indices(split)

    # -- data

    def _check_shard(self, shard: int) -> None:
        if shard not in self._markers:
            raise CacheError(f"shard {shard} of cache {self.root} is not committed; "
                             "rerun cache-teacher with the same config to finish it")
        if not self.verify or shard in self._verified:
            return
        for rel, want in self._markers[shard]["files"].items():
            problem = check_record(self.store, rel, want)
            if problem is not None:
                problem = "missing" if problem == "missing" else "corrupt (checksum mismatch)"
                raise CacheError(f"cache {self.root}: file {rel} of shard {shard} is {problem}; "
                                 f"delete {DONE}/{shard_name(shard)}.json and rerun cache-teacher to rebuild it")
        self._verified.add(shard)

    @property
    def _rank_to_id(self) -> np.ndarray | None:
        """The rank -> id table (sqrt8, logp16), checked against the CRC recorded when the cache was created."""
        if not self.spec.uses_rank_table:
            return None
        if self._rank_to_id_cache is None:
            rels = [r for r in self._files if r.startswith(f"{ARRAYS}/rank_to_id/")]
            if self.verify and not rels:
                raise CacheError(f"cache {self.root} was written by an older version that did not checksum its "
                                 "rank_to_id table; rebuild it with cache-teacher cache.overwrite=true")
            self._check_files(rels, f"the {self.spec.topk_encoding} rank table")
            try:
                table = self._group["rank_to_id"][:]
            except Exception as e:
                raise CacheError(f"cache {self.root}: rank_to_id is unreadable ({e.__class__.__name__}); "
                                 "rebuild it with cache-teacher cache.overwrite=true") from None
            if self.verify and (table.shape != (self.spec.vocab_size,) or not np.array_equal(
                    np.sort(table), np.arange(self.spec.vocab_size))):
                raise CacheError(f"cache {self.root}: rank_to_id is not a permutation of the vocabulary; "
                                 "rebuild it with cache-teacher cache.overwrite=true")
            self._rank_to_id_cache = table
        return self._rank_to_id_cache

    def read_range(self, start: int, stop: int, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """Logical arrays (``CacheSpec.logical_arrays``) for sequences [start, stop), which must
        lie in committed shards; top-k arrays come decoded whatever the encoding."""
        if not 0 <= start < stop <= self.spec.num_sequences:
            raise IndexError(f"sequences [{start}, {stop}) outside [0, {self.spec.num_sequences})")
        names = tuple(names or self.spec.logical_arrays())
        unknown = set(names) - set(self.spec.logical_arrays()) - set(DERIVED)
        if unknown:
            raise CacheError(f"cache {self.root} has no array {sorted(unknown)[0]!r} "
                             f"(it has {', '.join(self.spec.logical_arrays() + DERIVED)})")
        topk = {"topk_ids", "topk_logprobs", "topk_log_tail"} & set(names)
        stored = [n for n in names if n not in topk and n not in ("hidden", "draw_ids")]
        stored += list(self._topk.stored if topk else ()) + list(self._hidden.stored if "hidden" in names else ())
        stored += list(self._samples.stored) if "draw_ids" in names else []
        out = self._read_stored(start, stop, tuple(dict.fromkeys(stored)))
        if topk:
            out.update(self._topk.decode(out))
        if "hidden" in names:
            out["hidden"] = self._hidden.decode(out)
        if "draw_ids" in names:
            out.update(self._samples.decode(out))
        return {n: out[n] for n in names}

    def read_indices(self, indices, names: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
        """``read_range`` for any sequence indices, in the order given (repeats allowed): one read
        per run of consecutive indices, so a shuffled batch costs as few reads as its runs."""
        indices = np.asarray(indices, np.int64)
        if indices.size == 0:
            raise IndexError("no sequences requested")
        wanted = np.unique(indices)
        breaks = np.flatnonzero(np.diff(wanted) != 1) + 1
        parts = [self.read_range(int(run[0]), int(run[-1]) + 1, names) for run in np.split(wanted, breaks)]
        rows = np.searchsorted(wanted, indices)
        return {n: np.concatenate([p[n] for p in parts])[rows] for n in parts[0]}

    def _read_stored(self, start: int, stop: int, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        for shard in range(start // self.spec.shard_sequences, (stop - 1) // self.spec.shard_sequences + 1):
            self._check_shard(shard)
        out = {}
        for name in names:
            try:
                out[name] = self._arrays[name][start:stop]
            except KeyError:
                raise
            except Exception as e:
                raise CacheError(f"cache {self.root}: cannot decode {name} for sequences [{start}, {stop}) "
                                 f"({e.__class__.__name__}: {e}); rebuild with cache.overwrite=true") from None
            if self.verify and out[name].dtype.kind == "f" and not np.isfinite(out[name]).all():
                bad = start + int(np.argwhere(~np.isfinite(out[name]))[0][0])
                raise CacheError(f"cache {self.root}: {name} of sequence {bad} holds NaN/Inf; "
                                 "rebuild the shard holding it with cache-teacher")
        return out

    def meta(self, shard: int) -> pa.Table:
        if shard not in self._meta:
            self._check_shard(shard)
            try:
                self._meta[shard] = self.store.read_arrow(f"{META}/{shard_name(shard)}.arrow")
            except (OSError, pa.ArrowInvalid) as e:
                raise CacheError(f"cache {self.root}: metadata of shard {shard} unreadable ({e}); "
                                 "rebuild with cache.overwrite=true") from None
        return self._meta[shard]

    def text(self, index: int) -> tuple[str, np.ndarray]:
        """A sequence's text and per-token char ends, from the Arrow metadata only (no arrays
        decoded): what re-tokenizing and bits-per-byte need."""
        rec = self._meta_row(index)
        return rec["text"], np.asarray(rec["char_end"], np.int64)

    def _meta_row(self, index: int) -> dict:
        shard, row = divmod(index, self.spec.shard_sequences)
        return self.meta(shard).slice(row, 1).to_pylist()[0]

    def sequence(self, index: int) -> Sequence:
        arrays = {k: v[0] for k, v in self.read_range(index, index + 1).items()}
        rec = self._meta_row(index)
        return Sequence(index=index, split=rec["split"], arrays=arrays, text=rec["text"],
                        char_end=np.asarray(rec["char_end"], np.int64), doc_id=np.asarray(rec["doc_id"], np.int64))

    def __iter__(self) -> Iterator[Sequence]:
        for i in range(len(self)):
            yield self.sequence(i)

    def documents(self) -> pa.Table:
        rel = f"{META}/documents.arrow"
        if not self._legacy:
            if rel not in self._files:
                raise CacheError(f"cache {self.root}: the documents table was never committed; "
                                 "rerun cache-teacher with the same config to write it")
            if self.verify:
                self._check_files([rel], "the documents table", "rerun cache-teacher with the same config to "
                                  "rewrite it")
        try:
            return self.store.read_arrow(rel)
        except (OSError, pa.ArrowInvalid) as e:
            raise CacheError(f"cache {self.root}: {rel} unreadable ({e}); rerun cache-teacher "
                             "with the same config") from None

    @property
    def has_head(self) -> bool:
        return self._head_marker is not None

    def head(self) -> np.ndarray | None:
        """The teacher's output head, or None when none was committed (``done/head.json``)."""
        if self._head_marker is None:
            return None
        remedy = (f"delete {DONE}/head.json and rerun cache-teacher with cache.store_head=true to rewrite it")
        if self.verify and not self._head_checked:
            for rel, want in self._head_marker["files"].items():
                problem = check_record(self.store, rel, want)
                if problem is not None:
                    raise CacheError(f"cache {self.root}: head file {rel} is {problem}; {remedy}")
        try:
            head = self._group["head"][:]
        except Exception as e:
            raise CacheError(f"cache {self.root}: the head is unreadable ({e.__class__.__name__}); {remedy}") from None
        if list(head.shape) != self._head_marker["shape"]:
            raise CacheError(f"cache {self.root}: the head has shape {list(head.shape)}, its marker says "
                             f"{self._head_marker['shape']}; {remedy}")
        if self.verify and not self._head_checked and not np.isfinite(head).all():
            raise CacheError(f"cache {self.root}: the head holds NaN/Inf; {remedy}")
        self._head_checked = True
        return head

    def views_root(self) -> Path:
        """Where derived views (cross-tokenizer alignments) of this cache are stored: inside a
        local cache, or under ``views_dir`` in a folder named by the cache's identity. A remote
        cache without ``views_dir`` keeps them in this user's local cache folder."""
        if self.views_dir is None and self.store.local_path() is not None:
            return self.store.local_path(VIEWS)
        ident = json.dumps([self.spec.fingerprint, self.spec.num_sequences], sort_keys=True, default=str)
        base = self.views_dir if self.views_dir is not None else user_cache_dir() / VIEWS
        return base / hashlib.sha256(ident.encode()).hexdigest()[:16]

    # -- summary (summary.py)

    def bytes_on_disk(self) -> int:
        return self.store.bytes_under("")

    def head_bytes(self) -> int:
        return self.store.bytes_under(f"{ARRAYS}/head")

    def stat_total(self, name: str) -> float | None:
        """The sum of one shard statistic over the committed shards (None if none records it)."""
        values = [m["stats"][name] for m in self._markers.values() if name in m.get("stats", {})]
        return sum(values) if values else None

    def summary_stats(self) -> dict[str, Any]:
        """Aggregate the committed shards' statistics (sums, so shards combine exactly)."""
        return cache_summary.summary_stats(self._markers.values())

    def info(self) -> dict[str, Any]:
        """The fields of ``inspect --json``."""
        return cache_summary.info(self, self.manifest.get("schema_version", SCHEMA_VERSION))

    def logit_bytes_per_token(self) -> float:
        """Bytes per token of what top-k KD needs: ids + values (+ tail) + logZ."""
        return cache_summary.logit_bytes_per_token(self.array_bytes_per_token())

    def array_bytes_per_token(self) -> dict[str, float]:
        tokens = self.spec.num_sequences * self.spec.seq_len
        return {name: round(self.store.bytes_under(f"{ARRAYS}/{name}") / tokens, 2) for name in self._arrays}
