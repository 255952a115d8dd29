"""Stage 2 on torch's own engine: DDP and FSDP2 (gloo, 2 CPU processes) train like one process
with the same global batch; FSDP checkpoints resume bit-exactly and load on another world size;
a SIGKILLed torchrun run resumes bit-exactly; the gradient does not depend on how a step is cut
into micro-batches or loss chunks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, stage2_overrides
from pipeline.config import load_config
from pipeline.distributed import Dist
from stage2_student_train.state import build_state, setup_run
from stage2_student_train.step import step_weights, train_step
from stage2_student_train.train import train

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "-m", "pipeline"]


def torchrun(nproc: int, *args: str, timeout: int = 400) -> subprocess.CompletedProcess:
    cmd = [*LAUNCH[:4], f"--nproc_per_node={nproc}", *LAUNCH[4:], *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=REPO, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def losses(run_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "split" not in json.loads(line)]


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "final" / "student" / "model.safetensors")


def assert_close_runs(one, two, rel=1e-4, atol=2e-5):
    la, lb = losses(one), losses(two)
    assert len(la) == len(lb) >= 10
    for a, b in zip(la, lb):
        assert b == pytest.approx(a, rel=rel)
    wa, wb = weights(one), weights(two)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rel, atol=atol)


def assert_identical_runs(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert losses(a) == losses(b)


STEPS = {"train.steps": 10, "train.save_every": 5, "train.eval_every": 5}


def test_ddp_cross_tokenizer_two_processes_equal_one(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    """Cross-tokenizer batches have unequal valid-target counts per rank: with the step's global
    count as the denominator, 2 ranks x 2 sequences = 1 process x 4 sequences."""
    extra = {**STEPS, "student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "mapped"}
    train(load_config(None, stage2_overrides(tiny_cache, tmp_path / "one", "r", **extra, **{"train.batch_size": 4})),
          show_progress=False)
    torchrun(2, "train-student", *stage2_overrides(tiny_cache, tmp_path / "two", "r", **extra,
                                                   **{"train.batch_size": 2, "train.parallel": "ddp"}))
    assert_close_runs(tmp_path / "one" / "r", tmp_path / "two" / "r")


def test_fsdp_trains_like_one_process_resumes_exactly_and_reshards(tiny_cache, tmp_path):
    """FSDP2 on 2 gloo processes: the same numbers as one process; a run stopped at step 5 and
    resumed ends bit-identical to the uninterrupted one; its sharded checkpoint also loads on 3
    processes (torch.distributed.checkpoint reshards)."""
    fsdp = {**STEPS, "train.batch_size": 2, "train.parallel": "fsdp"}
    train(load_config(None, stage2_overrides(tiny_cache, tmp_path / "one", "r", **STEPS, **{"train.batch_size": 4})),
          show_progress=False)
    torchrun(2, "train-student", *stage2_overrides(tiny_cache, tmp_path / "full", "r", **fsdp))
    assert_close_runs(tmp_path / "one" / "r", tmp_path / "full" / "r")

    torchrun(2, "train-student", *stage2_overrides(tiny_cache, tmp_path / "cut", "r", **fsdp,
                                                   **{"train.stop_after": 5}))
    ckpt = tmp_path / "cut" / "r" / "checkpoints" / "step-00000005"
    assert (ckpt / "sharded").is_dir() and not (ckpt / "student" / "model.safetensors").exists()
    torchrun(2, "resume", str(ckpt), "train.stop_after=0")
    assert_identical_runs(tmp_path / "full" / "r", tmp_path / "cut" / "r")

    torchrun(3, "resume", str(tmp_path / "cut" / "r" / "checkpoints" / "step-00000010"), "train.steps=12",
             "train.warmup_steps=2")
    assert len(losses(tmp_path / "cut" / "r")) == 12
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "r" / "final" / "student")  # the HF export loads


def test_sigkill_under_torchrun_then_resume_is_bit_identical(tiny_cache, tmp_path):
    extra = {"train.steps": 24, "train.save_every": 2, "train.eval_every": 12, "train.batch_size": 2}
    torchrun(2, "train-student", *stage2_overrides(tiny_cache, tmp_path / "full", "r", **extra))
    run_dir = tmp_path / "killed" / "r"
    cmd = [*LAUNCH[:4], "--nproc_per_node=2", *LAUNCH[4:], "train-student",
           *stage2_overrides(tiny_cache, tmp_path / "killed", "r", **extra)]
    proc = subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not (run_dir / "LATEST").is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)  # the event: the first checkpoint is committed
    for pid in [proc.pid, *descendants(proc.pid)]:  # the agent and its workers (own sessions)
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert not (run_dir / "final").exists(), "the run finished before it was killed"
    latest = run_dir / (run_dir / "LATEST").read_text().strip()
    torchrun(2, "resume", str(latest))
    assert_identical_runs(tmp_path / "full" / "r", run_dir)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), so a kill reaches the workers too."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        kids = [p for p, parent in parents.items() if parent == current]
        out += kids
        todo += kids
    return out


# ---------------------------------------------------------------- in-process gradient checks


def step_grads(cfg, batches) -> dict[str, torch.Tensor]:
    """The gradients one recipe step leaves behind (lr ~ 0 and no clipping, so they are raw)."""
    run = setup_run(cfg, Dist(), show_progress=False)
    state = build_state(run)
    train_step(state, batches(run), cfg, step_weights(cfg, 0), dist=run.dist, kind=run.parallel)
    state.data.close()
    return {n: p.grad.clone() for n, p in state.named if p.grad is not None}


def test_grad_accum_2x2_equals_4x1_for_unequal_cross_tokenizer_batches(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    base = {"student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "mapped", "train.grad_clip": 0.0,
            "train.lr": 1e-12, "train.ema_decay": 0.0}
    cfg = load_config(None, stage2_overrides(tiny_cache, tmp_path, "g", **base))
    run = setup_run(cfg, Dist(), show_progress=False)
    counts = [int(run.access.load(np.array([i]))["target_mask"].sum()) for i in range(len(run.reader))]
    shortest = int(np.argmin(counts))  # with three others: the two halves have unequal valid counts
    ids = np.array([shortest] + [i for i in range(len(counts)) if counts[i] != counts[shortest]][:3])

    def halves(run):
        parts = [run.access.load(ids[:2]), run.access.load(ids[2:])]
        valid = [int(b["target_mask"].sum()) for b in parts]
        assert valid[0] != valid[1], valid  # a per-micro-batch mean would weigh them differently
        return parts

    two = step_grads(cfg, halves)
    one = step_grads(cfg, lambda run: [run.access.load(ids)])
    assert two.keys() == one.keys()
    for k in one:
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-9)


def test_load_balance_gradient_does_not_depend_on_the_loss_chunk(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    base = {"student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "projected", "train.grad_clip": 0.0,
            "train.lr": 1e-12, "train.ema_decay": 0.0, "router.noise_std": 0.0, "router.num_experts": 3,
            "router.initial_top_k": 1, "router.final_top_k": 1, "router.load_balance_weight": 1.0,
            "router.projector_weight": 0.0, "kd.weight": 0.0}
    grads = []
    for chunk in (7, 50, 100000):
        cfg = load_config(None, stage2_overrides(tiny_cache, tmp_path, "lb", **base, **{"train.loss_chunk_size": chunk}))
        grads.append(step_grads(cfg, lambda run: [run.access.load(np.arange(4))]))
    gate = "router.gate.weight"
    assert float(grads[0][gate].abs().sum()) > 0  # the load-balance term really reaches the gate
    for g in grads[1:]:
        torch.testing.assert_close(g[gate], grads[0][gate], rtol=1e-5, atol=1e-10)
