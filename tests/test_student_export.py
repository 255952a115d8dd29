"""An exported student says which tokens are bos/eos/pad (its tokenizer's, not Llama's defaults)
and carries a model card with the numbers it was given."""

from __future__ import annotations

import json
import random

import pytest

from pipeline.config import load_config
from stage2_student_train.student import build_student, gpt2_tokenizer, save_student, write_model_card

SMALL = ["student.hidden_size=16", "student.num_layers=1", "student.num_heads=2", "student.num_kv_heads=1",
         "student.intermediate_size=32"]


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


@pytest.mark.parametrize("pass_tokenizer", [False, True])
def test_exported_student_has_the_tokenizers_special_ids(tmp_path, tok, pass_tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig

    cfg = load_config(None, SMALL)
    model = build_student(cfg, len(tok), 64, tok) if pass_tokenizer else build_student(cfg, len(tok), 64)
    if pass_tokenizer:
        assert model.config.eos_token_id == tok.eos_token_id
    # eos is a training token: its embedding row must stay trainable (no padding_idx on it)
    assert model.model.embed_tokens.padding_idx is None
    assert model.model.embed_tokens.weight[tok.eos_token_id].abs().sum() > 0
    save_student(model, tok, tmp_path / "s")
    assert tok.pad_token_id is None  # GPT-2 has no pad token: eos pads
    want = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.eos_token_id}
    assert want["eos_token_id"] == 50256
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    gen = json.loads((tmp_path / "s" / "generation_config.json").read_text())
    for key, value in want.items():
        assert gen[key] == value, key
        assert config.get(key) == (value if key != "pad_token_id" else None), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    assert loaded.config.eos_token_id == tok.eos_token_id and loaded.model.embed_tokens.padding_idx is None
    assert GenerationConfig.from_pretrained(tmp_path / "s").pad_token_id == tok.eos_token_id


def test_a_tokenizer_with_a_pad_token_keeps_it(tmp_path):
    tok = gpt2_tokenizer()
    tok.add_special_tokens({"pad_token": "<|pad|>"})
    model = build_student(load_config(None, SMALL), len(tok), 64, tok)
    save_student(model, tok, tmp_path / "s")
    gen = json.loads((tmp_path / "s" / "generation_config.json").read_text())
    config = json.loads((tmp_path / "s" / "config.json").read_text())
    assert gen["pad_token_id"] == config["pad_token_id"] == tok.pad_token_id == len(tok) - 1 != tok.eos_token_id


def test_model_card_carries_the_given_numbers(tmp_path):
    rng = random.Random()
    held = {"ppl": rng.uniform(50, 500), "bpb": rng.uniform(1, 3), "teacher_top1_agree": rng.random()}
    fingerprint = f"{rng.getrandbits(64):016x}"
    steps = rng.randint(10, 10_000)
    info = {"teacher": "embedded:smollm2-135m-instruct", "cache_fingerprint": fingerprint, "kd_mode": "topk_tail",
            "temperature": 2.0, "steps": steps, "held_out": held, "run": "demo", "seed": 3}
    path = write_model_card(tmp_path, info)
    text = path.read_text()
    assert path.name == "README.md"
    for needle in ["embedded:smollm2-135m-instruct", fingerprint, "topk_tail", str(steps), "| seed | 3 |",
                   "AutoModelForCausalLM.from_pretrained", "AutoTokenizer.from_pretrained", "# demo"]:
        assert needle in text, needle
    for name, value in held.items():
        assert f"| {name} | {value:.6g} |" in text
