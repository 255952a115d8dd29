"""The student: a Hugging Face causal LM, fresh from config or from a hub id / local directory,
and its tokenizer (the cache's teacher tokenizer in same-tokenizer mode). The teacher model
itself is never loaded here: only its tokenizer files are read."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.config import Config
from pipeline.errors import ConfigError, PipelineError
from pipeline.fingerprint import tokenizer_hash


def load_student_tokenizer(cfg: Config, reader: CacheReader):
    from transformers import AutoTokenizer

    facts = reader.spec.teacher
    try:
        if cfg.student.tokenizer:
            tok = AutoTokenizer.from_pretrained(cfg.student.tokenizer)
        else:
            kwargs = {"gguf_file": facts["gguf_file"]} if facts.get("gguf_file") else {}
            tok = AutoTokenizer.from_pretrained(facts["path"], **kwargs)
    except Exception as e:
        raise PipelineError(f"cannot load the student tokenizer ({e.__class__.__name__}: {str(e)[:200]}); "
                            "set student.tokenizer to a tokenizer directory or hub id") from None
    if tokenizer_hash(tok) != reader.fingerprint["tokenizer_hash"]:
        raise ConfigError("the student tokenizer differs from the cache's teacher tokenizer; cross-tokenizer "
                          "distillation is not implemented yet in this version: leave student.tokenizer empty")
    return tok


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
