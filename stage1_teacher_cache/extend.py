"""Extending a complete cache with more train sequences (a larger ``data.max_train_tokens``, or
more files) without running the teacher again on what it already holds.

The new plan must begin with the cache: its first T train sequences are the cache's T train
sequences, token for token, and its eval sequences are the cache's eval sequences (the held-out
set never changes, so held-out numbers stay comparable across extents). The plan's further train
sequences are appended after the cache's last sequence, i.e. after eval, so train becomes two
segments. The teacher, tokenizer, encodings and sequence length must be the same
(``identity_diff``); only the extent fields of the fingerprint (``EXTENT_KEYS``) may change, and
the old fingerprint is kept in ``spec.generations`` so that students trained on the old extent
resume on exactly the prefix they saw.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from pipeline.cache import CacheReader, CacheSpec, CacheWriter
from pipeline.cache.files import MANIFEST
from pipeline.cache.spec import EXTENT_KEYS, fingerprint_diff, identity_diff, read_manifest, spec_from_manifest
from pipeline.cache.reader import FINISH_EXTENSION
from pipeline.cache.store import open_storage
from pipeline.config import Config
from pipeline.errors import CacheError, DataError, FingerprintMismatch

from .plan_store import Plan, Rows

CHECK_ROWS = 256  # sequences compared per read while checking the prefix


def open_cache(cfg: Config, spec: CacheSpec, plan: Plan, rank_table, show_progress: bool = True) -> CacheWriter:
    """The writer of this run's cache: created or reopened by ``CacheWriter.open``, or, when the
    cache differs from ``spec`` only in the data's extent and ``cache.extend`` is set, the
    complete cache extended by the train sequences ``plan`` adds."""
    store = open_storage(cfg.cache.dir)
    if not cfg.cache.overwrite and store.is_file(MANIFEST):
        manifest = read_manifest(store)
        cached = spec_from_manifest(manifest, store)
        if cached.fingerprint != spec.fingerprint and not identity_diff(cached.fingerprint, spec.fingerprint):
            if "extending" in manifest:  # not "rebuild": the interrupted extension only needs finishing
                raise CacheError(f"cache {store} is in the middle of an extension that was interrupted (it holds "
                                 f"other data than this config's); {FINISH_EXTENSION}")
            if not cfg.cache.extend:
                diff = fingerprint_diff(cached.fingerprint, spec.fingerprint, list(EXTENT_KEYS))
                raise FingerprintMismatch(
                    f"cache {store} holds other data ({'; '.join(diff)}); add cache.extend=true to append the new "
                    "train sequences to it (the teacher runs only on those), use another cache.dir, or rebuild it with "
                    "cache.overwrite=true")
            if not manifest.get("complete"):
                raise CacheError(f"cache {store} is not complete; finish it with the config it was started with "
                                 "(rerun cache-teacher), then extend it")
            return CacheWriter.extend(store, extended_spec(CacheReader(store, verify=False), spec, plan, show_progress))
    return CacheWriter.open(store, spec, overwrite=cfg.cache.overwrite, rank_table=rank_table)


def extended_spec(reader: CacheReader, wanted: CacheSpec, plan: Plan, show_progress: bool = True) -> CacheSpec:
    """The spec of ``reader``'s cache extended by the train sequences ``plan`` adds, after checking
    that the plan starts with the cache (``DataError`` saying what differs and what to do)."""
    cached = reader.spec
    have, planned = cached.split_sizes(), plan.count
    if planned.get("eval", 0) != have.get("eval", 0):
        raise DataError(
            f"the extended data would change the held-out set (the cache has {have.get('eval', 0)} eval sequences, "
            f"the new plan {planned.get('eval', 0)}); keep it with data.max_eval_tokens="
            f"{have.get('eval', 0) * cached.seq_len} and data.eval_documents / data.eval_fraction as they were")
    if planned["train"] <= have["train"]:
        raise DataError(f"the data gives {planned['train']} train sequences and the cache already holds "
                        f"{have['train']}: nothing to extend; raise data.max_train_tokens or add files")
    check_prefix(reader, plan, show_progress)
    added = planned["train"] - have["train"]
    first = cached.num_sequences
    splits = {name: [list(seg) for seg in segs] for name, segs in cached.splits.items()}
    train = splits["train"]
    if train[-1][1] == first:
        train[-1][1] = first + added  # train already ends the cache: that segment grows
    else:
        train.append([first, first + added])
    earlier = {"fingerprint": cached.fingerprint, "train_sequences": have["train"], "num_sequences": first}
    return dataclasses.replace(cached, num_sequences=first + added, splits=splits, fingerprint=wanted.fingerprint,
                               generations=[*cached.generations, earlier])


def check_prefix(reader: CacheReader, plan: Plan, show_progress: bool = True) -> None:
    """The plan's first train sequences and its eval sequences equal the cache's, token for token."""
    cached = reader.spec
    pairs = [(cached.split_indices("train"), 0)]
    if "eval" in cached.splits:
        pairs.append((cached.split_indices("eval"), plan.count["train"]))
    total = sum(len(idx) for idx, _ in pairs)
    with tqdm(total=total, desc="check cached prefix", unit="seq", disable=not show_progress, leave=False) as bar:
        for indices, plan_first in pairs:
            for a in range(0, len(indices), CHECK_ROWS):
                chunk = indices[a:a + CHECK_ROWS]
                want = plan.rows_of(plan_first + a, plan_first + a + len(chunk)).input_ids
                have = reader.read_indices(chunk, ("input_ids",))["input_ids"].astype(np.int64)
                if not np.array_equal(want, have):
                    row = int(chunk[int(np.flatnonzero((want != have).any(axis=1))[0])])
                    raise DataError(
                        f"the data no longer starts with what cache {reader.root} holds (sequence {row}, "
                        f"{cached.split_of(row)}, differs): an extension may only add documents after the cached "
                        "ones (same files in the same order, new files sorting last); use another cache.dir")
                bar.update(len(chunk))


def plan_rows(spec: CacheSpec, plan: Plan, first: int, stop: int) -> Rows:
    """The plan rows of the cache rows [first, stop), in cache order. A sequence's plan row is its
    rank in its split plus where that split starts in the plan (train first, then eval); after an
    extension a shard may hold rows of two segments, which are not adjacent in the plan."""
    runs: list[list[int]] = []  # [plan start, plan stop) of each run of consecutive plan rows
    for i in range(first, stop):
        row = _plan_row(spec, plan, i)
        if runs and runs[-1][1] == row:
            runs[-1][1] += 1
        else:
            runs.append([row, row + 1])
    parts = [plan.rows_of(a, b) for a, b in runs]
    if len(parts) == 1:
        return parts[0]
    return Rows(np.concatenate([p.input_ids for p in parts]), pa.concat_arrays([p.text for p in parts]),
                pa.concat_arrays([p.char_end for p in parts]), pa.concat_arrays([p.doc_id for p in parts]),
                None if parts[0].loss_mask is None else np.concatenate([p.loss_mask for p in parts]))


def _plan_row(spec: CacheSpec, plan: Plan, index: int) -> int:
    split = spec.split_of(index)
    rank = 0
    for start, stop in spec.splits[split]:
        if start <= index < stop:
            rank += index - start
            break
        rank += stop - start
    return plan.splits[split][0] + rank
