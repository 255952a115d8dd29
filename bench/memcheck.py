"""Measured peak memory of stage 1 (the teacher pass over one batch) and stage 2 (a few training
steps through ``train``), beside the planner's estimate (``pipeline.memplan``).

    python -m bench.memcheck stage1 --config FILE [key=value ...]
    python -m bench.memcheck stage2 --config FILE [key=value ...]

Runs in a fresh process and prints one JSON line ``{"measured": bytes, "estimate": bytes, ...}``.

- CUDA: ``torch.cuda.max_memory_allocated`` over the work (what the planner estimates).
- CPU: the work runs once small to load every library and warm every allocator path; then the
  peak-RSS mark is reset (Linux ``/proc/self/clear_refs``) and the measured figure is the peak
  RSS during the real work minus the RSS before it (model weights are counted by building the
  model after the reset). Large tensors are mmap'd by glibc and returned on free, so RSS follows
  torch's allocations closely for the sizes that matter here. Only with a fixed mmap threshold,
  though: glibc raises its threshold to the size of each mmap'd block it frees (up to 32 MiB), so
  later blocks below that come from the heap, whose freed memory stays in the RSS; a body-dominated
  stage 1 (a wide teacher at batch 8 x 512: per-layer temporaries of 16 MiB) then peaked at 263 MiB
  of RSS for 163 MiB of tensors. That retention is the C library's, not a term of the planner (a
  GPU's caching allocator reports tensor bytes), so this process runs with
  ``MALLOC_MMAP_THRESHOLD_`` fixed at glibc's initial 128 KiB for stage 1 (it re-executes itself
  with it set): its RSS then measures the tensors the planner counts. Stage 2 is still measured
  with glibc's default: with the threshold fixed, the deep, narrow batch-32 student of
  tests/test_memplan.py measured 303.5 MB against 412.0 planned (1.36), i.e. the stage-2 terms
  over-count that case's tensors and agreed with the RSS only through the same heap retention.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile

import numpy as np
import torch

from pipeline.config import config_overrides, load_config
from pipeline.memplan import plan, stage1_terms, teacher_dims


def status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(cuda: bool) -> int:
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_bytes("VmRSS")


def peak(cuda: bool) -> int:
    if cuda:
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return status_bytes("VmHWM")


def stage1(cfg, cuda: bool) -> dict:
    from pipeline.device import choose_precision, resolve_device
    from stage1_teacher_cache.teacher import TeacherPass, load_model, resolve_teacher

    device = resolve_device(cfg.teacher.device)
    precision = choose_precision(device, cfg.teacher.dtype)
    source = resolve_teacher(cfg.teacher)
    dims = teacher_dims(cfg)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, dims.vocab, (cfg.teacher.batch_size, cfg.data.seq_len)))
    warm = TeacherPass(load_model(source, precision.dtype, device), cfg.cache.top_k, cfg.teacher.logits_chunk)
    warm(ids[:1, :16])
    del warm
    base = reset_peak(cuda)
    teacher = TeacherPass(load_model(source, precision.dtype, device), cfg.cache.top_k, cfg.teacher.logits_chunk)
    teacher(ids)
    measured = peak(cuda) - base
    est = stage1_terms(dims, batch=cfg.teacher.batch_size, seq_len=cfg.data.seq_len,
                       logits_chunk=cfg.teacher.logits_chunk, dtype_bytes=4 if precision.dtype == torch.float32 else 2,
                       top_k=cfg.cache.top_k)
    return {"stage": 1, "measured": measured, "estimate": est["peak"], "terms": est, "teacher": dataclasses.asdict(dims)}


def stage2(cfg, cuda: bool) -> dict:
    """A few steps of ``train`` (eval and checkpoint at the end included) on the config's cache."""
    from stage2_student_train.train import train

    with tempfile.TemporaryDirectory() as tmp:
        def run(name: str, *extra: str):
            c = load_config(None, [*ARGS, f"run.runs_dir={json.dumps(tmp)}", f"run.name={json.dumps(name)}",
                                   "train.overwrite=true", *extra])
            train(c, show_progress=False)

        run("warm", "train.batch_size=1", "train.steps=2", "train.warmup_steps=0", "train.loss_chunk_size=8",
            "train.eval_sequences=1")
        base = reset_peak(cuda)
        run("measured")
    from stage2_student_train.kd_modes import planned_memory

    est = plan(cfg, cuda=cuda, budget=1 << 40, mode_memory=planned_memory)["stage2"]
    return {"stage": 2, "measured": peak(cuda) - base, "estimate": est["peak"],
            "terms": {k: v for k, v in est.items() if isinstance(v, int) and not isinstance(v, bool)
                      and k != "batch_size" and "largest_batch" not in k}}


ARGS: list[str] = []


FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def main(argv: list[str] | None = None) -> int:
    if (argv is None and sys.platform.startswith("linux") and "MALLOC_MMAP_THRESHOLD_" not in os.environ
            and sys.argv[1:2] == ["stage1"]):
        os.execve(sys.executable, [sys.executable, "-m", "bench.memcheck", *sys.argv[1:]],
                  {**os.environ, **FIXED_MMAP_THRESHOLD})  # glibc reads it at start (see the docstring)
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=("stage1", "stage2"))
    ap.add_argument("--config")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    ARGS[:] = config_overrides(cfg)  # stage 2 rebuilds configs with a few keys changed
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    out = stage1(cfg, cuda) if a.stage == "stage1" else stage2(cfg, cuda)
    out["ratio"] = out["estimate"] / max(1, out["measured"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
