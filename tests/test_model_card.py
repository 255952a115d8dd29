"""A model card that is right wherever it is written: names decided when the run finishes (not by
the directory `push` runs in), only hub ids as hub links, what the cache really holds, the license
or its absence, a pruned student's record, and `push --dry-run`. Nothing reaches the network."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import CORPUS, stage1_overrides, stage2_overrides
from stage2_student_train.model_card import (cache_holds, card_metadata, model_card_text, run_facts,
                                             source_kind, write_model_card)


def spec(**kw):
    base = dict(top_k=64, topk_encoding="sqrt8", samples=0, store_hidden=False, hidden_dtype="float16")
    return SimpleNamespace(**{**base, **kw})


def test_the_card_says_what_the_cache_holds():
    plain = model_card_text({"cache_holds": cache_holds(spec(), has_head=False)}, "s")
    assert "top-64 logits per position (sqrt8)" in plain and "hidden states" not in plain
    full = model_card_text({"cache_holds": cache_holds(spec(store_hidden=True, samples=48, hidden_dtype="int8"),
                                                       has_head=True)}, "s")
    assert "last-layer hidden states (int8)" in full and "48 tokens sampled" in full and "output head" in full
    # A run finished before the card recorded it: read from the fingerprint (hidden_dtype "none": not stored).
    old = model_card_text({"cache_fingerprint": {"top_k": 32, "topk_encoding": "logp16", "hidden_dtype": "none"}}, "s")
    assert "top-32 logits" in old and "hidden states" not in old


def test_license_from_the_student_or_stated_unknown(tmp_path, monkeypatch):
    from huggingface_hub import ModelCard

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# mine\n")
    known = run_facts("mine", "embedded:smollm2-135m-instruct", None, spec(), False)
    assert known["license"] == "mit" and known["sources"]["student_model"] == "local"
    path = write_model_card(tmp_path, {"student_model": "mine", **known})
    card = ModelCard.load(path)
    assert card.data.license == "mit" and card.data.language == "en" and "| license | mit |" in card.text
    unknown = model_card_text({"student_model": "fresh", **run_facts(None, None, None, spec(), False)}, "s")
    assert "license:" not in unknown.split("---")[1] and "| license | unknown" in unknown


def test_only_hub_ids_become_hub_links_wherever_the_card_is_written(tmp_path, monkeypatch):
    train_dir, elsewhere = tmp_path / "train", tmp_path / "elsewhere"
    for d in (train_dir / "data" / "shakespeare", train_dir / "students" / "l6w384", elsewhere):
        d.mkdir(parents=True)
    monkeypatch.chdir(train_dir)
    facts = run_facts("students/l6w384", "embedded:smollm2-135m-instruct", "data/shakespeare", spec(), False)
    hub_facts = run_facts("HuggingFaceTB/SmolLM-135M", "huihui-ai/Huihui-MoE-1.2B-A0.6B", "Salesforce/wikitext",
                          spec(), False)
    monkeypatch.chdir(elsewhere)
    assert source_kind("data/shakespeare") == "hub"  # what the card used to decide from here
    local = {"student_model": "students/l6w384", "teacher": "embedded:smollm2-135m-instruct",
             "dataset": "data/shakespeare", **facts}
    assert set(card_metadata(local)) == {"tags", "library_name", "pipeline_tag"}  # no base_model, datasets
    text = model_card_text(local, "student")
    assert "huggingface.co" not in text and "| data | shakespeare |" in text and "| student initialised from | l6w384 |" in text
    hub = {"student_model": "HuggingFaceTB/SmolLM-135M", "teacher": "huihui-ai/Huihui-MoE-1.2B-A0.6B",
           "dataset": "Salesforce/wikitext", **hub_facts}
    meta = card_metadata(hub)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM-135M" and meta["datasets"] == ["Salesforce/wikitext"]
    text = model_card_text(hub, "student")
    assert "[Salesforce/wikitext](https://huggingface.co/datasets/Salesforce/wikitext)" in text
    assert "[huihui-ai/Huihui-MoE-1.2B-A0.6B](https://huggingface.co/huihui-ai/Huihui-MoE-1.2B-A0.6B)" in text
    # A student cut from a hub teacher has that teacher as its base model; from the embedded one, none.
    cut = {"student_model": "students/l6w384", "sources": {"student_model": "local"},
           "pruned_from": {"teacher": "huihui-ai/Huihui-MoE-1.2B-A0.6B", "kept_layers": [0, 27]}}
    assert card_metadata(cut)["base_model"] == "huihui-ai/Huihui-MoE-1.2B-A0.6B" and "pruned" in card_metadata(cut)["tags"]
    cut["pruned_from"]["teacher"] = "embedded:smollm2-135m-instruct"
    assert "base_model" not in card_metadata(cut)


@pytest.mark.slow  # runs both stages end to end (tiny models, seconds)
def test_a_pruned_students_run_card_and_dry_run_push_from_another_directory(
        tiny_teacher_dir, tmp_path, monkeypatch, capsys):
    """Relative paths as a user writes them; prune, cache (no hidden states), train; then
    `push --dry-run` from another directory prints the same card and the files, prune.json among
    them, and sends nothing."""
    from huggingface_hub import HfApi

    from pipeline.cli import main
    from pipeline.config import load_config
    from stage1_teacher_cache.prune import prune_teacher
    from stage1_teacher_cache.run import cache_teacher
    from stage2_student_train.train import train

    work = tmp_path / "work"
    (work / "data" / "plays").mkdir(parents=True)
    for name, text in CORPUS.items():
        (work / "data" / "plays" / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(work)
    s1 = stage1_overrides(tiny_teacher_dir, Path("data/plays"), Path("caches/c"), **{"cache.store_hidden": False})
    prune_teacher(load_config(None, s1), Path("students/cut"), layers=1)
    cache_teacher(load_config(None, s1), show_progress=False)
    s2 = stage2_overrides(Path("caches/c"), Path("runs"), "cut", **{"student.model": "students/cut", "train.steps": 2,
                                                                     "train.warmup_steps": 1,
                                                                     "train.eval_every": 2, "train.save_every": 2})
    train(load_config(None, s2), show_progress=False)
    final = work / "runs" / "cut" / "final" / "student"
    assert json.loads((final / "prune.json").read_text())["kept_layers"] == json.loads(
        (work / "students" / "cut" / "prune.json").read_text())["kept_layers"]
    card = (final / "README.md").read_text()
    assert "cut from the teacher" in card and "1 of 2 layers kept" in card and "hidden states" not in card
    assert "datasets:" not in card and "base_model:" not in card and "| data | plays |" in card
    assert "| license | unknown" in card and str(tmp_path) not in card

    def refuse(*a, **k):
        raise AssertionError("a dry run reached the hub")

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    monkeypatch.setattr(HfApi, "create_commit", refuse)
    monkeypatch.chdir(tmp_path)  # no data/plays or students/cut here
    capsys.readouterr()
    assert main(["push", str(work / "runs" / "cut"), "--dry-run", "--repo-id", "me/cut-kd"]) == 0
    out = capsys.readouterr().out
    shown, listing = out.split("--- dry run:")
    assert shown.rstrip() == card.replace('path = "student"  # this folder, or the hub id it was pushed to',
                                          'path = "me/cut-kd"').rstrip()
    assert "nothing was uploaded" in listing
    assert {"prune.json", "README.md", "config.json", "model.safetensors"} <= {
        line.split()[-1] for line in listing.splitlines()[1:] if line.strip()}
    assert main(["push", str(work / "runs" / "cut")]) == 2  # no --repo-id and no --dry-run
    assert "--dry-run" in capsys.readouterr().err


def test_the_demo_report_says_where_the_student_started():
    from pipeline.report import student_origin

    assert student_origin({}) == "fresh (random initialisation)"
    assert student_origin({"model_card": {"student_model": "HuggingFaceTB/SmolLM-135M"}}) == (
        "started from HuggingFaceTB/SmolLM-135M")
    pruned = {"student_model": "students/demo-l10", "pruned_from": {"kept_layers": list(range(10)),
                                                                     "teacher_shape": {"layers": 30}}}
    assert student_origin({"model_card": pruned}) == (
        "started from the teacher cut to 10 of its 30 layers by prune-teacher (demo-l10)")


def test_a_hub_students_license_is_fetched_when_the_run_ends_online(tmp_path, monkeypatch):
    """Not in the hub cache: fetched (stubbed here) unless the hub is switched off."""
    import huggingface_hub
    from huggingface_hub import constants

    card = tmp_path / "README.md"
    card.write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# SmolLM\n")
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *a, **k: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, name, **k: asked.append(repo) or str(card))
    assert run_facts("Some/Student", None, None, spec(), False)["license"] is None  # HF_HUB_OFFLINE=1: not asked
    assert asked == []
    monkeypatch.setattr(constants, "is_offline_mode", lambda: False)
    assert run_facts("Some/Student", None, None, spec(), False)["license"] == "apache-2.0"
    assert asked == ["Some/Student"]
