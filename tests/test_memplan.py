"""The memory planner (pipeline/memplan.py) against peaks measured on the CPU, and doctor --config."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, stage1_overrides
from pipeline.memplan import ModelDims, largest_batch, parse_bytes, stage1_terms, stage2_terms


def memcheck(*args):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="2")
    r = subprocess.run([sys.executable, "-m", "bench.memcheck", *args], capture_output=True, text=True, cwd=REPO,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def wide_teacher_dir(tmp_path_factory):
    """A wider random Llama (d=384, I=1024, 3 layers) over GPT-2's vocabulary: activations and
    weights matter beside the logits chunk."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from conftest import gpt2_tokenizer
    out = tmp_path_factory.mktemp("wide-teacher")
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=384, intermediate_size=1024, num_hidden_layers=3,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                                 tie_word_embeddings=True)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("which, batch, seq, chunk", [("tiny", 4, 512, 512), ("wide", 8, 512, 256)])
def test_stage1_estimate_within_25_percent_of_measured(which, batch, seq, chunk, tiny_teacher_dir, wide_teacher_dir):
    teacher = tiny_teacher_dir if which == "tiny" else wide_teacher_dir
    got = memcheck("stage1", f"teacher.model={json.dumps(str(teacher))}", f"teacher.batch_size={batch}",
                   f"data.seq_len={seq}", f"teacher.logits_chunk={chunk}")
    assert got["measured"] > 50 * 2**20  # a real peak, not noise
    assert 0.75 <= got["ratio"] <= 1.25, got


@pytest.fixture(scope="module")
def cache128(tiny_teacher_dir, corpus_dir, tmp_path_factory):
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher
    cache = tmp_path_factory.mktemp("cache128") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{"data.seq_len": 128})),
                  show_progress=False)
    return cache


@pytest.mark.slow  # starts a process
@pytest.mark.parametrize("student, batch, chunk", [
    (("32", "2", "2", "1", "64"), 8, 1024),     # the loss chunk dominates
    (("256", "4", "4", "2", "1024"), 16, 128),  # weights, optimizer state and activations dominate
])
def test_stage2_estimate_within_25_percent_of_measured(student, batch, chunk, cache128, tiny_teacher_dir):
    d, layers, heads, kv, inter = student
    got = memcheck("stage2", f"cache.dir={json.dumps(str(cache128))}", f"teacher.model={json.dumps(str(tiny_teacher_dir))}",
                   "data.seq_len=128", "train.steps=2", "train.warmup_steps=0", "train.eval_every=100",
                   "train.save_every=100", "train.eval_sequences=2", "train.num_threads=2",
                   f"student.hidden_size={d}", f"student.num_layers={layers}", f"student.num_heads={heads}",
                   f"student.num_kv_heads={kv}", f"student.intermediate_size={inter}",
                   f"train.batch_size={batch}", f"train.loss_chunk_size={chunk}")
    assert got["measured"] > 100 * 2**20
    assert 0.75 <= got["ratio"] <= 1.25, got


DIMS = ModelDims(vocab=49152, hidden=576, layers=30, heads=9, kv_heads=3, head_dim=64, intermediate=1536,
                 params=134_515_008, largest_param=49152 * 576)


def test_formulas_scale_as_documented():
    a = stage1_terms(DIMS, batch=4, seq_len=256, logits_chunk=512, dtype_bytes=2, top_k=64)
    b = stage1_terms(DIMS, batch=8, seq_len=256, logits_chunk=512, dtype_bytes=2, top_k=64)
    assert a["weights"] == b["weights"] == DIMS.params * 2
    assert b["activations"] == 2 * a["activations"]
    assert a["fp32_head"] < DIMS.vocab * DIMS.hidden * 4  # D=576 > chunk 512: slabs, not the whole head
    s = stage2_terms(DIMS, batch=8, seq_len=256, loss_chunk=1024, autocast_bytes=4, cuda=False)
    assert s["adamw"] == 8 * DIMS.params and s["loss_chunk"] == 16 * 1024 * DIMS.vocab
    assert s["peak"] == max(s["forward_backward"], s["optimizer_step"], s["eval"])


def test_largest_batch_and_sizes():
    assert parse_bytes("16GiB") == 16 * 2**30 and parse_bytes("800 MB") == 800_000_000
    with pytest.raises(ValueError):
        parse_bytes("lots")
    peak = lambda b: b * 2**30  # noqa: E731
    assert largest_batch(peak, 10 * 2**30, cuda=False) == 9  # 10% slack kept free
    assert largest_batch(peak, 10 * 2**30, cuda=True) == 8   # and the CUDA context reserve
    assert largest_batch(peak, 2**29, cuda=False) == 0


@pytest.mark.slow  # starts a process
def test_doctor_config_prints_the_plan(tiny_teacher_dir):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    args = [sys.executable, "-m", "pipeline", "doctor", "--config", "configs/default.toml",
            f"teacher.model={json.dumps(str(tiny_teacher_dir))}", "--device-memory", "16GiB"]
    r = subprocess.run(args, capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(None, 1) if "  " not in line else [s.strip() for s in line.split("  ", 1)]
                  for line in r.stdout.splitlines() if line.strip())
    for key in ("stage1 peak", "stage1 terms", "stage1 largest batch", "stage2 peak", "stage2 terms",
                "stage2 largest batch", "memory budget"):
        assert key in fields, (key, r.stdout)
    assert "16.00 GiB on cuda" in fields["memory budget"]
    assert int(fields["stage2 largest batch"]) > 8
    r = subprocess.run(args + ["--json"], capture_output=True, text=True, cwd=REPO, env=env)
    plan = json.loads(r.stdout)["plan"]
    assert plan["stage1"]["peak"] > plan["stage1"]["weights"] > 0 and plan["stage2"]["fits"] is True
    r = subprocess.run(args[:-1] + ["a lot"], capture_output=True, text=True, cwd=REPO, env=env)
    assert r.returncode == 2 and r.stderr.startswith("error: cannot read a memory size")
