"""The seed's run rehearsed offline: configs/seed-p100.toml with its two models swapped for tiny
random ones of the same families and the real tokenizers. A Qwen3MoeForCausalLM teacher with
Qwen's 151936-entry BPE (rebuilt offline as bench/p4b.py does) and a SmolLM-shaped Llama student
with the SmolLM2 49152-entry tokenizer: stage 1, stage 2 cross-tokenizer (the config's own KD
mode), SIGTERM mid-run, resume, export, reload with AutoModelForCausalLM, and generate() with
the KV cache giving the same tokens as without it."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO

SEED_CONFIG = REPO / "configs" / "seed-p100.toml"
STEPS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory, smollm2_tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from bench.p4b import qwen_tokenizer, tiny_qwen3_moe

    root = tmp_path_factory.mktemp("seed-models")
    qwen = qwen_tokenizer()
    tiny_qwen3_moe(qwen.eos_token_id).save_pretrained(root / "teacher")
    qwen.save_pretrained(root / "teacher")
    smol = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(0)  # SmolLM's layout (Llama, tied head, 3 query heads per kv head), scaled down
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(smol), hidden_size=96, intermediate_size=256, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=2048, tie_word_embeddings=True, rope_theta=10000.0,
        bos_token_id=smol.bos_token_id, eos_token_id=smol.eos_token_id)).save_pretrained(root / "student")
    smol.save_pretrained(root / "student")
    return root / "teacher", root / "student"


def overrides(teacher: Path, student: Path, corpus: Path, tmp: Path) -> list[str]:
    """Only the models, the data and the sizes change; the KD mode, cache encoding and the rest
    are the seed config's."""
    return [f"teacher.model={str(teacher)!r}", "teacher.batch_size=2", "teacher.logits_chunk=64",
            f"data.source={str(corpus)!r}", "data.subset=''", "data.seq_len=64", 'data.eval_documents=["omega.txt"]',
            "data.max_train_tokens=1536", "data.max_eval_tokens=256", f"cache.dir={str(tmp / 'cache')!r}",
            "cache.shard_sequences=8", "cache.chunk_sequences=4", "cache.pilot_sequences=2",
            f"student.model={str(student)!r}", f"student.tokenizer={str(student)!r}", f"run.runs_dir={str(tmp / 'runs')!r}",
            f"train.steps={STEPS}", "train.batch_size=2", "train.grad_accum=2", "train.warmup_steps=1",
            "train.eval_every=2", "train.eval_sequences=2", "train.save_every=4", "train.loss_chunk_size=64",
            "train.num_threads=1", "teacher.num_threads=1"]


@pytest.mark.slow
def test_seed_run_rehearsal(models, corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher
    from stage2_student_train.checkpoint import resume_config
    from stage2_student_train.train import train

    teacher, student = models
    args = overrides(teacher, student, corpus_dir, tmp_path)
    cfg = load_config(SEED_CONFIG, args)
    assert cfg.kd.mode == "mapped" and cfg.student.tokenizer == str(student)
    cache_teacher(cfg, show_progress=False)

    # Stage 2 in its own process; SIGTERM once it has printed its first eval (a session ending).
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train-student", "--config", str(SEED_CONFIG), *args],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:  # blocks until the run says it evaluated step 2
        lines.append(line)
        if line.startswith("step 2: eval"):
            proc.send_signal(signal.SIGTERM)
            break
    out, err = proc.communicate(timeout=600)
    out = "".join(lines) + out
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    ckpt = Path(out.split("continue with: make resume CKPT=")[1].split()[0])
    assert 2 <= int(ckpt.name.split("-")[1]) < STEPS

    summary = train(resume_config(ckpt, []), resume_from=ckpt, show_progress=False)
    assert summary["step"] == STEPS and summary["resumed_from"] == str(ckpt)
    assert 0 < summary["cross_tokenizer"]["teacher_topk_mass_mapped"] <= 1

    final = Path(summary["run_dir"]) / "final" / "student"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert len(tok) == 49152 and model.config.use_cache is True and model.config.max_position_embeddings == 2048
    prompt = tok("To be, or not to be", return_tensors="pt")
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.eos_token_id)
    with_cache = model.generate(**prompt, use_cache=True, **kw)
    without = model.generate(**prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == prompt["input_ids"].shape[1] + 12 and torch.equal(with_cache, without)
