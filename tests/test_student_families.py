"""Any Hugging Face causal LM as the student (Llama, Qwen2, Qwen3, GPT-2 layouts): stage 2 trains
it through the model's own accessors, exports it with a KV cache that generates the same tokens
as without, keeps its position range; a student that fails to load leaves no run directory."""

import pytest
import torch

from conftest import gpt2_tokenizer, stage2_overrides
from pipeline.config import load_config
from pipeline.errors import PipelineError
from stage2_student_train.train import train

POSITIONS = 96  # larger than the cache's seq_len (32): an export must keep it


def tiny_student(family: str, vocab: int):
    import transformers as tf

    small = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=POSITIONS, tie_word_embeddings=True)
    if family == "llama":
        return tf.LlamaForCausalLM(tf.LlamaConfig(**small))
    if family == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))
    if family == "qwen3":
        return tf.Qwen3ForCausalLM(tf.Qwen3Config(**small, head_dim=16))
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2,
                                                n_positions=POSITIONS))
    raise ValueError(family)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gpt2"])
def test_any_causal_lm_trains_exports_and_generates_with_a_kv_cache(family, tiny_cache, tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    folder = tmp_path / family
    tiny_student(family, len(gpt2_tokenizer())).save_pretrained(folder)
    out = train(load_config(None, stage2_overrides(tiny_cache, tmp_path / "runs", family, **{
        "student.model": str(folder), "train.steps": 2, "train.warmup_steps": 0, "train.eval_every": 2,
        "train.save_every": 2})), show_progress=False)
    assert out["step"] == 2 and out["eval"]["ppl"] > 1
    final = tmp_path / "runs" / family / "final" / "student"
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    assert model.config.use_cache is True
    positions = getattr(model.config, "max_position_embeddings", None) or model.config.n_positions
    assert positions == POSITIONS  # not shrunk to the training length
    prompt = torch.tensor([[464, 2068, 7586, 21831, 18045]])
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kw)
    without = model.generate(prompt, use_cache=False, **kw)
    assert with_cache.shape[1] == prompt.shape[1] + 8 and torch.equal(with_cache, without)


def test_a_student_that_fails_to_load_leaves_no_run_directory(tiny_cache, tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    cfg = load_config(None, stage2_overrides(tiny_cache, tmp_path / "runs", "nope",
                                             **{"student.model": str(tmp_path / "broken")}))
    with pytest.raises(PipelineError, match="cannot load student"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "runs" / "nope").exists()


def test_a_fresh_student_is_exported_with_its_kv_cache_on(tmp_path):
    """A fresh student is built with use_cache=False (training needs none); its export says True."""
    import json

    from stage2_student_train.student import build_student, save_student
    tok = gpt2_tokenizer()
    cfg = load_config(None, ["student.hidden_size=32", "student.num_layers=1", "student.num_heads=2",
                             "student.num_kv_heads=1", "student.intermediate_size=64"])
    model = build_student(cfg, len(tok), 32, tok)
    assert model.config.use_cache is False
    save_student(model, tok, tmp_path / "s")
    assert json.loads((tmp_path / "s" / "config.json").read_text())["use_cache"] is True


def test_a_padded_teacher_head_gets_a_full_vocab_map(tmp_path, corpus_dir, smollm2_tokenizer_dir):
    """Qwen's head has 151936 rows for 151851 tokens: the cross-tokenizer map must cover every
    row (padding rows without twins), or top-k ids there crash the batch and the stored view is
    rebuilt on every run."""
    import numpy as np
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from conftest import stage1_overrides
    from pipeline.cache import CacheReader
    from stage1_teacher_cache.run import cache_teacher
    from stage2_student_train.cross import _load_view, load_or_build_view, view_dir
    tok = gpt2_tokenizer()
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok) + 47, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(tmp_path / "t")
    tok.save_pretrained(tmp_path / "t")
    cache_teacher(load_config(None, stage1_overrides(tmp_path / "t", corpus_dir, tmp_path / "cache")), show_progress=False)
    reader, student_tok = CacheReader(tmp_path / "cache"), AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    view = load_or_build_view(reader, tok, student_tok, show_progress=False)
    assert view.vmap.shape == (len(tok) + 47,) and np.all(view.vmap[len(tok):] == -1)
    assert _load_view(view_dir(reader, student_tok), reader) is not None  # stored, and reused next time
