"""The teacher cache on disk: writer and reader side by side, so the two stages cannot drift.

Layout of a cache directory (schema version ``SCHEMA_VERSION``; the full format, with every
decoding rule, is ``docs/cache-format.md``; every array carries its own description in its zarr
attributes, ``cache_attrs.py``)::

    manifest.json          schema, fingerprint, plan (sequences, splits, shard boundaries), array
                           specs, teacher facts, ``files``: size + CRC32 of every zarr.json, of
                           rank_to_id and of meta/documents.arrow; rewritten atomically
    arrays.zarr/           zarr v3 group; every per-token array is [N, L, ...], sharded along N
                           with one shard = ``shard_sequences`` sequences, Blosc-zstd compressed
      input_ids            [N, L]     uint16 if the vocab fits, else uint32   teacher token ids
      topk_rank_gaps       [N, L, K]  uint16|uint32  topk_encoding=sqrt8 (default): the top-k ids as
      topk_sqrt_codes      [N, L, K]  uint8          rank gaps, round(sqrt(p) * M) and the tail mass
      topk_tail_code       [N, L]     uint8          coded alike (see logit_codec.py)
      rank_to_id           [V]        int64          sqrt8: the per-cache frequency rank table
      topk_ids             [N, L, K]  id type        topk_encoding=float16|float32: ids by logit desc.
      topk_logprobs        [N, L, K]  float16|float32   and their log p
      logz                 [N, L]     float32   logsumexp of the full-vocab logits (logit = logprob + logz)
      next_logprob         [N, L]     float32   log p(input_ids[t+1]); 0 at t = L-1 (no target there)
      hidden               [N, L, D]  float16|int8  post-norm last hidden state
      hidden_scale         [N, L]     float32   int8 only: hidden = codes * scale
      head                 [V, D]     float32   optional: the output head, for exact logits of any id
      draw_gaps          [N, L, S]  id type   samples=S > 0 (RS-KD): the distinct tokens drawn from the
      draw_counts        [N, L, S]  uint8     teacher, as rank gaps (sqrt8's table; else id gaps) and
                                                their counts; count 0 = padding (logit_codec.encode_samples)
    meta/documents.arrow   doc_id, name, split, chars                 one row per source document
    meta/shard-SSSSS.arrow seq_index, split, text, char_end, doc_id   one row per sequence
                           text: exactly the characters the sequence's tokens cover (an
                           end-of-document token stands for ``doc_separator``); char_end[t]: end of
                           token t in text; doc_id[t]: the document token t comes from
    done/shard-SSSSS.json  commit marker: written last, atomically; lists every file of the shard
                           with size and CRC32, and the shard's summary statistics
    done/head.json         the head's commit marker, written last: every head file with size + CRC32
    tokenizer/             the teacher's tokenizer (save_pretrained), files checksummed in the manifest
                           (tokenizer_files.py): stage 2 reads the tokenizer from here only

Readers see the logical arrays (``LOGICAL``): ``topk_ids`` (by descending probability) and
``topk_logprobs`` are decoded from the sqrt8 arrays when the cache uses that encoding;
``draw_ids`` from ``draw_gaps``.

A shard is complete exactly when a valid marker exists (``cache_files.read_shard_marker``: a
truncated or malformed one does not count, for writer and reader alike); the head exists exactly
when its marker does. Nothing the reader hands out is unvouched by a checksum. A crash at any
moment leaves at most
unfinished shards, which a rerun redoes. Each rank of a multi-process run writes only its own
shard files and markers, so nothing is shared but the manifest, which rank 0 alone writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import zarr
from zarr.codecs import BloscCodec

from . import cache_attrs, cache_summary, logit_codec
from .cache_files import (ARRAYS, DONE, MANIFEST, META, VIEWS, array_metadata_files,  # noqa: F401
                          atomic_write_bytes, atomic_write_json, check_finite, check_record, chunk_files, file_crc32,
                          file_record, move_aside, not_a_cache_reason, read_head_marker, read_shard_marker, records,
                          remove_leftovers, shard_name)
from .errors import CacheError, FingerprintMismatch, NonFiniteError

SCHEMA_VERSION = 2  # 2: topk_encoding (sqrt8) replaced topk_dtype
SPLITS = ("train", "eval")
LOGICAL = ("input_ids", "topk_ids", "topk_logprobs", "logz", "next_logprob", "hidden", "hidden_scale",
           "draw_ids", "draw_counts")
DERIVED = ("topk_log_tail",)
"""Read-only logical arrays computed by the reader: ``topk_log_tail`` = log of the teacher's mass
beyond its top-k (sqrt8: the decoded explicit tail; float encodings: log(1 - sum p) in float64)."""
SQRT8_ARRAYS = ("topk_rank_gaps", "topk_sqrt_codes", "topk_tail_code")
DRAW_ARRAYS = ("draw_gaps", "draw_counts")
COMPACT_ZSTD_LEVEL = 9  # the small coded arrays: level 9 saves ~5 B/token over 3 on the gaps, for little CPU

META_SCHEMA = pa.schema([
    ("seq_index", pa.int64()),
    ("split", pa.string()),
    ("text", pa.large_string()),
    ("char_end", pa.list_(pa.int32())),
    ("doc_id", pa.list_(pa.int32())),
])
DOCUMENTS_SCHEMA = pa.schema([
    ("doc_id", pa.int32()), ("name", pa.string()), ("split", pa.string()), ("chars", pa.int64()),
])


def quantize_hidden_int8(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: codes = round(h / s), s = max|h| / 127; error <= s / 2 per element.

    ``Sequence.hidden()`` inverts it (codes * s)."""
    absmax = np.abs(hidden).max(axis=-1)
    scale = (np.maximum(absmax, 1e-12) / 127.0).astype(np.float32)
    codes = np.clip(np.rint(hidden / scale[..., None]), -127, 127).astype(np.int8)
    return codes, scale


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer type that holds every token id."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


@dataclass
class CacheSpec:
    """Everything about a cache that is fixed before the teacher runs."""

    num_sequences: int
    seq_len: int
    top_k: int
    vocab_size: int
    hidden_dim: int
    splits: dict[str, list[int]]
    """split name -> [first sequence, end sequence); splits are contiguous and ordered."""
    fingerprint: dict[str, Any]
    """The inputs that determine the cache's content; a rerun must match it exactly."""
    hidden_dtype: str = "float16"
    topk_encoding: str = "sqrt8"
    """sqrt8 (compact, see logit_codec.py), float16 or float32 log-probs."""
    sqrt_levels: int = logit_codec.SQRT_LEVELS
    store_hidden: bool = True
    shard_sequences: int = 32
    chunk_sequences: int = 4
    zstd_level: int = 3
    samples: int = 0
    """RS-KD draws per position (0: no sampled tokens); the stored width of the sample arrays."""
    teacher: dict[str, Any] = field(default_factory=dict)
    """Facts about the teacher (name, head check, eos id, dtype): informative, not fingerprinted."""

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_sequences / self.shard_sequences)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_sequences
        return start, min(start + self.shard_sequences, self.num_sequences)

    def split_of(self, seq_index: int) -> str:
        for name, (start, stop) in self.splits.items():
            if start <= seq_index < stop:
                return name
        raise IndexError(seq_index)

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of every per-token array as stored."""
        n, length, k, d = self.num_sequences, self.seq_len, self.top_k, self.hidden_dim
        ids = id_dtype(self.vocab_size)
        specs = {"input_ids": ((n, length), ids)}
        if self.topk_encoding == "sqrt8":
            specs.update({"topk_rank_gaps": ((n, length, k), ids), "topk_sqrt_codes": ((n, length, k), np.dtype(np.uint8)),
                          "topk_tail_code": ((n, length), np.dtype(np.uint8))})
        else:
            specs.update({"topk_ids": ((n, length, k), ids),
                          "topk_logprobs": ((n, length, k), np.dtype(self.topk_encoding))})
        specs.update({
            "logz": ((n, length), np.dtype(np.float32)),
            "next_logprob": ((n, length), np.dtype(np.float32)),
        })
        if self.samples:
            specs.update({"draw_gaps": ((n, length, self.samples), ids),
                          "draw_counts": ((n, length, self.samples), np.dtype(np.uint8))})
        if self.store_hidden:
            specs["hidden"] = ((n, length, d), np.dtype(np.int8 if self.hidden_dtype == "int8" else np.float16))
            if self.hidden_dtype == "int8":
                specs["hidden_scale"] = ((n, length), np.dtype(np.float32))
        return specs

    def logical_arrays(self) -> tuple[str, ...]:
        """The arrays a writer is given and a reader returns (decoded, whatever the encoding)."""
        stored = self.array_specs()
        return tuple(name for name in LOGICAL if name in stored or name in ("topk_ids", "topk_logprobs")
                     or name == "draw_ids" and self.samples)


# ---------------------------------------------------------------- small file helpers


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    keys = sorted(set(old) | set(new))
    return [f"{k}: cache has {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def _read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if root.exists() and not root.is_dir():
        raise CacheError(f"cache path {root} is a file, not a cache directory; point cache.dir at a directory")
    if not path.is_file():
        raise CacheError(f"{root} is not a teacher cache (no {MANIFEST}); run cache-teacher to build one")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CacheError(f"{path} is unreadable ({e.__class__.__name__}: {e}); "
                         "rebuild the cache with cache-teacher cache.overwrite=true") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest or "spec" not in manifest:
        raise CacheError(f"{path} is not a cache manifest; rebuild with cache-teacher cache.overwrite=true")
    if manifest["schema_version"] != SCHEMA_VERSION:
        raise CacheError(f"{root} has cache schema version {manifest['schema_version']}, this tool reads "
                         f"version {SCHEMA_VERSION}; rebuild it with cache-teacher cache.overwrite=true")
    if not isinstance(manifest.get("files", {}), dict):
        raise CacheError(f"{path} is malformed (files); rebuild with cache-teacher cache.overwrite=true")
    return manifest


def _spec_from_manifest(manifest: dict[str, Any], root: Path) -> CacheSpec:
    try:
        return CacheSpec(**manifest["spec"])
    except TypeError as e:
        raise CacheError(f"{root / MANIFEST} has a malformed spec ({e}); rebuild with cache.overwrite=true") from None


# ---------------------------------------------------------------- writer


class CacheWriter:
    """Creates (or reopens for resume) a cache and commits it shard by shard.

    ``write_shard`` is synchronous and thread-safe for distinct shards; call it from a background
    thread to keep the teacher busy. Use ``CacheWriter.open`` to get one; hold the cache's lock
    (``cache_files.lock_path``) around it when several processes could write the same cache.
    """

    def __init__(self, root: Path, spec: CacheSpec, manifest: dict[str, Any]):
        self.root, self.spec, self.manifest = root, spec, manifest
        self._group = zarr.open_group(str(root / ARRAYS), mode="r+")
        # zarr does not store write_empty_chunks: without it a reopened array skips an all-zero
        # shard, and the shard's file (listed in its marker) would not exist.
        self._arrays = {name: self._group[name].with_config({"write_empty_chunks": True})
                        for name in spec.array_specs()}
        self._rank_to_id = self._group["rank_to_id"][:] if spec.topk_encoding == "sqrt8" else None

    @classmethod
    def open(cls, root: str | Path, spec: CacheSpec, *, overwrite: bool = False, create: bool = True,
             rank_table: Callable[[], np.ndarray] | None = None) -> CacheWriter:
        """Create the cache, or reopen an existing one built from the same fingerprint.

        ``create=False`` (non-zero ranks) waits for nothing and only reopens what rank 0 made.
        An existing cache with another fingerprint is refused with the differing fields named;
        ``overwrite=True`` replaces it, but only if it is recognisably a cache of this tool
        (``cache_files.not_a_cache_reason``). The new skeleton is built beside it first and
        swapped in by renames, so a kill at any moment leaves the old cache or the new one under
        the name, never a half-deleted tree. ``rank_table()`` gives the sqrt8 rank -> id table;
        it is called only when a cache is created.
        """
        root = Path(root)
        if root.exists() and not root.is_dir():
            raise CacheError(f"cache.dir {root} is a file, not a directory; choose another cache.dir")
        if create:
            remove_leftovers(root)
        replace = False
        if create and overwrite and root.exists() and any(root.iterdir()):
            reason = not_a_cache_reason(root)
            if reason is not None:
                raise CacheError(f"{root} is not a cache of this tool ({reason}); cache.overwrite=true only "
                                 "replaces caches: choose another cache.dir")
            replace = True
        if not replace and ((root / MANIFEST).exists() or not create):
            manifest = _read_manifest(root)
            diff = fingerprint_diff(manifest["spec"]["fingerprint"], spec.fingerprint)
            if diff:
                raise FingerprintMismatch(
                    f"cache {root} was built from other inputs ({'; '.join(diff)}); use another cache.dir "
                    "or rebuild with cache.overwrite=true")
            old = _spec_from_manifest(manifest, root)
            if old.num_sequences != spec.num_sequences or old.shard_sequences != spec.shard_sequences:
                raise FingerprintMismatch(
                    f"cache {root} has {old.num_sequences} sequences in shards of {old.shard_sequences}, "
                    f"the plan now has {spec.num_sequences} in shards of {spec.shard_sequences}; "
                    "rebuild with cache.overwrite=true")
            if create:
                _remove_stale_temp_files(root)
            return cls(root, old, manifest)
        if not replace and root.exists() and any(root.iterdir()):
            raise CacheError(f"{root} exists, is not empty and holds no cache manifest; "
                             "choose another cache.dir or remove it")
        # Build the skeleton beside the target and rename it into place: a crash leaves either
        # nothing or a whole skeleton, never a directory that is neither a cache nor empty.
        tmp = root.parent / f".{root.name}.creating"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / META).mkdir(parents=True)
        (tmp / DONE).mkdir()
        group = zarr.open_group(str(tmp / ARRAYS), mode="w",
                                attributes=cache_attrs.group_attrs(spec, SCHEMA_VERSION))
        for name, (shape, dtype) in spec.array_specs().items():
            level = COMPACT_ZSTD_LEVEL if name in SQRT8_ARRAYS + DRAW_ARRAYS else spec.zstd_level
            group.create_array(name, shape=shape, dtype=dtype, chunks=(spec.chunk_sequences,) + shape[1:],
                               shards=(spec.shard_sequences,) + shape[1:], fill_value=0,
                               compressors=BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"),
                               config={"write_empty_chunks": True}, attributes=cache_attrs.array_attrs(name, spec))
        vouched = array_metadata_files(tmp)
        if spec.topk_encoding == "sqrt8":
            if rank_table is None:
                raise ValueError("a sqrt8 cache needs its rank table at creation")
            table = np.asarray(rank_table(), np.int64)
            if sorted(table.tolist()) != list(range(spec.vocab_size)):
                raise ValueError("the rank table must be a permutation of the vocabulary")
            arr = group.create_array("rank_to_id", shape=table.shape, dtype=np.int64, chunks=table.shape,
                                     config={"write_empty_chunks": True},
                                     attributes=cache_attrs.array_attrs("rank_to_id", spec))
            arr[:] = table
            vouched += [f"{ARRAYS}/rank_to_id/zarr.json", *chunk_files(arr, f"{ARRAYS}/rank_to_id")]
        manifest = {"schema_version": SCHEMA_VERSION, "spec": asdict(spec), "complete": False, "summary": {},
                    "files": records(tmp, vouched)}
        atomic_write_json(tmp / MANIFEST, manifest)
        if root.exists() and not replace:
            root.rmdir()  # empty, checked above
        root.parent.mkdir(parents=True, exist_ok=True)
        aside = move_aside(root) if replace else None
        os.replace(tmp, root)
        if aside is not None:
            shutil.rmtree(aside)
        return cls(root, spec, manifest)

    # -- documents and head are written once, by rank 0, before any shard

    def has_documents(self) -> bool:
        return f"{META}/documents.arrow" in self.manifest.get("files", {})

    def write_documents(self, doc_ids: list[int], names: list[str], splits: list[str], chars: list[int]) -> None:
        """Write the documents table, then vouch for it in the manifest."""
        table = pa.table({"doc_id": pa.array(doc_ids, pa.int32()), "name": names, "split": splits,
                          "chars": pa.array(chars, pa.int64())}, schema=DOCUMENTS_SCHEMA)
        rel = f"{META}/documents.arrow"
        _write_arrow(self.root / rel, table)
        self.manifest.setdefault("files", {})[rel] = file_record(self.root / rel)
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def write_documents_file(self, source: Path) -> None:
        """Install a ready documents table (an Arrow IPC file of ``DOCUMENTS_SCHEMA``, e.g. stage 1's
        streamed plan's), copied without loading it into memory, then vouch for it in the manifest."""
        rel = f"{META}/documents.arrow"
        dst = self.root / rel
        tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, dst)
        self.manifest.setdefault("files", {})[rel] = file_record(dst)
        atomic_write_json(self.root / MANIFEST, self.manifest)

    def has_head(self) -> bool:
        """A head exists exactly when its commit marker does and vouches for every head file (a
        half-added or damaged head is written again)."""
        marker = read_head_marker(self.root)
        return marker is not None and all(check_record(self.root, rel, rec) is None
                                          for rel, rec in marker["files"].items())

    def write_head(self, head: np.ndarray) -> None:
        """Store the teacher's output head [V, D] (fp32) once: exact logits for any id later.

        Committed like a shard: leftovers of an interrupted add are removed, the array is written,
        then ``done/head.json`` (every head file with its CRC32) is written last, atomically."""
        if not np.isfinite(head).all():
            raise NonFiniteError("the teacher's output head holds NaN/Inf; it is not stored. Load the teacher "
                                 "with teacher.dtype=float32 or check its weights")
        (self.root / DONE / "head.json").unlink(missing_ok=True)
        shutil.rmtree(self.root / ARRAYS / "head", ignore_errors=True)
        arr = self._group.create_array("head", shape=head.shape, dtype=np.float32, chunks=(4096, head.shape[1]),
                                       compressors=BloscCodec(cname="zstd", clevel=self.spec.zstd_level,
                                                              shuffle="shuffle"), overwrite=True,
                                       config={"write_empty_chunks": True},
                                       attributes=cache_attrs.array_attrs("head", self.spec))
        arr[:] = head.astype(np.float32)
        rel = f"{ARRAYS}/head"
        marker = {"shape": list(head.shape), "dtype": "float32",
                  "files": records(self.root, [f"{rel}/zarr.json", *chunk_files(arr, rel)])}
        atomic_write_json(self.root / DONE / "head.json", marker)
        self.manifest["has_head"] = True
        atomic_write_json(self.root / MANIFEST, self.manifest)

    # -- shards

    def done_shards(self) -> set[int]:
        """Shards with a valid commit marker; the same rule as the reader's, so the two agree."""
        return {s for s in range(self.spec.num_shards) if read_shard_marker(self.root, s) is not None}

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.spec.num_shards) if s not in done]

    def encode_topk(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], float]:
        """Logical arrays -> stored arrays, and the summed KL(exact || stored) over K+1 buckets
        (the encoding's fidelity, measured on every position written)."""
        out = dict(arrays)
        ids, logprobs = out.pop("topk_ids"), out.pop("topk_logprobs").astype(np.float32)
        if self.spec.topk_encoding == "sqrt8":
            gaps, codes, tail = logit_codec.encode(ids, logprobs, self._rank_to_id, self.spec.sqrt_levels)
            out.update(topk_rank_gaps=gaps, topk_sqrt_codes=codes, topk_tail_code=tail)
            stored = logit_codec.roundtrip(logprobs, self.spec.sqrt_levels)
        else:
            out.update(topk_ids=ids, topk_logprobs=logprobs)
            stored = logprobs.astype(self.spec.topk_encoding).astype(np.float32)
        return out, float(logit_codec.bucket_kl(logprobs, stored).sum())

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], meta: dict[str, list],
                    stats: dict[str, float]) -> None:
        """Write one shard: its logical arrays (encoded as the spec says) and metadata, then its
        commit marker. ``stats`` are sums; ``topk_encoding_kl_sum`` is added here."""
        start, stop = self.spec.shard_range(shard)
        if set(arrays) != set(self.spec.logical_arrays()):
            raise ValueError(f"shard arrays {sorted(arrays)} != expected {sorted(self.spec.logical_arrays())}")
        check_finite(shard, start, stop, arrays)
        arrays, kl_sum = self.encode_topk(arrays)
        if self.spec.samples:
            gaps, arrays["draw_counts"] = logit_codec.encode_samples(arrays.pop("draw_ids"),
                                                                       arrays["draw_counts"], self._rank_to_id)
            arrays["draw_gaps"] = gaps
        stats = {**stats, "topk_encoding_kl_sum": kl_sum}
        specs = self.spec.array_specs()
        rels = {name: f"{ARRAYS}/{name}/{self._arrays[name].metadata.encode_chunk_key((shard,) + (0,) * (len(shape) - 1))}"
                for name, (shape, _) in specs.items()}
        # An uncommitted shard's old files may be damaged (that may be why it is redone): zarr
        # would read a partial shard's index back before writing, so start from nothing.
        (self.root / DONE / f"{shard_name(shard)}.json").unlink(missing_ok=True)
        for rel in [*rels.values(), f"{META}/{shard_name(shard)}.arrow"]:
            (self.root / rel).unlink(missing_ok=True)
        files: dict[str, dict[str, int]] = {}
        for name, (shape, dtype) in specs.items():
            data = arrays[name]
            if data.shape != (stop - start,) + shape[1:]:
                raise ValueError(f"{name}: shape {data.shape} != {(stop - start,) + shape[1:]}")
            self._arrays[name][start:stop] = data.astype(dtype, copy=False)
            files[rels[name]] = {}
        table = pa.table({"seq_index": pa.array(range(start, stop), pa.int64()),
                          "split": [self.spec.split_of(i) for i in range(start, stop)], **meta},
                         schema=META_SCHEMA)
        meta_rel = f"{META}/{shard_name(shard)}.arrow"
        _write_arrow(self.root / meta_rel, table)
        files[meta_rel] = {}
        for rel in files:
            path = self.root / rel
            files[rel] = {"bytes": path.stat().st_size, "crc32": file_crc32(path)}
        marker = {"shard": shard, "start": start, "stop": stop, "files": files, "stats": stats}
        atomic_write_json(self.root / DONE / f"{shard_name(shard)}.json", marker)

    def finalize(self, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0, after every shard is committed: mark the manifest complete with the summary."""
        reader = CacheReader(self.root, verify=False)
        missing = reader.missing_shards()
        if missing:
            raise CacheError(f"cannot finalize {self.root}: shards {missing[:10]} are not committed")
        summary = reader.summary_stats()
        summary.update(extra_summary or {})
        self.manifest.update(complete=True, summary=summary)
        atomic_write_json(self.root / MANIFEST, self.manifest)
        return summary


def _remove_stale_temp_files(root: Path) -> None:
    """Temp files of writes that a crash cut short: never referenced, safe to drop on resume."""
    for folder in (root, root / META, root / DONE):
        for p in folder.glob(".*.tmp*"):
            p.unlink(missing_ok=True)
    for p in (root / ARRAYS).rglob("*.partial"):  # zarr's LocalStore writes through <key>.<uuid>.partial
        p.unlink(missing_ok=True)


def _write_arrow(path: Path, table: pa.Table) -> None:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


# ---------------------------------------------------------------- reader


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
        """The hidden states as float32, int8 codes dequantized."""
        h = self.arrays["hidden"]
        if h.dtype == np.int8:
            return h.astype(np.float32) * self.arrays["hidden_scale"][..., None]
        return h.astype(np.float32)

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

    def __init__(self, root: str | Path, *, verify: bool = True, views_dir: str | Path | None = None):
        self.root = Path(root)
        if not self.root.exists():
            raise CacheError(f"cache {self.root} does not exist; build it with cache-teacher (cache.dir={self.root})")
        self.manifest = _read_manifest(self.root)
        self.spec = _spec_from_manifest(self.manifest, self.root)
        self.verify = verify
        self.views_dir = Path(views_dir) if views_dir else None
        self._files: dict[str, Any] = self.manifest.get("files", {})
        self._legacy = "files" not in self.manifest  # written before arrays outside shards were checksummed
        self._markers: dict[int, dict[str, Any]] = {}
        self._verified: set[int] = set()
        self._meta: dict[int, pa.Table] = {}
        self._rank_to_id_cache: np.ndarray | None = None
        if verify:
            self._check_files([rel for rel in self._files if rel.endswith("zarr.json")], "array metadata")
        try:
            self._group = zarr.open_group(str(self.root / ARRAYS), mode="r")
            self._arrays = {name: self._group[name] for name in self.spec.array_specs()}
        except Exception as e:  # zarr raises many types for missing/corrupt metadata
            raise CacheError(f"{self.root / ARRAYS} is damaged ({e.__class__.__name__}: {e}); "
                             "rebuild with cache-teacher cache.overwrite=true") from None
        self._head_marker = read_head_marker(self.root)
        self._head_checked = False
        self._load_markers()

    def _check_files(self, rels: list[str], what: str, remedy: str = "rebuild it with cache-teacher "
                                                                      "cache.overwrite=true") -> None:
        for rel in rels:
            problem = check_record(self.root, rel, self._files.get(rel))
            if problem is not None:
                raise CacheError(f"cache {self.root}: {rel} ({what}) is {problem}; {remedy}")

    # -- status

    def _load_markers(self) -> None:
        for shard in range(self.spec.num_shards):
            marker = read_shard_marker(self.root, shard)
            if marker is not None:  # a truncated or malformed marker is an uncommitted shard
                self._markers[shard] = marker

    def missing_shards(self) -> list[int]:
        return [s for s in range(self.spec.num_shards) if s not in self._markers]

    @property
    def complete(self) -> bool:
        return not self.missing_shards()

    def require_complete(self) -> None:
        missing = self.missing_shards()
        if missing:
            raise CacheError(f"cache {self.root} is incomplete: {len(missing)} of {self.spec.num_shards} shards "
                             f"not committed (first: {missing[0]}); rerun cache-teacher with the same config to finish it")

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.spec.fingerprint

    def __len__(self) -> int:
        return self.spec.num_sequences

    def split_indices(self, split: str) -> range:
        if split not in self.spec.splits:
            raise CacheError(f"cache {self.root} has no split {split!r} (it has {sorted(self.spec.splits)})")
        start, stop = self.spec.splits[split]
        return range(start, stop)

    # -- data

    def _check_shard(self, shard: int) -> None:
        if shard not in self._markers:
            raise CacheError(f"shard {shard} of cache {self.root} is not committed; "
                             "rerun cache-teacher with the same config to finish it")
        if not self.verify or shard in self._verified:
            return
        for rel, want in self._markers[shard]["files"].items():
            problem = check_record(self.root, rel, want)
            if problem is not None:
                problem = "missing" if problem == "missing" else "corrupt (checksum mismatch)"
                raise CacheError(f"cache {self.root}: file {rel} of shard {shard} is {problem}; "
                                 f"delete {DONE}/{shard_name(shard)}.json and rerun cache-teacher to rebuild it")
        self._verified.add(shard)

    @property
    def _rank_to_id(self) -> np.ndarray | None:
        """sqrt8's rank -> id table, checked against the CRC recorded when the cache was created."""
        if self.spec.topk_encoding != "sqrt8":
            return None
        if self._rank_to_id_cache is None:
            rels = [r for r in self._files if r.startswith(f"{ARRAYS}/rank_to_id/")]
            if self.verify and not rels:
                raise CacheError(f"cache {self.root} was written by an older version that did not checksum its "
                                 "rank_to_id table; rebuild it with cache-teacher cache.overwrite=true")
            self._check_files(rels, "the sqrt8 rank table")
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
        topk = {"topk_ids", "topk_logprobs", "topk_log_tail"}
        decode = self.spec.topk_encoding == "sqrt8" and bool(topk & set(names))
        stored = [n for n in names if n != "draw_ids" and (n not in topk or not decode and n != "topk_log_tail")]
        if "topk_log_tail" in names and not decode and "topk_logprobs" not in stored:
            stored.append("topk_logprobs")
        out = self._read_stored(start, stop, tuple(stored) + (SQRT8_ARRAYS if decode else ()))
        if decode:
            ids, logprobs, log_tail = logit_codec.decode_with_tail(*(out.pop(n) for n in SQRT8_ARRAYS),
                                                                   self._rank_to_id, self.spec.sqrt_levels)
            out.update(topk_ids=ids.astype(id_dtype(self.spec.vocab_size)), topk_logprobs=logprobs,
                       topk_log_tail=log_tail.astype(np.float32))
        elif "topk_log_tail" in names:  # float caches: 1 - sum in float64, as exact as the stored values
            mass = np.exp(out["topk_logprobs"].astype(np.float64)).sum(-1)
            out["topk_log_tail"] = np.log(np.clip(1.0 - mass, 1e-300, None)).astype(np.float32)
        if "draw_ids" in names:
            ids = logit_codec.decode_samples(self._read_stored(start, stop, ("draw_gaps",))["draw_gaps"],
                                             self._rank_to_id)
            out["draw_ids"] = ids.astype(id_dtype(self.spec.vocab_size))
        return {n: out[n] for n in names}

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
            path = self.root / META / f"{shard_name(shard)}.arrow"
            try:
                with pa.memory_map(str(path)) as source:
                    self._meta[shard] = ipc.open_file(source).read_all()
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
            with pa.memory_map(str(self.root / rel)) as source:
                return ipc.open_file(source).read_all()
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
                problem = check_record(self.root, rel, want)
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
        """Where derived views (cross-tokenizer alignments) of this cache are stored: inside the
        cache, or under ``views_dir`` in a folder named by the cache's identity."""
        if self.views_dir is None:
            return self.root / VIEWS
        ident = json.dumps([self.spec.fingerprint, self.spec.num_sequences], sort_keys=True, default=str)
        return self.views_dir / hashlib.sha256(ident.encode()).hexdigest()[:16]

    # -- summary (pipeline/cache_summary.py)

    def bytes_on_disk(self) -> int:
        return cache_summary.bytes_on_disk(self.root)

    def head_bytes(self) -> int:
        return cache_summary.bytes_on_disk(self.root / ARRAYS / "head")

    def summary_stats(self) -> dict[str, Any]:
        """Aggregate the committed shards' statistics (sums, so shards combine exactly)."""
        return cache_summary.summary_stats(self._markers.values())

    def info(self) -> dict[str, Any]:
        """The fields of ``inspect --json``."""
        return cache_summary.info(self, SCHEMA_VERSION)

    def logit_bytes_per_token(self) -> float:
        """Bytes per token of what top-k KD needs: ids + values (+ tail) + logZ."""
        return cache_summary.logit_bytes_per_token(self.array_bytes_per_token())

    def array_bytes_per_token(self) -> dict[str, float]:
        tokens = self.spec.num_sequences * self.spec.seq_len
        return {name: round(cache_summary.bytes_on_disk(self.root / ARRAYS / name) / tokens, 2) for name in self._arrays}
