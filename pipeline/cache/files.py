"""The files of a cache: layout names, checksum records, commit markers, and the rules for what
may be replaced. ``writer.py`` and ``reader.py`` build the format on these; every function takes
the cache's ``Storage`` (``store.py``), so the same rules hold on a local disk and an object store.

Integrity rule: every file the reader uses is vouched for by a record ``{"bytes", "crc32"}``
written *after* the file, at the file's commit time:

- ``manifest.json["files"]``: the zarr metadata of the group and of every array, the sqrt8
  ``rank_to_id`` table (at creation), ``meta/documents.arrow`` (when written) and every file of
  the teacher's tokenizer in ``tokenizer/`` (``tokenizer.py``);
- ``done/shard-SSSSS.json``: every file of one shard (the shard's commit marker);
- ``done/head.json``: every file of the optional teacher head (the head's commit marker).

A marker that is missing, unreadable or malformed means "not committed", for the writer (which
redoes the work) and the reader (which refuses or ignores it) alike.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import json_bytes
from ..errors import NonFiniteError
from .store import Storage, user_cache_dir

MANIFEST = "manifest.json"
ARRAYS = "arrays.zarr"
META = "meta"
DONE = "done"
VIEWS = "student-views"
HEAD_MARKER = "head.json"
TOKENIZER = "tokenizer"
TOP_LEVEL = {MANIFEST, ARRAYS, META, DONE, VIEWS, TOKENIZER}
"""Everything a cache directory may hold at its top level (besides hidden temp files)."""


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def write_json(store: Storage, rel: str, obj: Any) -> None:
    """All or nothing (``Storage.write_bytes``): a marker or manifest is whole or absent."""
    store.write_bytes(rel, json_bytes(obj))


def file_record(store: Storage, rel: str) -> dict[str, int]:
    return {"bytes": store.size(rel), "crc32": store.crc32(rel)}


def check_record(store: Storage, rel: str, record: Any) -> str | None:
    """None if file ``rel`` matches its record, else what is wrong ("missing", "corrupt ...")."""
    size = store.size(rel)
    if size is None:
        return "missing"
    if not _valid_record(record):
        return "has no valid checksum record"
    if size != record["bytes"]:
        return f"corrupt (size {size}, committed {record['bytes']})"
    if store.crc32(rel) != record["crc32"]:
        return "corrupt (checksum mismatch)"
    return None


def _valid_record(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("crc32"), int))


def read_json(store: Storage, rel: str) -> Any:
    """The parsed JSON file ``rel``, or None: missing, a folder, bad JSON, bad UTF-8."""
    try:
        return json.loads(store.read_bytes(rel))
    except (OSError, ValueError):
        return None


def read_shard_marker(store: Storage, shard: int, rows: tuple[int, int]) -> dict[str, Any] | None:
    """The commit marker of ``shard``, or None when the shard is not committed: no marker, or
    one that is truncated, not a JSON object, for another shard or other rows than ``rows``
    (the last shard of a cache being extended grows), or missing a field."""
    obj = read_json(store, f"{DONE}/{shard_name(shard)}.json")
    if not isinstance(obj, dict) or obj.get("shard") != shard:
        return None
    if [obj.get("start"), obj.get("stop")] != list(rows):
        return None
    files, stats = obj.get("files"), obj.get("stats")
    if not isinstance(files, dict) or not files or not all(_valid_record(r) for r in files.values()):
        return None
    if not isinstance(stats, dict) or not all(isinstance(v, (int, float)) for v in stats.values()):
        return None
    return obj


def read_head_marker(store: Storage) -> dict[str, Any] | None:
    """The head's commit marker, or None: a head without a valid marker does not exist."""
    obj = read_json(store, f"{DONE}/{HEAD_MARKER}")
    if not isinstance(obj, dict) or not isinstance(obj.get("shape"), list):
        return None
    files = obj.get("files")
    if not isinstance(files, dict) or not files or not all(_valid_record(r) for r in files.values()):
        return None
    return obj


def records(store: Storage, rels: list[str]) -> dict[str, dict[str, int]]:
    return {rel: file_record(store, rel) for rel in rels}


def check_finite(shard: int, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
    """Raise ``NonFiniteError`` naming the shard and array if any float array holds NaN/Inf (a
    log-tail may be -inf: no mass beyond the top-k)."""
    for name, data in arrays.items():
        ok = np.isfinite(data) | (data == -np.inf) if name == "topk_log_tail" else np.isfinite(data)
        if data.dtype.kind == "f" and not ok.all():
            bad = int((~ok).sum())
            raise NonFiniteError(
                f"the teacher produced NaN/Inf in {name} for shard {shard} (sequences {start}-{stop - 1}, "
                f"{bad} values); the shard is not committed. Rerun with teacher.dtype=float32 (fp16 overflows)")


def chunk_files(arr, rel: str) -> list[str]:
    """Every chunk (or shard) file of a whole array, by path relative to the cache root."""
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
    return [f"{rel}/{arr.metadata.encode_chunk_key(tuple(idx))}" for idx in np.ndindex(*grid)]


def array_metadata_files(store: Storage) -> list[str]:
    """The group's and every array's zarr.json (not the head's: its marker vouches for it)."""
    return [f"{ARRAYS}/zarr.json"] + [f"{ARRAYS}/{name}/zarr.json" for name in store.list(ARRAYS)
                                      if name != "head" and store.is_file(f"{ARRAYS}/{name}/zarr.json")]


# ---------------------------------------------------------------- replacing a cache directory


def not_a_cache_reason(store: Storage) -> str | None:
    """None if ``store`` is recognisably a cache of this tool, else why not. Recognisable: only
    the cache layout at the top level (manifest, arrays.zarr with zarr group metadata, meta/,
    done/, student-views/, tokenizer/, hidden temp files), a manifest that is a cache manifest of
    any schema version (or unreadable: a truncated manifest is still a damaged cache), and nothing
    in meta/ or done/ but the files this tool writes there."""
    if not store.is_dir():
        return "it is not a directory"
    entries = {n for n in store.list() if not n.startswith(".")}
    foreign = sorted(entries - TOP_LEVEL)
    if foreign:
        return f"it holds {foreign[0]!r}, which no cache holds"
    for name in (MANIFEST, ARRAYS) + (() if store.remote else (META, DONE)):  # no empty folders in object stores
        if name not in entries:
            return f"it has no {name}"
    if not store.is_file(MANIFEST) or not store.is_file(f"{ARRAYS}/zarr.json"):
        return f"its {MANIFEST} or {ARRAYS}/zarr.json is not a file"
    manifest = read_json(store, MANIFEST)
    if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("schema_version"), int)
                                     and isinstance(manifest.get("spec"), dict)):
        return f"its {MANIFEST} is not a cache manifest"
    for folder, ok in ((META, lambda n: n == "documents.arrow" or (n.startswith("shard-") and n.endswith(".arrow"))),
                       (DONE, lambda n: n == HEAD_MARKER or (n.startswith("shard-") and n.endswith(".json")))):
        if folder in entries and not store.is_dir(folder):
            return f"its {folder} is not a directory"
        for name in store.list(folder):
            if not name.startswith(".") and not (store.is_file(f"{folder}/{name}") and ok(name)):
                return f"it holds {folder}/{name}, which no cache holds"
    return None


def interrupted_creation(store: Storage) -> bool:
    """True when an object-store prefix holds what a cut-short creation or replacement leaves
    (the skeleton is written in place there, the manifest last; a replacement deletes the
    markers, then the manifest, then the rest): cache folders only, no manifest, no marker."""
    entries = {n for n in store.list() if not n.startswith(".")}
    return bool(entries) and entries <= {ARRAYS, META, TOKENIZER} and not store.list(DONE)


def clear_for_replacement(store: Storage) -> None:
    """Object stores (no rename): delete a cache so that a kill at any point leaves something the
    next run recognises: the commit markers first (no shard counts any more), then the manifest
    (what is left is an ``interrupted_creation``, started over by any run), then the rest."""
    store.remove_tree(DONE)
    store.remove(MANIFEST)
    store.remove_tree("")


def aside_prefix(root: Path) -> str:
    return f".{root.name}.replaced-"


def move_aside(root: Path) -> Path:
    """Rename ``root`` to a hidden sibling (atomic) and return it: the name is then free at once,
    and a kill while the old tree is being deleted leaves only the hidden leftover, which
    ``remove_leftovers`` deletes on the next run."""
    aside = root.parent / f"{aside_prefix(root)}{os.getpid()}"
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(root, aside)
    return aside


def remove_leftovers(root: Path) -> None:
    """Delete what an interrupted creation or overwrite of ``root`` left beside it. Call only
    while holding the cache's lock (another writer's temp tree would look the same)."""
    if not root.parent.is_dir():
        return
    for p in root.parent.glob(f".{root.name}.*"):
        if p.name.startswith(aside_prefix(root)) or p.name == f".{root.name}.creating":
            shutil.rmtree(p, ignore_errors=True)


def lock_path(store: Storage) -> Path:
    """The lock of a cache: beside a local one (it must outlive a replacement of the directory);
    for an object store, a local file named by the URL (it keeps out writers on this machine only)."""
    if store.local_path() is not None:
        root = store.local_path().resolve()
        return root.parent / f".{root.name}.lock"
    return user_cache_dir() / "locks" / f"{hashlib.sha256(store.url.encode()).hexdigest()[:16]}.lock"
