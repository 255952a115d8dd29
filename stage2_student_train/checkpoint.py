"""Checkpoints: written to a temp directory and renamed, ``LATEST`` replaced atomically, the
last N kept. A checkpoint holds everything an exact resume needs::

    step-XXXXXXXX/student/   Hugging Face model directory (+ tokenizer)
    step-XXXXXXXX/state.pt   optimizer, scheduler, scaler, EMA, extra modules, every RNG state,
                             the data cursor, the step, counters, the resolved config and the
                             cache fingerprint
    step-XXXXXXXX/checksums.json   size and CRC32 of every other file, checked on resume
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import file_crc32, file_record, json_bytes
from pipeline.cache import atomic_write_bytes
from pipeline.config import Config, load_config, parse_override
from pipeline.errors import ConfigError, PipelineError

LATEST = "LATEST"
CHECKSUMS = "checksums.json"
"""Every other file of a checkpoint with its size and CRC32, written when it is committed."""
RESUMABLE = ("train.steps", "train.stop_after", "train.eval_every", "train.save_every", "train.keep_checkpoints",
             "train.eval_sequences", "train.max_bad_steps", "train.device", "train.num_threads", "train.parallel",
             "cache.dir", "cache.views_dir", "run.runs_dir", "train.gradient_checkpointing")
"""The keys a resume may change: how long, how often to eval/save, where it runs, where the cache
lives (its fingerprint is still checked), where the runs are (the checkpoint must be in it).
Everything else defines the run being continued."""


class CheckpointError(PipelineError):
    """A checkpoint is missing, damaged or belongs to another run, cache or model."""


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def begin_checkpoint(run_dir: Path, step: int) -> Path:
    """A fresh temp directory for the checkpoint of ``step`` (rank 0; others write into it)."""
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    tmp = ckpt_root / f".step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def commit_checkpoint(run_dir: Path, step: int, tmp: Path, keep: int) -> Path:
    """Rename the finished temp directory into place, point ``LATEST`` at it, keep the last N."""
    write_checksums(tmp)
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:08d}"
    old = ckpt_root / f".step-{step:08d}.old"
    if final.exists():  # a rerun of the same step: move the old one aside, never leave a gap
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    atomic_write_bytes(run_dir / LATEST, f"checkpoints/{final.name}\n".encode())
    for stale in sorted(ckpt_root.glob("step-*"))[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def write_checksums(ckpt: Path) -> None:
    """Record every file of the checkpoint (size and CRC32), written last: a resume verifies them."""
    files = {p.relative_to(ckpt).as_posix(): file_record(p) for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != CHECKSUMS}
    atomic_write_bytes(ckpt / CHECKSUMS, json_bytes({"files": files}))


def verify_checksums(ckpt: Path) -> bool:
    """Refuse a checkpoint whose files differ from what was saved, naming the first such file; a
    file with no entry, or an entry with no file, is damage too (the record must be whole).
    False when the checkpoint records no checksums at all: written by an older version, or its
    ``checksums.json`` deleted (``load_state`` tells the two apart by ``state.pt``)."""
    path = ckpt / CHECKSUMS
    if not path.exists():
        return False
    try:
        files = json.loads(path.read_text())["files"]
        assert isinstance(files, dict) and all(isinstance(r, dict) for r in files.values())
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        raise CheckpointError(f"checkpoint {ckpt}: {CHECKSUMS} is unreadable; pick an older checkpoint") from None
    on_disk = sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file() and p != path)
    for rel in sorted(set(on_disk) | set(files)):
        p, record = ckpt / rel, files.get(rel)
        if record is None:
            problem = f"has no entry in {CHECKSUMS}, so it cannot be checked"
        elif not p.is_file():
            problem = "is missing"
        elif p.stat().st_size != record.get("bytes"):
            problem = f"has {p.stat().st_size} bytes, {record.get('bytes')} were saved"
        elif file_crc32(p) != record.get("crc32"):
            problem = "differs from what was saved (checksum mismatch)"
        else:
            continue
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({rel} {problem}); pick an older one under "
                              "checkpoints/")
    return True


CHECKSUMMED = "checksummed"
"""A key of ``state.pt`` in every checkpoint written with ``checksums.json``: without that file
such a checkpoint cannot be trusted (its record was deleted), and resume refuses it."""


def write_state(tmp: Path, state: dict[str, Any], config_toml: str) -> None:
    torch.save({**state, CHECKSUMMED: True}, tmp / "state.pt")
    (tmp / "config.toml").write_text(config_toml)


def save_sharded(path: Path, parts: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
    """FSDP: model, optimizer and EMA shards through ``torch.distributed.checkpoint`` (every rank
    writes its own shards; loads on the same or another world size). A collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(parts, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd, "ema": ema.shadow if ema is not None else {}},
             checkpoint_id=str(path))


def load_sharded(path: Path, parts: torch.nn.Module, optimizer: torch.optim.Optimizer, ema) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_sd, optim_sd = get_state_dict(parts, optimizer)
    state = {"model": model_sd, "optim": optim_sd, "ema": ema.shadow if ema is not None else {}}
    dcp.load(state, checkpoint_id=str(path))
    set_state_dict(parts, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def latest_checkpoint(run_dir: Path) -> Path | None:
    path = run_dir / LATEST
    if not path.is_file():
        return None
    return run_dir / path.read_text().strip()


def load_state(ckpt: Path) -> dict[str, Any]:
    if not ckpt.is_dir():
        raise CheckpointError(f"checkpoint {ckpt} does not exist; give a directory like runs/<run>/checkpoints/step-N "
                              "(runs/<run>/LATEST names the newest)")
    weights = "sharded" if (ckpt / "sharded").is_dir() else "student/model.safetensors"
    for need in ("state.pt", "config.toml", "student/config.json", weights):
        if not (ckpt / need).exists():
            raise CheckpointError(f"{ckpt} is not a complete checkpoint ({need} is missing); "
                                  "pick another one under checkpoints/")
    checked = verify_checksums(ckpt)
    try:
        state = torch.load(ckpt / "state.pt", map_location="cpu", weights_only=False)
    except Exception as e:
        raise CheckpointError(f"checkpoint {ckpt} is damaged ({e.__class__.__name__}); pick an older one") from None
    if not checked and isinstance(state, dict) and state.get(CHECKSUMMED):
        raise CheckpointError(f"checkpoint {ckpt} was written with {CHECKSUMS}, which is gone, so its files cannot "
                              "be checked; restore it or pick another checkpoint under checkpoints/")
    return state


def resume_config(ckpt: Path, overrides: list[str]) -> Config:
    """The checkpoint's config with ``overrides`` applied; an override of a key outside
    ``RESUMABLE`` that changes its value is refused, naming the key."""
    saved = load_config(ckpt / "config.toml")
    cfg = load_config(ckpt / "config.toml", overrides)
    for item in overrides:
        key = parse_override(item)[0]
        old, new = _dotted(saved, key), _dotted(cfg, key)
        if key not in RESUMABLE and old != new:
            raise ConfigError(f"resume cannot change {key} (the run has {old!r}, asked {new!r}): it defines the "
                              f"run being continued; start a new run instead. A resume may change: "
                              f"{', '.join(RESUMABLE)}")
    return cfg


def _dotted(cfg: Config, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node
