"""Writing a cache: create (or reopen for resume), then commit shard by shard.

Commit protocol (the same on a local disk and an object store, ``store.py``): a shard's arrays
and metadata are written first, then its marker ``done/shard-S.json`` listing every file with
size and CRC32, in one all-or-nothing write. A shard counts exactly when a valid marker exists;
a crash leaves at most unfinished shards, which a rerun redoes. The head is committed the same
way (``done/head.json``). Each rank of a multi-process run writes only its own shard files and
markers; rank 0 alone writes the manifest.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import zarr
from zarr.codecs import BloscCodec

from ..errors import CacheError, FingerprintMismatch, NonFiniteError
from . import attrs
from .codecs import SamplesCodec, hidden_codec, topk_codec
from .files import (ARRAYS, CREATING, DONE, HEAD_MARKER, MANIFEST, META, array_metadata_files, check_finite,
                    check_record, chunk_files, clear_for_replacement, file_record, interrupted_creation,
                    mark_creation, move_aside, not_a_cache_reason, read_head_marker, read_shard_marker, records,
                    remove_leftovers, shard_name, write_json)
from .spec import (COMPACT_ZSTD_LEVEL, DOCUMENTS_SCHEMA, DRAW_ARRAYS, LOGP16_ARRAYS, MASK_ARRAYS, META_SCHEMA,
                   SCHEMA_VERSION, SQRT8_ARRAYS, CacheSpec, fingerprint_diff, read_manifest, spec_from_manifest)
from .store import LocalStorage, Storage, open_storage


class CacheWriter:
    """Creates (or reopens for resume) a cache and commits it shard by shard.

    ``write_shard`` is synchronous and thread-safe for distinct shards; call it from a background
    thread to keep the teacher busy. Use ``CacheWriter.open`` to get one; hold the cache's lock
    (``files.lock_path``) around it when several processes could write the same cache.
    """

    def __init__(self, store: Storage, spec: CacheSpec, manifest: dict[str, Any]):
        self.store, self.spec, self.manifest = store, spec, manifest
        self.root = store.location
        try:
            self._group = zarr.open_group(store.zarr_store(ARRAYS, read_only=False), mode="r+")
        except Exception as e:  # zarr raises many types for missing/corrupt metadata
            raise CacheError(f"{store.display(ARRAYS)} is damaged ({e.__class__.__name__}); "
                             "rebuild with cache-teacher cache.overwrite=true") from None
        if "extending" in manifest:
            self._grow_arrays()
        # zarr does not store write_empty_chunks: without it a reopened array skips an all-zero
        # shard, and the shard's file (listed in its marker) would not exist.
        self._arrays = {name: self._group[name].with_config({"write_empty_chunks": True})
                        for name in spec.array_specs()}
        rank_to_id = self._group["rank_to_id"][:] if spec.uses_rank_table else None
        self._topk = topk_codec(spec, lambda: rank_to_id)
        self._hidden = hidden_codec(spec)
        self._samples = SamplesCodec(spec, lambda: rank_to_id)

    @classmethod
    def open(cls, root: str | Path | Storage, spec: CacheSpec, *, overwrite: bool = False, create: bool = True,
             rank_table: Callable[[], np.ndarray] | None = None) -> CacheWriter:
        """Create the cache, or reopen an existing one built from the same fingerprint.

        ``create=False`` (non-zero ranks) waits for nothing and only reopens what rank 0 made.
        An existing cache with another fingerprint is refused with the differing fields named;
        ``overwrite=True`` replaces it, but only if it is recognisably a cache of this tool
        (``files.not_a_cache_reason``). Locally the new skeleton is built beside it first and
        swapped in by renames, so a kill at any moment leaves the old cache or the new one under
        the name, never a half-deleted tree; on an object store (no rename) the old cache is
        deleted markers first and manifest last (``files.clear_for_replacement``), and the new
        skeleton's manifest is written last. ``rank_table()`` gives the sqrt8 rank -> id table;
        it is called only when a cache is created.
        """
        store = open_storage(root)
        if store.is_file(""):
            raise CacheError(f"cache.dir {store} is a file, not a directory; choose another cache.dir")
        local = store.local_path() is not None  # a directory here: build beside it, swap in by rename
        if local and store.local_path().is_symlink():  # a link to the cache: create or replace what it names
            store = LocalStorage(store.local_path().resolve())
        if create:
            _remove_interrupted_creation(store, local)
        replace = create and overwrite and _may_replace(store)
        if not replace and (store.is_file(MANIFEST) or not create):
            old, manifest = _matching_cache(store, spec, create)
            if create and local:
                _remove_stale_temp_files(store.local_path())
            return cls(store, old, manifest)
        if not replace and store.list():
            raise CacheError(f"{store} exists, is not empty and holds no cache manifest; "
                             "choose another cache.dir or remove it")
        if not local:
            if replace:
                clear_for_replacement(store)  # writes this tool's creation marker first
            else:
                mark_creation(store)
            manifest = _build_skeleton(store, spec, rank_table)
            store.remove(CREATING)
            return cls(store, spec, manifest)
        return cls(store, spec, _create_locally(store.local_path(), spec, rank_table, replace))

    # -- extension: more train sequences appended to a complete cache

    @classmethod
    def extend(cls, root: str | Path | Storage, spec: CacheSpec) -> CacheWriter:
        """Grow the complete cache at ``root`` to ``spec``: the same cache (same identity, same
        shards) with train sequences appended after its last one, which ``spec.generations``
        records. Nothing the cache holds is rewritten except the last shard when it is partial:
        its new rows are written beside the old ones (zarr rewrites the shard file with the old
        rows' stored bytes unchanged), after its files were verified against their checksums.

        Crash-safe in the same way as a build: the manifest (the new spec, incomplete, and the
        kept rows' statistics) is written first, then the partial shard's marker is removed, so
        a rerun finds the extension pending and redoes only uncommitted shards."""
        store = open_storage(root)
        manifest = read_manifest(store)
        old = spec_from_manifest(manifest, store)
        if not manifest.get("complete"):
            raise CacheError(f"cache {store} is not complete; finish it with the config it was started with "
                             "before extending it")
        grows = (spec.num_sequences > old.num_sequences and spec.shard_sequences == old.shard_sequences
                 and all(spec.split_indices(n)[:old.split_sizes()[n]].tolist() == old.split_indices(n).tolist()
                         for n in old.splits))
        if not grows:
            raise ValueError("an extension must keep every sequence where it is and only add sequences")
        first = old.num_sequences
        shard = first // old.shard_sequences
        kept: dict[str, float] = {}
        if first % old.shard_sequences:  # the last shard is partial: it will grow
            marker = read_shard_marker(store, shard, old.shard_range(shard))
            damaged = marker is None or any(check_record(store, rel, rec) is not None
                                            for rel, rec in marker["files"].items())
            if damaged:
                raise CacheError(f"cache {store}: shard {shard} is damaged or uncommitted; run inspect --verify and "
                                 "repair the cache before extending it")
            kept = marker["stats"]
        manifest = {**manifest, "schema_version": SCHEMA_VERSION, "spec": asdict(spec), "complete": False,
                    "extending": {"from_sequences": first, "kept_stats": kept}}
        write_json(store, MANIFEST, manifest)
        if kept:
            store.remove(f"{DONE}/{shard_name(shard)}.json")
        return cls(store, spec, manifest)

    def _grow_arrays(self) -> None:
        """Give every array the (larger) shape of the spec, once, and vouch for the new metadata."""
        grown = False
        for name, (shape, _) in self.spec.array_specs().items():
            array = self._group[name]
            if array.shape != shape:
                if array.shape[1:] != shape[1:] or array.shape[0] > shape[0]:
                    raise CacheError(f"{self.store.display(ARRAYS)}/{name} has shape {array.shape}, the extended "
                                     f"cache needs {shape}; rebuild with cache-teacher cache.overwrite=true")
                array.resize(shape)
                grown = True
        if grown or self._group.attrs.get("schema_version") != SCHEMA_VERSION:
            self._group.attrs.update(attrs.group_attrs(self.spec, SCHEMA_VERSION))
        # Only when they changed: the other ranks of a torchrun job reopen after rank 0 grew them.
        files = self.manifest.setdefault("files", {})
        fresh = records(self.store, array_metadata_files(self.store))
        if any(files.get(rel) != rec for rel, rec in fresh.items()):
            files.update(fresh)
            write_json(self.store, MANIFEST, self.manifest)

    def rows_to_write(self, shard: int) -> tuple[int, int]:
        """The rows [first, stop) of ``shard`` that its writer computes: all of them, except in
        the partial last shard of a cache being extended, whose old rows are kept."""
        start, stop = self.spec.shard_range(shard)
        kept_below = self.manifest.get("extending", {}).get("from_sequences", 0)
        return (kept_below, stop) if start < kept_below < stop else (start, stop)

    # -- documents and head are written once, by rank 0, before any shard

    def has_documents(self) -> bool:
        """The documents table exists exactly when the manifest vouches for it and it matches its
        record (a damaged one is written again by a rerun, as ``inspect --verify`` advises)."""
        rel = f"{META}/documents.arrow"
        record = self.manifest.get("files", {}).get(rel)
        return record is not None and check_record(self.store, rel, record) is None

    def write_documents(self, doc_ids: list[int], names: list[str], splits: list[str], chars: list[int]) -> None:
        """Write the documents table, then vouch for it in the manifest."""
        table = pa.table({"doc_id": pa.array(doc_ids, pa.int32()), "name": names, "split": splits,
                          "chars": pa.array(chars, pa.int64())}, schema=DOCUMENTS_SCHEMA)
        rel = f"{META}/documents.arrow"
        self.store.write_bytes(rel, arrow_bytes(table))
        self._vouch(rel)

    def write_documents_file(self, source: Path) -> None:
        """Install a ready documents table (an Arrow IPC file of ``DOCUMENTS_SCHEMA``, e.g. stage 1's
        streamed plan's), copied without loading it into memory, then vouch for it in the manifest."""
        rel = f"{META}/documents.arrow"
        self.store.put_file(rel, source)
        self._vouch(rel)

    def _vouch(self, rel: str) -> None:
        self.manifest.setdefault("files", {})[rel] = file_record(self.store, rel)
        write_json(self.store, MANIFEST, self.manifest)

    def has_head(self) -> bool:
        """A head exists exactly when its commit marker does and vouches for every head file (a
        half-added or damaged head is written again)."""
        marker = read_head_marker(self.store)
        return marker is not None and all(check_record(self.store, rel, rec) is None
                                          for rel, rec in marker["files"].items())

    def write_head(self, head: np.ndarray) -> None:
        """Store the teacher's output head [V, D] (fp32) once: exact logits for any id later.

        Committed like a shard: leftovers of an interrupted add are removed, the array is written,
        then ``done/head.json`` (every head file with its CRC32) is written last, in one write."""
        if not np.isfinite(head).all():
            raise NonFiniteError("the teacher's output head holds NaN/Inf; it is not stored. Load the teacher "
                                 "with teacher.dtype=float32 or check its weights")
        self.store.remove(f"{DONE}/{HEAD_MARKER}")
        self.store.remove_tree(f"{ARRAYS}/head")
        arr = self._group.create_array("head", shape=head.shape, dtype=np.float32, chunks=(4096, head.shape[1]),
                                       compressors=BloscCodec(cname="zstd", clevel=self.spec.zstd_level,
                                                              shuffle="shuffle"), overwrite=True,
                                       config={"write_empty_chunks": True},
                                       attributes=attrs.array_attrs("head", self.spec))
        arr[:] = head.astype(np.float32)
        rel = f"{ARRAYS}/head"
        marker = {"shape": list(head.shape), "dtype": "float32",
                  "files": records(self.store, [f"{rel}/zarr.json", *chunk_files(arr, rel)])}
        write_json(self.store, f"{DONE}/{HEAD_MARKER}", marker)
        self.manifest["has_head"] = True
        write_json(self.store, MANIFEST, self.manifest)

    # -- shards

    def done_shards(self) -> set[int]:
        """Shards with a valid commit marker; the same rule as the reader's, so the two agree."""
        return {s for s in range(self.spec.num_shards) if read_shard_marker(self.store, s, self.spec.shard_range(s)) is not None}

    def pending_shards(self) -> list[int]:
        done = self.done_shards()
        return [s for s in range(self.spec.num_shards) if s not in done]

    def encode(self, arrays: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Logical arrays -> stored arrays (``codecs.py``), and the top-k encoding's fidelity sums
        (``codecs.fidelity_sums``: KL at temperature 1 and the KD floor at several temperatures,
        measured on every position written)."""
        out = dict(arrays)
        stored, fidelity = self._topk.encode(out.pop("topk_ids"), out.pop("topk_logprobs").astype(np.float32),
                                             out.pop("topk_log_tail", None))
        out.update(stored)
        coded = len(self._hidden.stored) > 1 and set(self._hidden.stored) <= set(out)  # int8 codes + scale given
        if "hidden" in out and not coded:
            out.update(self._hidden.encode(out.pop("hidden")))
        if self.spec.samples:
            out.update(self._samples.encode(out.pop("draw_ids"), out.pop("draw_counts")))
        return out, fidelity

    def write_shard(self, shard: int, arrays: dict[str, np.ndarray], meta: dict[str, list],
                    stats: dict[str, float]) -> None:
        """Write one shard's rows ``rows_to_write(shard)``: their logical arrays (encoded as the
        spec says) and metadata, then the shard's commit marker. ``stats`` are sums; the
        encoding's fidelity sums are added here."""
        start, stop = self.spec.shard_range(shard)
        first, _ = self.rows_to_write(shard)
        logical = set(self.spec.logical_arrays())
        given = set(arrays) - {"topk_log_tail"}  # optional: the teacher's exact tail, else derived
        if given not in (logical, logical | set(self._hidden.stored)):  # hidden as floats or already coded
            raise ValueError(f"shard arrays {sorted(arrays)} != expected {sorted(logical)}")
        check_finite(shard, first, stop, arrays)
        arrays, fidelity = self.encode(arrays)
        stats = {**stats, **fidelity}
        specs = self.spec.array_specs()
        rels = {name: f"{ARRAYS}/{name}/{self._arrays[name].metadata.encode_chunk_key((shard,) + (0,) * (len(shape) - 1))}"
                for name, (shape, _) in specs.items()}
        meta_rel = f"{META}/{shard_name(shard)}.arrow"
        self.store.remove(f"{DONE}/{shard_name(shard)}.json")
        kept_meta = None
        if first > start:  # the partial last shard of an extended cache: its old rows stay
            kept_meta = self._kept_meta(meta_rel, first - start)
            stats = {k: self.manifest["extending"]["kept_stats"].get(k, 0.0) + stats.get(k, 0.0)
                     for k in {*stats, *self.manifest["extending"]["kept_stats"]}}
        else:
            # An uncommitted shard's old files may be damaged (that may be why it is redone): zarr
            # would read a partial shard's index back before writing, so start from nothing.
            for rel in [*rels.values(), meta_rel]:
                self.store.remove(rel)
        for name, (shape, dtype) in specs.items():
            data = arrays[name]
            if data.shape != (stop - first,) + shape[1:]:
                raise ValueError(f"{name}: shape {data.shape} != {(stop - first,) + shape[1:]}")
            self._arrays[name][first:stop] = data.astype(dtype, copy=False)
        table = pa.table({"seq_index": pa.array(range(first, stop), pa.int64()),
                          "split": [self.spec.split_of(i) for i in range(first, stop)], **meta},
                         schema=META_SCHEMA)
        if kept_meta is not None:
            table = pa.concat_tables([kept_meta, table]).combine_chunks()  # one batch, as a shard written whole
        self.store.write_bytes(meta_rel, arrow_bytes(table))
        marker = {"shard": shard, "start": start, "stop": stop, "files": records(self.store, [*rels.values(), meta_rel]),
                  "stats": stats}
        write_json(self.store, f"{DONE}/{shard_name(shard)}.json", marker)

    def _kept_meta(self, rel: str, rows: int) -> pa.Table:
        """The first ``rows`` metadata rows of a shard being grown (a rerun after a crash may find
        the file already grown: only its first rows are kept)."""
        try:
            table = ipc.open_file(pa.BufferReader(self.store.read_bytes(rel))).read_all()
        except (OSError, pa.ArrowInvalid) as e:
            raise CacheError(f"{self.store.display(rel)} is unreadable ({e.__class__.__name__}); rebuild with "
                             "cache-teacher cache.overwrite=true") from None
        if table.num_rows < rows or table.schema != META_SCHEMA:
            raise CacheError(f"{self.store.display(rel)} does not hold the shard's {rows} kept rows; rebuild "
                             "with cache-teacher cache.overwrite=true")
        return table.slice(0, rows)

    def finalize(self, extra_summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """Rank 0, after every shard is committed: mark the manifest complete with the summary."""
        from .reader import CacheReader

        reader = CacheReader(self.store, verify=False)
        missing = reader.missing_shards()
        if missing:
            raise CacheError(f"cannot finalize {self.store}: shards {missing[:10]} are not committed")
        summary = reader.summary_stats()
        summary.update(extra_summary or {})
        self.manifest.update(complete=True, summary=summary)
        self.manifest.pop("extending", None)
        write_json(self.store, MANIFEST, self.manifest)
        return summary


def _build_skeleton(store: Storage, spec: CacheSpec, rank_table: Callable[[], np.ndarray] | None) -> dict[str, Any]:
    """The zarr group with every (empty) array and the rank table, then the manifest, last."""
    group = zarr.open_group(store.zarr_store(ARRAYS, read_only=False), mode="w",
                            attributes=attrs.group_attrs(spec, SCHEMA_VERSION))
    for name, (shape, dtype) in spec.array_specs().items():
        level = COMPACT_ZSTD_LEVEL if name in SQRT8_ARRAYS + LOGP16_ARRAYS + DRAW_ARRAYS + MASK_ARRAYS else spec.zstd_level
        group.create_array(name, shape=shape, dtype=dtype, chunks=(spec.chunk_sequences,) + shape[1:],
                           shards=(spec.shard_sequences,) + shape[1:], fill_value=0,
                           compressors=BloscCodec(cname="zstd", clevel=level, shuffle="shuffle"),
                           config={"write_empty_chunks": True}, attributes=attrs.array_attrs(name, spec))
    vouched = array_metadata_files(store)
    if spec.uses_rank_table:
        if rank_table is None:
            raise ValueError(f"a {spec.topk_encoding} cache needs its rank table at creation")
        table = np.asarray(rank_table(), np.int64)
        if sorted(table.tolist()) != list(range(spec.vocab_size)):
            raise ValueError("the rank table must be a permutation of the vocabulary")
        arr = group.create_array("rank_to_id", shape=table.shape, dtype=np.int64, chunks=table.shape,
                                 config={"write_empty_chunks": True},
                                 attributes=attrs.array_attrs("rank_to_id", spec))
        arr[:] = table
        vouched += [f"{ARRAYS}/rank_to_id/zarr.json", *chunk_files(arr, f"{ARRAYS}/rank_to_id")]
    manifest = {"schema_version": SCHEMA_VERSION, "spec": asdict(spec), "complete": False, "summary": {},
                "files": records(store, vouched), "cache_id": uuid.uuid4().hex}  # this build, kept by extensions
    write_json(store, MANIFEST, manifest)
    return manifest


def _remove_interrupted_creation(store: Storage, local: bool) -> None:
    """What a killed creation left: temporary trees beside a local cache, or an object-store
    skeleton whose manifest was never written."""
    if local:
        remove_leftovers(store.local_path())
    if not local and not store.is_file(MANIFEST) and interrupted_creation(store):
        store.remove_tree("")  # a skeleton whose manifest was never written


def check_overwrite(store: Storage) -> None:
    """Before any work (the plan reads the whole data source): a local ``cache.overwrite=true``
    on a folder that is not a cache of this tool is refused as the writer would refuse it."""
    if store.remote:
        return
    path = store.local_path()
    if path.is_dir():
        _may_replace(LocalStorage(path.resolve()) if path.is_symlink() else store)


def _may_replace(store: Storage) -> bool:
    """True if ``store`` holds something for an overwrite to replace; CacheError if that is not a
    cache of this tool."""
    if not store.list():
        return False
    reason = not_a_cache_reason(store)
    if reason is not None:
        raise CacheError(f"{store} is not a cache of this tool ({reason}); cache.overwrite=true only "
                         "replaces caches: choose another cache.dir")
    return True


def _matching_cache(store: Storage, spec: CacheSpec, create: bool) -> tuple[CacheSpec, dict[str, Any]]:
    """The existing cache's spec and manifest, if it was built from ``spec``'s fingerprint
    (FingerprintMismatch naming the differing fields if not)."""
    manifest = read_manifest(store)
    diff = fingerprint_diff(manifest["spec"]["fingerprint"], spec.fingerprint)
    if diff:
        raise FingerprintMismatch(
            f"cache {store} was built from other inputs ({'; '.join(diff)}); use another cache.dir "
            "or rebuild with cache.overwrite=true")
    old = spec_from_manifest(manifest, store)
    # (Only the creating rank checks the layout: an extension keeps the cache's shard size
    # whatever cache.shard_sequences says, and the other ranks reopen what rank 0 made.)
    if create and (old.num_sequences != spec.num_sequences or old.shard_sequences != spec.shard_sequences):
        raise FingerprintMismatch(
            f"cache {store} has {old.num_sequences} sequences in shards of {old.shard_sequences}, "
            f"the plan now has {spec.num_sequences} in shards of {spec.shard_sequences}; "
            "rebuild with cache.overwrite=true")
    return old, manifest


def _create_locally(root: Path, spec: CacheSpec, rank_table: Callable[[], np.ndarray] | None,
                    replace: bool) -> dict[str, Any]:
    """Build the skeleton beside ``root`` and rename it into place. A crash leaves either nothing
    or a whole skeleton, never a directory that is neither a cache nor empty."""
    tmp = root.parent / f".{root.name}.creating"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / META).mkdir(parents=True)
    (tmp / DONE).mkdir()
    manifest = _build_skeleton(LocalStorage(tmp), spec, rank_table)
    if root.exists() and not replace:
        root.rmdir()  # empty, checked above
    root.parent.mkdir(parents=True, exist_ok=True)
    aside = move_aside(root) if replace else None
    os.replace(tmp, root)
    if aside is not None:
        shutil.rmtree(aside)
    return manifest


def _remove_stale_temp_files(root: Path) -> None:
    """Temp files of writes that a crash cut short: never referenced, safe to drop on resume."""
    for folder in (root, root / META, root / DONE):
        for p in folder.glob(".*.tmp*"):
            p.unlink(missing_ok=True)
    for p in (root / ARRAYS).rglob("*.partial"):  # zarr's LocalStore writes through <key>.<uuid>.partial
        p.unlink(missing_ok=True)


def arrow_bytes(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    return sink.getvalue().to_pybytes()
