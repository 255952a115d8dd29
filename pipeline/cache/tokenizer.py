"""The teacher's tokenizer inside the cache (``CACHE/tokenizer/``), so that a cache is
self-contained: stage 2 loads the tokenizer from there and never from the teacher's path (which
may be relative, on another machine, or a hub id that needs the network).

Commit rule (the same as for the other files outside shards): stage 1 writes the tokenizer with
``save_pretrained`` into a local temp directory, checks that it loads back with the same
``tokenizer_hash`` as the cache's fingerprint, copies it to ``tokenizer/``, and only then records
every file of it (size + CRC32) in ``manifest.json["files"]`` and a summary in
``manifest.json["tokenizer"]``. A tokenizer folder without records does not exist for readers; a
rerun of stage 1 on a cache without one (older caches, or a crash before the records) adds it.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import CacheError, TeacherError
from ..fingerprint import tokenizer_hash
from .files import MANIFEST, check_record, records, write_json
from .store import Storage

TOKENIZER_DIR = "tokenizer"
RERUN = "rerun cache-teacher with the same config to add it"


def tokenizer_records(manifest: dict[str, Any]) -> dict[str, Any]:
    """The checksum records of the tokenizer's files (empty: the cache carries no tokenizer)."""
    files = manifest.get("files")
    if not isinstance(files, dict):
        return {}
    return {rel: rec for rel, rec in files.items() if rel.startswith(f"{TOKENIZER_DIR}/")}


def has_tokenizer(store: Storage, manifest: dict[str, Any]) -> bool:
    """True when the manifest vouches for a tokenizer and every one of its files matches."""
    recs = tokenizer_records(manifest)
    return bool(recs) and all(check_record(store, rel, rec) is None for rel, rec in recs.items())


def store_tokenizer(writer, tokenizer) -> bool:
    """Copy ``tokenizer`` into ``writer``'s cache unless an intact copy is there; True if written.

    Rank 0 only (it rewrites the manifest). The old records are dropped from the manifest before
    the old files are replaced, so no record ever vouches for a half-written folder."""
    store, manifest = writer.store, writer.manifest
    if has_tokenizer(store, manifest):
        return False
    want = manifest["spec"]["fingerprint"].get("tokenizer_hash")
    tmp = Path(tempfile.mkdtemp(prefix="kd-tokenizer-"))
    try:
        tokenizer.save_pretrained(str(tmp))
        got = tokenizer_hash(_load(tmp))
        if want is not None and got != want:
            raise TeacherError(f"the teacher tokenizer does not survive save_pretrained (hash {got}, cache has "
                               f"{want}); this tokenizer cannot be stored in the cache")
        files = manifest.setdefault("files", {})
        if tokenizer_records(manifest) or "tokenizer" in manifest:
            for rel in tokenizer_records(manifest):
                del files[rel]
            manifest.pop("tokenizer", None)
            write_json(store, MANIFEST, manifest)
        store.put_dir(TOKENIZER_DIR, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files.update(records(store, store.files_under(TOKENIZER_DIR)))
    manifest["tokenizer"] = {"dir": TOKENIZER_DIR, "hash": got, "class": type(tokenizer).__name__,
                             "size": len(tokenizer), "eos_token_id": tokenizer.eos_token_id}
    write_json(store, MANIFEST, manifest)
    return True


def load_cached_tokenizer(reader):
    """The teacher's tokenizer from the cache's own copy, checked against its records and the
    cache's ``tokenizer_hash``. A cache without a copy gets a one-line ``CacheError``. From a
    remote cache the checked files are copied to a local temp folder first."""
    store, root = reader.store, reader.root
    recs = tokenizer_records(reader.manifest)
    if not recs:
        raise CacheError(f"cache {root} carries no copy of the teacher tokenizer (it was built by an older "
                         f"version); {RERUN}")
    if reader.verify:
        for rel, rec in sorted(recs.items()):
            problem = check_record(store, rel, rec)
            if problem is not None:
                raise CacheError(f"cache {root}: {rel} (the teacher tokenizer) is {problem}; rerun cache-teacher "
                                 "with the same config to rewrite it")
    try:
        with store.local_dir(TOKENIZER_DIR) as local:
            tok = _load(local)
    except Exception as e:  # transformers raises many types for unreadable files
        raise CacheError(f"cache {root}: the teacher tokenizer in {TOKENIZER_DIR}/ is unreadable "
                         f"({e.__class__.__name__}); rerun cache-teacher with the same config to rewrite it") from None
    if tokenizer_hash(tok) != reader.fingerprint.get("tokenizer_hash"):
        raise CacheError(f"cache {root}: the tokenizer in {TOKENIZER_DIR}/ is not the one the cache was built with; "
                         "rebuild the cache with cache-teacher cache.overwrite=true")
    return tok


def _load(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
