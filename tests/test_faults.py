"""Fault injection: SIGKILL stage 1 and stage 2 at many random (seeded) points, rerun/resume
each time, and check the invariants after every kill and the final result against an
uninterrupted run, byte for byte."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, assert_same_cache, stage1_overrides, stage2_overrides
from pipeline.cache import CacheReader

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

KILLS = 10


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=dict(os.environ, PYTHONPATH=str(REPO)))


def finish(args: list[str]) -> None:
    r = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode == 0, r.stderr[-3000:]


def kill_when(proc: subprocess.Popen, ready, rng: random.Random, timeout: float = 120, max_delay: float = 0.3) -> bool:
    """SIGKILL ``proc`` a random moment after ``ready()`` holds; False if it ended first."""
    deadline = time.time() + timeout
    while proc.poll() is None and time.time() < deadline and not ready():
        time.sleep(0.005)
    time.sleep(rng.uniform(0, max_delay))
    if proc.poll() is not None:
        return False
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return True


def test_stage1_killed_at_random_points_ends_identical(tiny_teacher_dir, corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for p in corpus_dir.iterdir():
        for c in range(12):
            (corpus / f"{p.stem}-{c:02d}.txt").write_text(p.read_text() + f"\ncopy {c}\n")
    extra = {"data.eval_documents": ["omega-00.txt", "omega-01.txt"], "cache.topk_encoding": "sqrt8",
             "cache.samples": 8}  # the sampled tokens (RS-KD) are redone byte-identically too
    ref, victim = tmp_path / "ref", tmp_path / "victim"
    finish(["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus, ref, **extra)])
    shards = CacheReader(ref).spec.num_shards
    args = ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus, victim, **extra)]
    rng = random.Random(1126)
    kills = 0
    for attempt in range(KILLS + 5):
        if kills == KILLS:
            break
        done_before = len(list((victim / "done").glob("*.json"))) if (victim / "done").exists() else 0
        target = done_before + rng.randint(0, 3)  # sometimes during set-up, sometimes mid-shards
        proc = start(args)
        killed = kill_when(proc, lambda: (victim / "done").is_dir() and
                           len(list((victim / "done").glob("*.json"))) >= target, rng, max_delay=0.1)
        kills += killed
        if (victim / "manifest.json").exists():  # after every kill: a readable cache whose committed
            reader = CacheReader(victim)           # shards all verify
            for shard in reader._markers:
                reader._check_shard(shard)
        else:
            assert not victim.exists() or not any(victim.iterdir())  # nothing half-made under the name
        if not killed:
            break
    assert kills >= KILLS, f"only {kills} kills before the cache was complete"
    finish(args)
    assert_same_cache(ref, victim)
    assert shards >= 40


def assert_checkpoints_sound(run_dir: Path) -> None:
    """LATEST names a loadable checkpoint; no checkpoint under its final name is half-written."""
    for ckpt in (run_dir / "checkpoints").glob("step-*"):
        assert (ckpt / "state.pt").is_file() and (ckpt / "student" / "model.safetensors").is_file()
        assert (ckpt / "config.toml").is_file()
    latest = run_dir / "LATEST"
    if latest.exists():
        ckpt = run_dir / latest.read_text().strip()
        state = torch.load(ckpt / "state.pt", weights_only=False)
        assert state["step"] == int(ckpt.name.split("-")[1])
        assert load_file(ckpt / "student" / "model.safetensors")


def test_stage2_killed_at_random_points_resumes_bit_identical(tiny_cache, tmp_path):
    # Enough steps that 10 kills, each after at least one more checkpoint, fit before the end.
    extra = {"train.steps": 60, "train.save_every": 1, "train.eval_every": 20, "train.keep_checkpoints": 2}
    ref_runs, runs = tmp_path / "ref", tmp_path / "runs"
    finish(["train-student", *stage2_overrides(tiny_cache, ref_runs, "r", **extra)])
    run_dir = runs / "r"
    rng = random.Random(2611)
    kills = 0
    proc = start(["train-student", *stage2_overrides(tiny_cache, runs, "r", **extra)])
    while True:
        latest = run_dir / "LATEST"
        step_now = int(latest.read_text().strip().split("-")[1]) if latest.exists() else 0
        target = step_now + 1  # at least one more checkpoint each time, then a random moment later
        killed = kill_when(proc, lambda: latest.exists() and int(latest.read_text().strip().split("-")[1]) >= target,
                           rng, max_delay=0.15)
        kills += killed
        assert_checkpoints_sound(run_dir)
        if not killed or kills == KILLS:
            break
        if latest.exists():
            proc = start(["resume", str(run_dir / latest.read_text().strip())])
        else:  # killed before the first checkpoint: start over (the run directory is refused otherwise)
            proc = start(["train-student", *stage2_overrides(tiny_cache, runs, "r", **{**extra, "train.overwrite": True})])
    latest = run_dir / "LATEST"
    assert kills >= KILLS, f"only {kills} kills before the run ended ({latest.read_text().strip()})"
    if not (run_dir / "final").exists():
        finish(["resume", str(run_dir / latest.read_text().strip())])
    assert_checkpoints_sound(run_dir)
    ref_w = load_file(ref_runs / "r" / "final" / "student" / "model.safetensors")
    got_w = load_file(run_dir / "final" / "student" / "model.safetensors")
    assert all(torch.equal(ref_w[k], got_w[k]) for k in ref_w)
    ref_state = torch.load(ref_runs / "r" / "checkpoints" / "step-00000060" / "state.pt", weights_only=False)
    got_state = torch.load(run_dir / "checkpoints" / "step-00000060" / "state.pt", weights_only=False)
    for k, v in ref_state["ema"]["shadow"].items():
        assert torch.equal(v, got_state["ema"]["shadow"][k]), k
