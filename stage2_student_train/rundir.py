"""The run directory ``runs_dir/name``: made by this tool, marked as such, replaced only when it
carries the marker, never the cache it trains from, and replaced without a half-deleted state."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

from pipeline.cache.store import open_storage
from pipeline.config import Config, to_toml
from pipeline.errors import CacheError, ConfigError
from pipeline.paths import require_directory_path

RUN_MARKER = ".kd-pipeline-run"
"""JSON ``{"tool": "kd-pipeline", "kind": "student-run", "name": ..., "created": ...}``."""
DELETING = ".deleting-"


def lock_path(run_dir: Path) -> Path:
    """Beside the run directory, not in it: replacing the directory keeps the lock."""
    return run_dir.parent / f".{run_dir.name}.lock"


def is_run_dir(path: Path) -> bool:
    try:
        marker = json.loads((path / RUN_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("tool") == "kd-pipeline" and marker.get("kind") == "student-run"


def check_location(run_dir: Path, cache_dir: str, views_dir: str = "") -> None:
    """A run directory that is a file, or that is (inside) the cache, is refused."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} is a file; choose another run.name or run.runs_dir")
    require_directory_path(run_dir, "run.runs_dir")
    if views_dir:
        require_directory_path(views_dir, "cache.views_dir")
    store = open_storage(cache_dir)
    if store.remote:
        return  # a remote cache cannot overlap a local run directory
    run, cache = run_dir.resolve(), store.root.resolve()
    if run == cache or cache in run.parents or run in cache.parents:
        raise ConfigError(f"run directory {run_dir} and cache {cache_dir} overlap; put runs elsewhere (run.runs_dir)")


def prepare_run_dir(run_dir: Path, cfg: Config) -> None:
    """Create the run directory (with its marker and resolved config). An existing one is
    replaced only with ``train.overwrite=true`` and only if this tool made it: it is first
    renamed aside, then deleted, so a kill in between leaves either the old run whole or none
    (leftovers are removed by the next run)."""
    if run_dir.is_symlink():  # a link to the run directory: create or replace what it names
        run_dir = run_dir.resolve()
    remove_leftovers(run_dir.parent)
    if run_dir.exists() and any(run_dir.iterdir()):
        if is_run_dir(run_dir) and not has_checkpoint(run_dir):
            pass  # a run of this tool stopped before its first checkpoint: nothing to resume, start over
        elif not cfg.train.overwrite:
            raise ConfigError(f"run directory {run_dir} already exists; resume it with "
                              f"`make resume CKPT={run_dir}/checkpoints/...`, pick another run.name, "
                              "or set train.overwrite=true")
        elif not is_run_dir(run_dir):
            raise ConfigError(f"{run_dir} is not a run directory of this tool (no {RUN_MARKER}); "
                              "train.overwrite=true only replaces runs it made: pick another run.name")
        _delete_run_dir(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = {"tool": "kd-pipeline", "kind": "student-run", "name": run_dir.name, "created": time.time()}
    (run_dir / RUN_MARKER).write_text(json.dumps(marker) + "\n")
    (run_dir / "config.toml").write_text(to_toml(cfg))


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds something to resume or keep (``LATEST``, a committed step,
    a final export or summary)."""
    return any((run_dir / name).exists() for name in ("LATEST", "final", "summary.json")) or any(
        (run_dir / "checkpoints").glob("step-*"))


def _delete_run_dir(run_dir: Path) -> None:
    """Renamed aside first (atomic), then deleted: a kill in between leaves the old run whole or none."""
    aside = run_dir.parent / f".{run_dir.name}{DELETING}{os.getpid()}"
    run_dir.rename(aside)
    shutil.rmtree(aside)


EVAL_DOCUMENTS_LISTED = 100
"""``data.eval_documents`` is filled from the cache when it holds at most this many names."""


def with_cache_facts(cfg: Config, reader) -> Config:
    """A copy of ``cfg`` whose teacher.*, data.* and cache.* keys say what the cache at hand was
    really built from (its fingerprint, spec and documents table), not this config's defaults:
    what the run's ``config.toml`` records. Stage 2 itself reads none of these keys."""
    fp, spec, facts = reader.fingerprint, reader.spec, reader.spec.teacher
    dtype = fp.get("teacher_dtype")
    teacher = dataclasses.replace(
        cfg.teacher, model=str(fp.get("teacher", cfg.teacher.model)),
        gguf_file="" if str(fp.get("teacher", "")).startswith("embedded:") else (facts.get("gguf_file") or ""),
        dtype=dtype if dtype in ("float32", "float16", "bfloat16") else cfg.teacher.dtype)
    data = dataclasses.replace(
        cfg.data, source=str(fp.get("dataset", cfg.data.source)), seq_len=spec.seq_len,
        max_train_tokens=int(fp.get("max_train_tokens", cfg.data.max_train_tokens)),
        max_eval_tokens=int(fp.get("max_eval_tokens", cfg.data.max_eval_tokens)),
        doc_separator=str(fp.get("doc_separator", cfg.data.doc_separator)), document_mask=spec.document_mask)
    try:
        docs = reader.documents().to_pydict()
        held_out = [n for n, split in zip(docs["name"], docs["split"]) if split == "eval"]
        if len(held_out) <= EVAL_DOCUMENTS_LISTED:
            data = dataclasses.replace(data, eval_documents=held_out)
    except CacheError:  # no readable documents table: keep the config's own list
        pass
    cache = dataclasses.replace(
        cfg.cache, top_k=spec.top_k, topk_encoding=spec.topk_encoding, store_hidden=spec.store_hidden,
        hidden_dtype=spec.hidden_dtype, shard_sequences=spec.shard_sequences, chunk_sequences=spec.chunk_sequences,
        zstd_level=spec.zstd_level, store_head=reader.has_head)
    return dataclasses.replace(cfg, teacher=teacher, data=data, cache=cache)


def remove_leftovers(runs_dir: Path) -> None:
    """Directories renamed aside by an overwrite that a kill interrupted."""
    if runs_dir.is_dir():
        for p in runs_dir.glob(f".*{DELETING}*"):
            p.unlink() if p.is_symlink() else shutil.rmtree(p, ignore_errors=True)
