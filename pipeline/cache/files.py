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
import re
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
CREATING = "creating.json"
"""Object stores: written first when a cache is created or replaced in place, deleted once its
manifest is written. A prefix without a manifest is an interrupted creation exactly when this
tool's marker says so (never because of what its folders are called)."""
TOP_LEVEL = {MANIFEST, ARRAYS, META, DONE, VIEWS, TOKENIZER, CREATING}
"""Everything a cache directory may hold at its top level (besides this tool's hidden temp files)."""


def is_temp_name(name: str) -> bool:
    """A temp file of this tool's all-or-nothing writes (``.NAME.tmpPID``, ``.NAME.creating``):
    any other hidden entry (``.git``, ``.notes``) is the user's and makes a folder not a cache."""
    return re.fullmatch(r"\..+\.(tmp\d+|creating)", name) is not None


def shard_name(shard: int) -> str:
    return f"shard-{shard:05d}"


def write_json(store: Storage, rel: str, obj: Any) -> None:
    """All or nothing (``Storage.write_bytes``): a marker or manifest is whole or absent. The
    manifest carries the digest of its own content (``manifest_digest``)."""
    if rel == MANIFEST:
        obj = {**obj, DIGEST: manifest_digest(obj)}
    store.write_bytes(rel, json_bytes(obj))


DIGEST = "digest"


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 over the manifest's content (every key but the digest, in canonical JSON): an edit
    of any value, e.g. one digit of a split boundary, no longer matches."""
    body = {k: v for k, v in manifest.items() if k != DIGEST}
    return "sha256:" + hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_digest_problem(manifest: dict[str, Any]) -> str | None:
    """None when the manifest's recorded digest matches its content (or it records none and was
    written by an older version), else what is wrong. Every version that writes the digest also
    writes ``cache_id``: a manifest with a ``cache_id`` and no digest had its digest removed."""
    if DIGEST not in manifest:
        if "cache_id" not in manifest:
            return None
        return (f"{MANIFEST} has lost its digest (this tool writes one into every manifest with a cache_id), so "
                "an edit cannot be ruled out; restore it, or rebuild with cache-teacher cache.overwrite=true")
    if manifest[DIGEST] != manifest_digest(manifest):
        return (f"{MANIFEST} was changed after this tool wrote it (its content no longer matches its digest); "
                "restore it, or rebuild with cache-teacher cache.overwrite=true")
    return None


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
    entries = {n for n in store.list() if not is_temp_name(n)}
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
            if not is_temp_name(name) and not (store.is_file(f"{folder}/{name}") and ok(name)):
                return f"it holds {folder}/{name}, which no cache holds"
    return None


def interrupted_creation(store: Storage) -> bool:
    """True when an object-store prefix holds what a cut-short creation or replacement leaves:
    no manifest, and this tool's creation marker (``CREATING``), written before anything else and
    deleted only once the manifest is written. Folder names prove nothing: a prefix holding a
    user's ``meta/`` or ``tokenizer/`` is never taken for a cache."""
    return not store.is_file(MANIFEST) and _is_creation_marker(read_json(store, CREATING))


def _is_creation_marker(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("tool") == "kd-pipeline" and obj.get("kind") == "cache-creation"


def mark_creation(store: Storage) -> None:
    """Object stores: this tool's marker, written before anything of a new cache (``CREATING``)."""
    write_json(store, CREATING, {"tool": "kd-pipeline", "kind": "cache-creation", "pid": os.getpid()})


def clear_for_replacement(store: Storage) -> None:
    """Object stores (no rename): delete a cache so that a kill at any point leaves something the
    next run recognises: this tool's creation marker first (what is left is then an
    ``interrupted_creation``, started over by any run), then the commit markers (no shard counts
    any more), then the manifest, then the rest (but the marker)."""
    mark_creation(store)
    store.remove_tree(DONE)
    store.remove(MANIFEST)
    for rel in store.files_under(""):
        if rel != CREATING:
            store.remove(rel)


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
