"""Tiny random-init models shared by the benchmarks and the tests (one builder, so a bench
figure and a test speak of the same model)."""

from __future__ import annotations

from pathlib import Path


def tiny_llama_teacher(tokenizer, out: Path, seed: int = 1234) -> Path:
    """A 2-layer Llama (d=32) over ``tokenizer``'s vocabulary, randomly initialised with a wide
    init so its next-token distributions are peaked (top-k then has clear winners); saved with
    the tokenizer as a local Hugging Face directory ``out``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         initializer_range=0.3, tie_word_embeddings=True,
                         eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
