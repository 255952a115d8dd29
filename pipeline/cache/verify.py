"""``inspect --verify``: check every byte of every file of a cache against its commit records.

Independent of ``CacheReader`` (which stops at the first problem): it goes on past damage and
lists all of it, each item naming the file and what to do. What is checked:

- ``manifest.json`` parses and is a cache manifest of this schema;
- the records in the manifest: array metadata (``zarr.json``), the sqrt8 ``rank_to_id`` table,
  ``meta/documents.arrow``, the teacher tokenizer's files (``tokenizer/``; a cache without them,
  built by an older version, is listed too: stage 2 needs them);
- every committed shard: every file its marker lists (arrays and ``meta/shard-S.arrow``);
  shards without a valid marker are listed as uncommitted (not damage: a rerun finishes them);
- the head, if ``done/head.json`` exists: every file it lists; a head marker that is itself
  unreadable is damage.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .files import (ARRAYS, DONE, HEAD_MARKER, MANIFEST, check_record, manifest_digest_problem, read_head_marker,
                    read_shard_marker, shard_name)
from .reader import FINISH_EXTENSION
from .spec import READABLE_VERSIONS, SCHEMA_VERSION, CacheSpec
from .store import Storage, open_storage
from .tokenizer import RERUN, TOKENIZER_DIR, tokenizer_records


@dataclass
class VerifyReport:
    checked_files: int = 0
    checked_bytes: int = 0
    damaged: list[str] = field(default_factory=list)
    """One line per problem: the file, what is wrong, what to do."""
    uncommitted: list[int] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checked_files": self.checked_files, "checked_bytes": self.checked_bytes,
                "damaged": self.damaged, "uncommitted_shards": self.uncommitted}


def verify_cache(root: str | Path | Storage) -> VerifyReport:
    store = open_storage(root)
    report = VerifyReport()
    rebuild = "rebuild with cache-teacher cache.overwrite=true"
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
        spec = CacheSpec(**manifest["spec"])
        if manifest["schema_version"] not in READABLE_VERSIONS:
            raise ValueError(f"schema version {manifest['schema_version']}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        report.damaged.append(f"{MANIFEST}: unreadable or not a cache manifest of schema {SCHEMA_VERSION} "
                              f"({e.__class__.__name__}); {rebuild}")
        return report

    if (problem := manifest_digest_problem(manifest)) is not None:
        report.damaged.append(problem)
    report.checked_files += 1

    def check(rel: str, record, remedy: str) -> None:
        problem = check_record(store, rel, record)
        report.checked_files += 1
        if problem is None:
            report.checked_bytes += record["bytes"]
        else:
            report.damaged.append(f"{rel}: {problem}; {remedy}")

    files = manifest.get("files")
    if not isinstance(files, dict):
        report.damaged.append(f"{MANIFEST}: records no checksums for the array metadata, rank table and documents "
                              f"(written by an older version); {rebuild}")
        files = {}
    extending = "extending" in manifest  # an interrupted extension: its rerun rewrites metadata and records
    for rel, record in sorted(files.items()):
        rerun = rel.endswith("documents.arrow") or rel.startswith(f"{TOKENIZER_DIR}/")
        check(rel, record, "rerun cache-teacher with the same config to rewrite it" if rerun
              else FINISH_EXTENSION if extending and rel.endswith("zarr.json") else rebuild)
    if files and not tokenizer_records(manifest):
        report.damaged.append(f"{TOKENIZER_DIR}/: the cache carries no copy of the teacher tokenizer (built by an "
                              f"older version); {RERUN}")
    if spec.uses_rank_table and files and not any(r.startswith(f"{ARRAYS}/rank_to_id/") for r in files):
        report.damaged.append(f"{ARRAYS}/rank_to_id: no checksum recorded; {rebuild}")

    for shard in range(spec.num_shards):
        marker = read_shard_marker(store, shard, spec.shard_range(shard))
        if marker is None:
            report.uncommitted.append(shard)
            continue
        remedy = f"delete {DONE}/{shard_name(shard)}.json and rerun cache-teacher to rebuild shard {shard}"
        for rel, record in sorted(marker["files"].items()):
            check(rel, record, remedy)

    head = read_head_marker(store)
    head_remedy = f"delete {DONE}/{HEAD_MARKER} and rerun cache-teacher with cache.store_head=true"
    if head is not None:
        for rel, record in sorted(head["files"].items()):
            check(rel, record, head_remedy)
    elif store.exists(f"{DONE}/{HEAD_MARKER}"):
        report.damaged.append(f"{DONE}/{HEAD_MARKER}: unreadable or malformed; {head_remedy}")
    return report
