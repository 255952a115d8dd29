"""Hub-ready students: the model card in the hub's metadata format, what `push` would upload, and
the one-line errors without the network or a token. Nothing here reaches the network."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import PipelineError
from stage2_student_train.model_card import model_card_text, write_model_card
from stage2_student_train.push import check_hub, upload_files


def test_the_card_carries_hub_metadata_and_no_local_path(tmp_path):
    """base_model, license and language from the student's own card (a local folder here),
    datasets when the data is a hub id; teacher and student named by folder name or hub id."""
    from huggingface_hub import ModelCard

    student = tmp_path / "abs" / "smollm-135m-local"
    student.mkdir(parents=True)
    (student / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\nbase_model: HuggingFaceTB/SmolLM-135M\n"
                                       "---\n# SmolLM\n")
    info = {"run": "chat-run", "teacher": str(tmp_path / "models" / "qwen3-moe-teacher"), "student_model": str(student),
            "dataset": "karpathy/tiny_shakespeare", "chat": True, "kd_mode": "mapped", "temperature": 2.0,
            "steps": 120, "tokens": 983040, "tokenizer": str(student),
            "cache_fingerprint": {"teacher": str(tmp_path / "models" / "qwen3-moe-teacher"), "top_k": 64,
                                  "dataset": "karpathy/tiny_shakespeare", "tokenizer_hash": "ab12"},
            "held_out": {"ppl": 31.25, "bpb": 1.5, "counted": "assistant/completion tokens only (the cache's loss_mask)"}}
    (tmp_path / "out").mkdir()
    path = write_model_card(tmp_path / "out", info)
    text = path.read_text()
    data = ModelCard.load(path).data
    assert data.base_model == "HuggingFaceTB/SmolLM-135M" and data.license == "apache-2.0" and data.language == "en"
    assert data.datasets == ["karpathy/tiny_shakespeare"] and data.library_name == "transformers"
    assert data.pipeline_tag == "text-generation" and {"knowledge-distillation", "conversational"} <= set(data.tags)
    assert str(tmp_path) not in text  # no absolute local path anywhere
    for needle in ["| teacher | qwen3-moe-teacher |", "| student initialised from | smollm-135m-local |",
                   "| KD mode | mapped |", "| training tokens (seen) | 983040 |", "| ppl | 31.25 |",
                   "Counted over: assistant/completion tokens only", "apply_chat_template", "| cache top_k | 64 |"]:
        assert needle in text, needle
    # A hub-id student is its own base_model; a fresh one has none; local data is no dataset.
    fresh = model_card_text({"teacher": "HuggingFaceTB/SmolLM2-135M-Instruct", "dataset": str(tmp_path / "corpus")},
                            "student")
    assert "base_model" not in fresh and "datasets" not in fresh and "| data | corpus |" in fresh
    hub = model_card_text({"student_model": "HuggingFaceTB/SmolLM-135M"}, "student", repo_id="me/smol-kd")
    assert "base_model: HuggingFaceTB/SmolLM-135M" in hub and 'path = "me/smol-kd"' in hub


@pytest.fixture
def finished_run(tmp_path) -> Path:
    """A run directory as train-student leaves it: final/student + summary.json with the card info."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage2_student_train.student import gpt2_tokenizer, save_student

    run = tmp_path / "runs" / "demo"
    student = run / "final" / "student"
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50257, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    save_student(model, gpt2_tokenizer(), student)
    info = {"run": "demo", "teacher": "embedded:smollm2-135m-instruct", "kd_mode": "topk_tail", "steps": 6,
            "held_out": {"ppl": 99.5}}
    write_model_card(student, info)
    (run / "summary.json").write_text(json.dumps({"step": 6, "model_card": info}))
    return run


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_upload_is_the_exported_student_with_a_card_for_the_repo(finished_run):
    before = snapshot(finished_run)
    files = upload_files(finished_run, "me/demo-kd")
    student = finished_run / "final" / "student"
    assert set(files) == {p.name for p in student.iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "README.md"} <= set(files)
    card = files["README.md"].decode()
    assert 'path = "me/demo-kd"' in card and "| ppl | 99.5 |" in card
    assert all(isinstance(v, Path) and v.parent == student for k, v in files.items() if k != "README.md")
    assert snapshot(finished_run) == before


def test_push_without_network_or_token_is_one_line_and_changes_nothing(finished_run, monkeypatch, tmp_path, capsys):
    from huggingface_hub import constants

    from pipeline.cli import main

    assert constants.is_offline_mode()  # the suite runs with HF_HUB_OFFLINE=1: nothing can be sent
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    before = snapshot(finished_run)
    assert main(["push", str(finished_run), "--repo-id", "me/demo-kd"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "HF_HUB_OFFLINE=1" in err and "no Hugging Face token" in err
    monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    with pytest.raises(PipelineError) as e:
        check_hub("me/demo-kd")
    assert "HF_HUB_OFFLINE" in str(e.value) and "no Hugging Face token" not in str(e.value)  # names only what is missing
    assert main(["push", str(finished_run), "--repo-id", "not-a-repo-id"]) == 2
    assert "USER/NAME" in capsys.readouterr().err
    assert main(["push", str(tmp_path / "nowhere"), "--repo-id", "me/x"]) == 2
    assert snapshot(finished_run) == before


def test_train_push_to_hub_fails_before_training_when_offline(tmp_path):
    from pipeline.config import load_config
    from stage2_student_train.train import train

    cfg = load_config(None, ['train.push_to_hub="me/demo-kd"', f"run.runs_dir={json.dumps(str(tmp_path))}",
                             "run.name=r", f"cache.dir={json.dumps(str(tmp_path / 'no-cache'))}"])
    with pytest.raises(PipelineError, match="HF_HUB_OFFLINE"):
        train(cfg, show_progress=False)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
