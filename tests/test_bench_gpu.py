"""make bench-gpu: a one-line refusal without CUDA, and its orchestration end to end on the CPU
with tiny sizes (the hidden --cpu-smoke flag)."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only


def run(*args, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "bench.gpu", *args], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=timeout)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_at_once_with_one_line():
    r = run(timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench-gpu needs a CUDA GPU"), r.stderr
    assert r.stdout == ""


def test_cpu_smoke_of_the_orchestration(tiny_teacher_dir, corpus_dir, tmp_path):
    def kv(k, v):
        return f"{k}={json.dumps(v)}"

    r = run("--cpu-smoke", "--out", str(tmp_path), "--sequences", "6", "--steps", "4", "--batch-size", "2",
            kv("teacher.model", str(tiny_teacher_dir)), kv("data.source", str(corpus_dir)),
            kv("data.eval_documents", ["omega.txt"]), "data.seq_len=32", "cache.top_k=8", "teacher.logits_chunk=64",
            "teacher.batch_size=2", "cache.shard_sequences=4", "teacher.num_threads=1", "train.num_threads=1",
            "student.hidden_size=32", "student.num_layers=2", "student.num_heads=2", "student.num_kv_heads=1",
            "student.intermediate_size=64", "train.loss_chunk_size=50")
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads((tmp_path / "gpu-results.json").read_text())
    assert got["environment"]["device"] == "cpu" and got["environment"]["torch"] == torch.__version__
    assert set(got["stage2"]) == {"none", "topk_tail", "union"}
    for mode, res in got["stage2"].items():
        assert res["tokens_per_s"] > 0 and res["data_stall_s_per_step"] is not None, (mode, res)
    assert got["stage1"]["P1"] > 0 and got["stage1"]["teacher_tokens_per_s"] > 0
    assert 0 < got["ratios"]["P3"] < 1 and got["ratios"]["P2_topk_tail"] > 0
    md = (tmp_path / "gpu-results.md").read_text()
    assert "P1 stage-1 pass / pure forward" in md and "torch" in md
