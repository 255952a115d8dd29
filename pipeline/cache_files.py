"""The files of a cache directory: layout names, checksum records, commit markers, and the rules
for what may be replaced. ``cache.py`` builds the format on these.

Integrity rule: every file the reader uses is vouched for by a record ``{"bytes", "crc32"}``
written *after* the file, at the file's commit time:

- ``manifest.json["files"]``: the zarr metadata of the group and of every array, the sqrt8
  ``rank_to_id`` table (at creation), ``meta/documents.arrow`` (when written) and every file of
  the teacher's tokenizer in ``tokenizer/`` (``tokenizer_files.py``);
- ``done/shard-SSSSS.json``: every file of one shard (the shard's commit marker);
- ``done/head.json``: every file of the optional teacher head (the head's commit marker).

A marker that is missing, unreadable or malformed means "not committed", for the writer (which
redoes the work) and the reader (which refuses or ignores it) alike.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .errors import NonFiniteError

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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temp file in the same directory, fsync, rename: readers see old or new, never half."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode())


def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def file_record(path: Path) -> dict[str, int]:
    return {"bytes": path.stat().st_size, "crc32": file_crc32(path)}


def check_record(root: Path, rel: str, record: Any) -> str | None:
    """None if ``root/rel`` matches its record, else what is wrong ("missing", "corrupt ...")."""
    path = root / rel
    if not path.is_file():
        return "missing"
    if not _valid_record(record):
        return "has no valid checksum record"
    size = path.stat().st_size
    if size != record["bytes"]:
        return f"corrupt (size {size}, committed {record['bytes']})"
    if file_crc32(path) != record["crc32"]:
        return "corrupt (checksum mismatch)"
    return None


def _valid_record(record: Any) -> bool:
    return (isinstance(record, dict) and isinstance(record.get("bytes"), int)
            and isinstance(record.get("crc32"), int))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):  # missing, a directory, bad JSON, bad UTF-8
        return None


def read_shard_marker(root: Path, shard: int) -> dict[str, Any] | None:
    """The commit marker of ``shard``, or None when the shard is not committed: no marker, or
    one that is truncated, not a JSON object, for another shard, or missing a field."""
    obj = _read_json(root / DONE / f"{shard_name(shard)}.json")
    if not isinstance(obj, dict) or obj.get("shard") != shard:
        return None
    if not all(isinstance(obj.get(k), int) for k in ("start", "stop")):
        return None
    files, stats = obj.get("files"), obj.get("stats")
    if not isinstance(files, dict) or not files or not all(_valid_record(r) for r in files.values()):
        return None
    if not isinstance(stats, dict) or not all(isinstance(v, (int, float)) for v in stats.values()):
        return None
    return obj


def read_head_marker(root: Path) -> dict[str, Any] | None:
    """The head's commit marker, or None: a head without a valid marker does not exist."""
    obj = _read_json(root / DONE / HEAD_MARKER)
    if not isinstance(obj, dict) or not isinstance(obj.get("shape"), list):
        return None
    files = obj.get("files")
    if not isinstance(files, dict) or not files or not all(_valid_record(r) for r in files.values()):
        return None
    return obj


def records(root: Path, rels: list[str]) -> dict[str, dict[str, int]]:
    return {rel: file_record(root / rel) for rel in rels}


def check_finite(shard: int, start: int, stop: int, arrays: dict[str, np.ndarray]) -> None:
    """Raise ``NonFiniteError`` naming the shard and array if any float array holds NaN/Inf."""
    for name, data in arrays.items():
        if data.dtype.kind == "f" and not np.isfinite(data).all():
            bad = int((~np.isfinite(data)).sum())
            raise NonFiniteError(
                f"the teacher produced NaN/Inf in {name} for shard {shard} (sequences {start}-{stop - 1}, "
                f"{bad} values); the shard is not committed. Rerun with teacher.dtype=float32 (fp16 overflows)")


def chunk_files(arr, rel: str) -> list[str]:
    """Every chunk (or shard) file of a whole array, by path relative to the cache root."""
    grid = [math.ceil(s / c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
    return [f"{rel}/{arr.metadata.encode_chunk_key(tuple(idx))}" for idx in np.ndindex(*grid)]


def array_metadata_files(root: Path) -> list[str]:
    """The group's and every array's zarr.json (not the head's: its marker vouches for it)."""
    return [f"{ARRAYS}/zarr.json"] + sorted(str(p.relative_to(root)) for p in (root / ARRAYS).glob("*/zarr.json")
                                            if p.parent.name != "head")


# ---------------------------------------------------------------- replacing a cache directory


def not_a_cache_reason(root: Path) -> str | None:
    """None if ``root`` is recognisably a cache of this tool, else why not. Recognisable: only
    the cache layout at the top level (manifest, arrays.zarr with zarr group metadata, meta/,
    done/, student-views/, hidden temp files), a manifest that is a cache manifest of any schema
    version (or unreadable: a truncated manifest is still a damaged cache), and nothing in meta/
    or done/ but the files this tool writes there."""
    if not root.is_dir():
        return "it is not a directory"
    entries = {p.name for p in root.iterdir() if not p.name.startswith(".")}
    foreign = sorted(entries - TOP_LEVEL)
    if foreign:
        return f"it holds {foreign[0]!r}, which no cache holds"
    for name in (MANIFEST, ARRAYS, META, DONE):
        if name not in entries:
            return f"it has no {name}"
    if not (root / MANIFEST).is_file() or not (root / ARRAYS / "zarr.json").is_file():
        return f"its {MANIFEST} or {ARRAYS}/zarr.json is not a file"
    manifest = _read_json(root / MANIFEST)
    if manifest is not None and not (isinstance(manifest, dict) and isinstance(manifest.get("schema_version"), int)
                                     and isinstance(manifest.get("spec"), dict)):
        return f"its {MANIFEST} is not a cache manifest"
    for folder, ok in ((META, lambda n: n == "documents.arrow" or (n.startswith("shard-") and n.endswith(".arrow"))),
                       (DONE, lambda n: n == HEAD_MARKER or (n.startswith("shard-") and n.endswith(".json")))):
        if not (root / folder).is_dir():
            return f"its {folder} is not a directory"
        for p in (root / folder).iterdir():
            if not p.name.startswith(".") and not (p.is_file() and ok(p.name)):
                return f"it holds {folder}/{p.name}, which no cache holds"
    return None


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


def lock_path(root: Path) -> Path:
    """The lock of a cache directory: beside it (it must outlive a replacement of the directory)."""
    root = root.resolve()
    return root.parent / f".{root.name}.lock"
