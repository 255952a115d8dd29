"""What a cache is, fixed before the teacher runs: its spec (shapes, encodings, shards, splits),
the names of its logical arrays, its Arrow schemas and its manifest.

The full on-disk format, with every decoding rule, is ``docs/cache-format.md``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from . import logit_codec, logp_codec
from ..errors import CacheError
from .files import MANIFEST, manifest_digest_problem
from .store import Storage

SCHEMA_VERSION = 3  # 2: topk_encoding (sqrt8) replaced topk_dtype; 3: splits as segment lists, extensions
READABLE_VERSIONS = (2, 3)
SPLITS = ("train", "eval")
EXTENT_KEYS = ("dataset", "dataset_hash", "max_train_tokens", "max_eval_tokens")
"""Fingerprint fields that say how much data a cache holds; an extension may change them (the
rest say what every sequence's numbers are made of, and must stay equal)."""
LOGICAL = ("input_ids", "topk_ids", "topk_logprobs", "logz", "next_logprob", "hidden", "draw_ids", "draw_counts",
           "loss_mask")
"""What a writer is given and a reader returns, whatever the encodings (``codecs.py``)."""
DERIVED = ("topk_log_tail",)
"""Read-only logical arrays computed by the reader: ``topk_log_tail`` = log of the teacher's mass
beyond its top-k (sqrt8, logp16: the decoded explicit tail; float encodings: log(1 - sum p) in float64)."""
SQRT8_ARRAYS = ("topk_rank_gaps", "topk_sqrt_codes", "topk_tail_code")
LOGP16_ARRAYS = ("topk_rank_gaps", "topk_log_codes", "topk_log_tail_code")
RANK_TABLE_ENCODINGS = ("sqrt8", "logp16")
"""Encodings that store ids as rank gaps over the cache's ``rank_to_id`` table."""
DRAW_ARRAYS = ("draw_gaps", "draw_counts")
MASK_ARRAYS = ("loss_mask",)
"""Chat caches only (fingerprint key ``loss_mask``): 1 where a token is a target."""
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
    splits: dict[str, list[list[int]]]
    """split name -> its segments [first sequence, end sequence), ascending. A new cache has one
    segment per split (train, then eval); each extension appends train sequences at the end."""
    fingerprint: dict[str, Any]
    """The inputs that determine the cache's content; a rerun must match it exactly."""
    hidden_dtype: str = "float16"
    topk_encoding: str = "sqrt8"
    """sqrt8 (compact, see logit_codec.py), logp16 (log p on a grid, see logp_codec.py), float16 or
    float32 log-probs."""
    sqrt_levels: int = logit_codec.SQRT_LEVELS
    logp_step: float = logp_codec.LOGP_STEP
    """logp16: nats per code (code c decodes to log p = -c * logp_step)."""
    store_hidden: bool = True
    shard_sequences: int = 32
    chunk_sequences: int = 4
    zstd_level: int = 3
    samples: int = 0
    """RS-KD draws per position (0: no sampled tokens); the stored width of the sample arrays."""
    teacher: dict[str, Any] = field(default_factory=dict)
    """Facts about the teacher (name, head check, eos id, dtype): informative, not fingerprinted."""
    generations: list[dict[str, Any]] = field(default_factory=list)
    """Earlier extents of an extended cache, oldest first: ``{"fingerprint", "train_sequences",
    "num_sequences"}`` each. A student trained on one of them resumes on its train prefix."""

    def __post_init__(self):
        # Schema 2 stored one [start, stop) per split.
        self.splits = {name: [list(seg) for seg in (segs if segs and isinstance(segs[0], (list, tuple)) else [segs])]
                       for name, segs in self.splits.items()}

    @property
    def num_shards(self) -> int:
        return math.ceil(self.num_sequences / self.shard_sequences)

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = shard * self.shard_sequences
        return start, min(start + self.shard_sequences, self.num_sequences)

    @property
    def document_mask(self) -> bool:
        """The teacher ran each packed document alone (``data.document_mask``): stage 2 masks its
        student the same way. Caches without the fingerprint key (all older ones) read as false."""
        return bool(self.fingerprint.get("document_mask", False))

    @property
    def has_loss_mask(self) -> bool:
        """A cache of chat data: it stores ``loss_mask`` (only the assistant's tokens are targets).
        Told by the fingerprint, so plain-text caches keep their manifest byte for byte."""
        return "loss_mask" in self.fingerprint

    @property
    def uses_rank_table(self) -> bool:
        """True when top-k ids (and sampled ids) are stored as rank gaps over ``rank_to_id``."""
        return self.topk_encoding in RANK_TABLE_ENCODINGS

    def split_of(self, seq_index: int) -> str:
        for name, segments in self.splits.items():
            if any(start <= seq_index < stop for start, stop in segments):
                return name
        raise IndexError(seq_index)

    def split_indices(self, split: str) -> np.ndarray:
        """The sequence indices of ``split`` in order (int64)."""
        segments = self.splits.get(split, [])
        return np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in segments] or [np.zeros(0, np.int64)])

    def split_sizes(self) -> dict[str, int]:
        return {name: sum(b - a for a, b in segs) for name, segs in self.splits.items()}

    def train_sequences_of(self, fingerprint: dict[str, Any]) -> int | None:
        """How many train sequences (a prefix of ``split_indices("train")``) the cache held when
        its fingerprint was ``fingerprint``: now or at an earlier extent; None if never."""
        if fingerprint == self.fingerprint:
            return self.split_sizes().get("train", 0)
        for gen in reversed(self.generations):
            if gen.get("fingerprint") == fingerprint:
                return int(gen["train_sequences"])
        return None

    def array_specs(self) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
        """name -> (shape, dtype) of every per-token array as stored."""
        n, length, k, d = self.num_sequences, self.seq_len, self.top_k, self.hidden_dim
        ids = id_dtype(self.vocab_size)
        specs = {"input_ids": ((n, length), ids)}
        if self.topk_encoding == "sqrt8":
            specs.update({"topk_rank_gaps": ((n, length, k), ids), "topk_sqrt_codes": ((n, length, k), np.dtype(np.uint8)),
                          "topk_tail_code": ((n, length), np.dtype(np.uint8))})
        elif self.topk_encoding == "logp16":
            specs.update({"topk_rank_gaps": ((n, length, k), ids), "topk_log_codes": ((n, length, k), np.dtype(np.uint16)),
                          "topk_log_tail_code": ((n, length), np.dtype(np.uint16))})
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
        if self.has_loss_mask:
            specs["loss_mask"] = ((n, length), np.dtype(np.uint8))
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

    def tokens(self) -> int:
        return self.num_sequences * self.seq_len


# ---------------------------------------------------------------- the manifest


def fingerprint_diff(old: dict[str, Any], new: dict[str, Any], keys=None) -> list[str]:
    keys = sorted(set(old) | set(new)) if keys is None else keys
    return [f"{k}: cache has {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The differing fingerprint fields other than the extent (``EXTENT_KEYS``): what makes two
    caches' sequences incomparable, so that one cannot extend the other."""
    return fingerprint_diff(old, new, [k for k in sorted(set(old) | set(new)) if k not in EXTENT_KEYS])


def read_manifest(store: Storage) -> dict[str, Any]:
    """The cache's manifest, checked to be one this tool reads; ``CacheError`` saying what to do."""
    root, path = store.url, store.display(MANIFEST)
    if store.is_file(""):
        raise CacheError(f"cache path {root} is a file, not a cache directory; point cache.dir at a directory")
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise CacheError(f"{root} is not a teacher cache (no {MANIFEST}); run cache-teacher to build one") from None
    except (OSError, ValueError) as e:
        raise CacheError(f"{path} is unreadable ({e.__class__.__name__}: {e}); "
                         "rebuild the cache with cache-teacher cache.overwrite=true") from None
    if not isinstance(manifest, dict) or "schema_version" not in manifest or "spec" not in manifest:
        raise CacheError(f"{path} is not a cache manifest; rebuild with cache-teacher cache.overwrite=true")
    if manifest["schema_version"] not in READABLE_VERSIONS:
        raise CacheError(f"{root} has cache schema version {manifest['schema_version']}, this tool reads "
                         f"versions {', '.join(map(str, READABLE_VERSIONS))}; rebuild it with cache-teacher cache.overwrite=true")
    if not isinstance(manifest.get("files", {}), dict):
        raise CacheError(f"{path} is malformed (files); rebuild with cache-teacher cache.overwrite=true")
    if (problem := manifest_digest_problem(manifest)) is not None:
        raise CacheError(f"cache {root}: {problem}")
    return manifest


def spec_from_manifest(manifest: dict[str, Any], store: Storage) -> CacheSpec:
    try:
        return CacheSpec(**manifest["spec"])
    except TypeError as e:
        raise CacheError(f"{store.display(MANIFEST)} has a malformed spec ({e}); "
                         "rebuild with cache.overwrite=true") from None


