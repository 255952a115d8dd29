"""Reliability, round 4 (part 1): nothing the tool did not make is deleted (a GPU bundle rebuilt
over user files, prune-teacher beside cache-teacher), no silent wrong numbers (chat eval over
batches without targets, chat splits without an assistant token, checksums removed from a
checkpoint or manifest, zero prune sizes, a cross-tokenizer chat student that cannot stop) and
bounded time (chat rendering linear in the turns, by counting rendered messages, not seconds).
Part 2, the documented inputs and one-line errors: ``test_reliability4_errors.py``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import CHAT_ROWS, stage1_overrides, stage2_overrides
from pipeline.errors import DataError, PipelineError
from test_bad_input import assert_refused, finished_run, run  # noqa: F401  (finished_run: a fixture)


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- nothing the tool did not make is deleted ----------------------------------------------------


@pytest.fixture
def fake_bundle(monkeypatch, tmp_path):
    """bench.bundle with its slow parts (pip, tokenizers) writing small stand-ins; returns the argv."""
    from bench import bundle

    def wheels(dest, _pyver):
        dest.mkdir(parents=True)
        (dest / "zarr-3-py3-none-any.whl").write_bytes(b"wheel")
        return ["zarr==3"]

    def tokenizers(dest):
        (dest / "qwen").mkdir(parents=True)
        (dest / "qwen" / "tokenizer.json").write_text("{}")
        return {"qwen": 1}

    monkeypatch.setattr(bundle, "download_wheels", wheels)
    monkeypatch.setattr(bundle, "unmet_requirements", lambda *a: [])
    monkeypatch.setattr(bundle, "build_project_wheel", lambda dest: (dest / "kd_pipeline-0-py3-none-any.whl").write_bytes(b"p"))
    monkeypatch.setattr(bundle, "save_tokenizers", tokenizers)
    text = tmp_path / "plays"
    text.mkdir()
    (text / "hamlet_gut.txt").write_text("To be.\n")
    return lambda out: ["--local", "--out", str(out), "--text", str(text), "--plays", "1"]


def test_a_bundle_rebuild_replaces_only_what_the_bundle_wrote(fake_bundle, monkeypatch, tmp_path, capsys):
    from bench import bundle

    out = tmp_path / "gpu-bundle"
    assert bundle.main(fake_bundle(out)) == 0
    (out / "MY-NOTES.txt").write_text("results of the last GPU run")
    (out / "wheels" / "extra.whl").write_bytes(b"mine")
    assert bundle.main(fake_bundle(out)) == 0
    assert (out / "MY-NOTES.txt").read_text() == "results of the last GPU run"
    assert (out / "wheels" / "extra.whl").read_bytes() == b"mine"
    assert "MY-NOTES.txt" not in json.loads((out / "MANIFEST.json").read_text())["files"]
    # A build that fails changes nothing and leaves nothing beside.
    before = tree(out)
    monkeypatch.setattr(bundle, "save_tokenizers", lambda dest: (_ for _ in ()).throw(PipelineError("no tokenizer")))
    assert bundle.main(fake_bundle(out)) == 2
    assert tree(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["gpu-bundle", "plays"]
    # Any folder that merely holds a MANIFEST.json is not a bundle: refused, untouched.
    other = tmp_path / "webapp"
    other.mkdir()
    (other / "MANIFEST.json").write_text('{"name": "my app"}')
    (other / "index.html").write_text("<html>")
    before = tree(other)
    capsys.readouterr()
    assert bundle.main(fake_bundle(other)) == 2
    assert "is not a bundle" in capsys.readouterr().err and tree(other) == before


def test_prune_teacher_plans_in_its_own_place_and_refuses_zero_sizes(capsys, tiny_teacher_dir, corpus_dir,
                                                                       tmp_path, monkeypatch):
    """The cache's plan folder belongs to cache-teacher (which may be running): prune-teacher
    neither writes nor reads it. ``--layers 0`` used to mean "all layers" (exit 0)."""
    cache = tmp_path / "c" / "cache"
    args = ["prune-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, cache), "--calibration", "2"]
    for flag in ("--layers", "--hidden-size", "--intermediate-size"):
        assert_refused(capsys, [*args, flag, "0", "--out", tmp_path / "p0"], rf"{flag} 0: a size must be at least 1")
        assert not (tmp_path / "p0").exists()
    code, err = run(capsys, *args, "--layers", "1", "--out", tmp_path / "pruned")
    assert code == 0, err
    assert (tmp_path / "pruned" / "config.json").is_file()
    assert not (tmp_path / "c").exists() or not any((tmp_path / "c").iterdir()), "the cache's plan folder was made"


# -- no silent wrong numbers: chat -----------------------------------------------------------------


def masked_loader(chat_cache, keep: set[int]):
    """(access, student): the chat cache's loader with the targets of every sequence outside
    ``keep`` masked out (as a batch of held-out sequences with no assistant token)."""
    from pipeline.cache import CacheReader
    from pipeline.config import load_config
    from stage2_student_train.data import data_access
    from stage2_student_train.student import build_student, load_student_tokenizer

    reader = CacheReader(chat_cache)
    cfg = load_config(None, stage2_overrides(chat_cache, Path("unused"), "x"))
    tok, same = load_student_tokenizer(cfg, reader)
    access = data_access(reader, tok, same, need_hidden=False)
    torch.manual_seed(0)
    student = build_student(cfg, max(len(tok), reader.spec.vocab_size), access.seq_len)

    def load(ids):
        batch = access.load(ids)
        for row, i in enumerate(ids):
            if int(i) not in keep:
                batch["loss_mask"][row] = False
        return batch

    return reader, access, student, load


def test_chat_eval_does_not_depend_on_the_batch_size(chat_cache):
    from stage2_student_train.evaluate import evaluate

    reader, access, student, _ = masked_loader(chat_cache, set())
    ids = list(range(reader.spec.num_sequences))
    assert len(ids) >= 4
    _, _, _, load = masked_loader(chat_cache, set(ids[::3]))
    off = torch.autocast("cpu", enabled=False)
    results = [evaluate(student, load, access.target_bytes, ids, b, 64, off) for b in (1, 2, len(ids))]
    assert len({r["positions"] for r in results}) == 1
    for r in results[1:]:
        assert r["ce"] == pytest.approx(results[0]["ce"], rel=1e-5)
    # Nothing at all to count: one line, not a CE of 0 (or a ZeroDivisionError).
    _, _, _, none = masked_loader(chat_cache, set())
    with pytest.raises(DataError, match="hold no target token"):
        evaluate(student, none, access.target_bytes, ids, 2, 64, off)


def test_a_held_out_split_without_assistant_tokens_is_refused_at_stage1(capsys, chat_teacher_dir, tmp_path):
    """The held-out conversation's reply falls in the dropped last partial sequence: its only
    eval sequence holds the prompt alone."""
    data = tmp_path / "chat"
    data.mkdir()
    rows = CHAT_ROWS + [{"messages": [{"role": "user", "content": "word " * 5},
                                      {"role": "assistant", "content": "Yes."}]}]
    (data / "talk.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cache = tmp_path / "cache"
    argv = ["cache-teacher", *stage1_overrides(chat_teacher_dir, data, cache,
                                               **{"data.eval_documents": [f"talk.jsonl-{len(rows) - 1}"]})]
    assert_refused(capsys, argv, r"the eval sequences hold no assistant \(completion\) token")
    assert not cache.exists()


def test_training_on_a_split_without_targets_is_refused(capsys, chat_cache, tmp_path):
    """A cache (of an older version) whose train split has no assistant token: every step would
    have loss 0 and gradient 0 and the run would exit 0."""
    copy = tmp_path / "cache"
    shutil.copytree(chat_cache, copy)
    for marker in (copy / "done").glob("shard-*.json"):
        obj = json.loads(marker.read_text())
        if "train_masked_targets" in obj["stats"]:
            obj["stats"]["train_masked_targets"] = 0.0
        marker.write_text(json.dumps(obj))
    argv = ["train-student", *stage2_overrides(copy, tmp_path / "runs", "r", **{"train.steps": 1,
                                                                                "train.warmup_steps": 0})]
    assert_refused(capsys, argv, r"train sequences hold no assistant \(completion\) token")
    assert not (tmp_path / "runs" / "r").exists()


def test_a_cross_tokenizer_chat_student_can_stop_at_the_end_of_a_turn(capsys, chat_cache, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    argv = ["train-student", *stage2_overrides(chat_cache, tmp_path / "runs", "x", **{
        "student.tokenizer": "embedded:gpt2", "kd.mode": "mapped", "train.steps": 1, "train.warmup_steps": 0,
        "train.eval_every": 1, "train.save_every": 1})]
    code, err = run(capsys, *argv)
    assert code == 0, err
    student = tmp_path / "runs" / "x" / "final" / "student"
    tok = AutoTokenizer.from_pretrained(student)
    ids = tok.encode("<|im_end|>", add_special_tokens=False)
    assert len(ids) == 1, "the end-of-turn marker is not one token of the student's own tokenizer"
    stops = GenerationConfig.from_pretrained(student).eos_token_id
    assert ids[0] in (stops if isinstance(stops, list) else [stops])
    assert tok.eos_token_id in (stops if isinstance(stops, list) else [stops])  # eos still stops too


# -- no silent wrong numbers: checksums --------------------------------------------------------------


def test_a_checkpoint_with_checksums_must_carry_them_whole(finished_run, tmp_path):
    from stage2_student_train.checkpoint import CheckpointError, load_state

    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "done")
    ckpt = runs / "done" / "checkpoints" / "step-00000002"
    weights = ckpt / "student" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-7] ^= 0x01
    weights.write_bytes(bytes(data))
    saved = json.loads((ckpt / "checksums.json").read_text())
    cases = {"emptied": {"files": {}},
             "missing its entry": {"files": {k: v for k, v in saved["files"].items() if k != "student/model.safetensors"}}}
    for what, content in cases.items():
        (ckpt / "checksums.json").write_text(json.dumps(content))
        with pytest.raises(CheckpointError, match=r"has no entry in checksums.json"):
            load_state(ckpt)
    (ckpt / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match=r"was written with checksums.json, which is gone"):
        load_state(ckpt)


def test_a_manifest_with_a_cache_id_must_carry_its_digest(capsys, tiny_cache, tmp_path):
    from pipeline.cache.verify import verify_cache

    copy = tmp_path / "cache"
    shutil.copytree(tiny_cache, copy)
    m = copy / "manifest.json"
    obj = json.loads(m.read_text())
    assert "cache_id" in obj and "digest" in obj
    text = json.dumps(obj["spec"]["splits"])
    obj["spec"]["splits"] = json.loads(text.replace("2", "3", 1))  # one digit of a split boundary
    del obj["digest"]
    m.write_text(json.dumps(obj))
    report = verify_cache(copy)
    assert not report.ok and any("lost its digest" in line for line in report.damaged)
    assert_refused(capsys, ["inspect", copy], r"manifest.json has lost its digest", copy)


# -- bounded time ------------------------------------------------------------------------------------


class CountingTokenizer:
    """The SmolLM2 tokenizer, counting the messages it renders (the work a render does)."""

    def __init__(self, tok):
        self.tok, self.chat_template, self.messages = tok, tok.chat_template, 0

    def apply_chat_template(self, turns, **kw):
        self.messages += len(turns)
        return self.tok.apply_chat_template(turns, **kw)


def conversation(turns: int) -> list[dict[str, str]]:
    rng = np.random.default_rng(turns)
    words = ["my", "lord", "café", "  spaced ", "\n", "naïve"]
    return [{"role": ("user", "assistant")[i % 2], "content": " ".join(rng.choice(words, rng.integers(0, 8)))}
            for i in range(turns)]


def test_chat_rendering_is_linear_in_the_turns(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    from stage1_teacher_cache.chat import render

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    counts = {}
    for turns in (250, 1000):
        counting = CountingTokenizer(tok)
        render(counting, conversation(turns), "row")
        counts[turns] = counting.messages
    assert counts[1000] / counts[250] < 6, counts  # linear: ~4; every prefix rendered: ~16
    # The spans are those of rendering every prefix.
    messages = conversation(41)
    text, spans = render(tok, messages, "row")
    exact = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            exact.append((len(tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)),
                          len(tok.apply_chat_template(messages[:i + 1], tokenize=False))))
    assert text == tok.apply_chat_template(messages, tokenize=False) and list(spans) == exact


def test_a_template_that_rewrites_contents_still_gets_exact_spans(smollm2_tokenizer_dir):
    """A template that trims contents defeats the marked render: every prefix is rendered then."""
    from transformers import AutoTokenizer

    from stage1_teacher_cache.chat import render

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tok.chat_template = tok.chat_template.replace("message['content'] +", "(message['content'] | trim) +")
    messages = conversation(9)
    text, spans = render(tok, messages, "row")
    assert [text[a:b] for a, b in spans] == [m["content"].strip() + "<|im_end|>\n"
                                             for m in messages if m["role"] == "assistant"]
