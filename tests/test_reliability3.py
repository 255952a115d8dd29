"""Reliability, round 3: nothing the tool did not make is deleted (plan folders and caches with
hidden user files, object-store prefixes without this tool's marker, links to run and cache
directories), nothing is silently different (an edited manifest, a damaged checkpoint, a cache
replaced under a trainer, JSON rows without text, non-finite config numbers, a damaged documents
table healed by the advised rerun), and the remaining faults are one-line errors that leave
nothing behind. No test waits on a clock: faults are injected at the step where they matter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import stage1_overrides, stage2_overrides
from pipeline.cache import CacheReader
from pipeline.cache.files import MANIFEST, write_json
from pipeline.cache.store import open_storage
from pipeline.cache.verify import verify_cache
from pipeline.errors import CacheError, ConfigError
from test_bad_input import assert_refused, run, snapshot


def stage1(teacher: Path, corpus: Path, cache, **extra) -> list[str]:
    return ["cache-teacher", *stage1_overrides(teacher, corpus, cache, **extra)]


def train_args(cache, runs, name="r", **extra) -> list[str]:
    return ["train-student", *stage2_overrides(cache, runs, name, **{"train.steps": 2, "train.warmup_steps": 0,
                                                                      **extra})]


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (hidden ones included), by relative path."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def user_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / ".env").write_text("SECRET=1\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    return root


@pytest.fixture
def cache_copy(tiny_cache, tmp_path) -> Path:
    out = tmp_path / "copy" / "cache"
    shutil.copytree(tiny_cache, out)
    return out


TINY_CACHE_EXTRA = {"cache.store_head": True}  # how conftest's tiny_cache was built


# -- nothing the tool did not make is deleted ----------------------------------------------------


def test_a_plan_dir_of_hidden_user_files_is_never_deleted(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    from stage1_teacher_cache.plan_store import remove_plan

    folder = user_folder(tmp_path / "project")
    before = tree(folder)
    assert_refused(capsys, stage1(tiny_teacher_dir, corpus_dir, tmp_path / "c", **{"cache.plan_dir": str(folder)}),
                   r"plan folder .*project holds '\.env', which no plan holds", folder)
    assert tree(folder) == before and not (tmp_path / "c").exists()
    # A file named as the plan folder: one line, the file untouched.
    (tmp_path / "plan-file").write_text("mine")
    assert_refused(capsys, stage1(tiny_teacher_dir, corpus_dir, tmp_path / "c",
                                  **{"cache.plan_dir": str(tmp_path / "plan-file")}),
                   r"plan folder .*plan-file is a file", tmp_path / "plan-file")
    assert (tmp_path / "plan-file").read_text() == "mine"
    # What the tool wrote (plan files and their temp files) is removed, the folder with them.
    plan = tmp_path / "plan"
    plan.mkdir()
    for name in ("plan.json", "train.arrow", ".plan.json.tmp4242"):
        (plan / name).write_text("x")
    remove_plan(plan)
    assert not plan.exists()


def test_overwrite_refuses_a_cache_holding_hidden_user_files(capsys, cache_copy, tiny_teacher_dir, corpus_dir):
    from pipeline.cache.files import not_a_cache_reason

    (cache_copy / ".git").mkdir()
    (cache_copy / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (cache_copy / "meta" / ".notes").write_text("my notes\n")
    assert_refused(capsys, stage1(tiny_teacher_dir, corpus_dir, cache_copy, **{"cache.overwrite": True,
                                                                                "cache.top_k": 4}),
                   r"is not a cache of this tool \(it holds '\.git'.*only replaces caches", cache_copy)
    assert (cache_copy / ".git" / "HEAD").is_file() and (cache_copy / "meta" / ".notes").is_file()
    shutil.rmtree(cache_copy / ".git")
    assert "meta/.notes" in not_a_cache_reason(open_storage(cache_copy))
    # The tool's own temp files (a write a kill cut short) do not make a cache foreign.
    (cache_copy / "meta" / ".notes").unlink()
    (cache_copy / ".manifest.json.tmp4242").write_text("{")
    (cache_copy / "done" / ".shard-00001.json.tmp77").write_text("{")
    assert not_a_cache_reason(open_storage(cache_copy)) is None
@pytest.mark.slow
def test_an_object_store_prefix_is_an_interrupted_creation_only_by_the_tools_marker(
        capsys, tiny_teacher_dir, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    for i, folder in enumerate(("meta", "tokenizer", "arrays.zarr")):
        store = open_storage(f"memory://kd-r3/user-{i}")
        store.write_bytes(f"{folder}/notes.txt", b"years of work")
        assert_refused(capsys, stage1(tiny_teacher_dir, corpus_dir, store.url),
                       r"exists, is not empty and holds no cache manifest")
        assert store.read_bytes(f"{folder}/notes.txt") == b"years of work"
    # What this tool's interrupted creation leaves (its marker first, a partial skeleton) is started over.
    from pipeline.cache.files import CREATING, mark_creation

    half = open_storage("memory://kd-r3/half")
    mark_creation(half)
    half.write_bytes("arrays.zarr/zarr.json", b"{}")
    code, err = run(capsys, *stage1(tiny_teacher_dir, corpus_dir, half.url))
    assert code == 0, err
    assert CacheReader(half.url).complete and not half.exists(CREATING)
@pytest.mark.slow
def test_a_cache_dir_that_is_a_link_is_replaced_through_the_link(capsys, tiny_cache, tiny_teacher_dir,
                                                                 corpus_dir, tmp_path):
    real = tmp_path / "disk" / "cache"
    real.parent.mkdir()
    shutil.copytree(tiny_cache, real)
    link = tmp_path / "work" / "cache"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    code, err = run(capsys, *stage1(tiny_teacher_dir, corpus_dir, link, **{"cache.overwrite": True,
                                                                           "cache.top_k": 4}))
    assert code == 0, err
    assert link.is_symlink() and link.resolve() == real.resolve()
    assert CacheReader(link).spec.top_k == 4 and CacheReader(real).spec.top_k == 4
    leftovers = [p.name for d in (link.parent, real.parent) for p in d.iterdir() if p.name.startswith(".cache.")]
    assert all(n.endswith(".lock") for n in leftovers), leftovers
    # A link to an empty folder: the cache is created in the folder it names.
    empty = tmp_path / "disk" / "empty"
    empty.mkdir()
    link2 = tmp_path / "work" / "new"
    link2.symlink_to(empty, target_is_directory=True)
    code, err = run(capsys, *stage1(tiny_teacher_dir, corpus_dir, link2))
    assert code == 0, err
    assert link2.is_symlink() and CacheReader(empty).complete


def test_a_run_dir_that_is_a_link_is_replaced_through_the_link(tiny_cache, tmp_path):
    from pipeline.config import load_config
    from stage2_student_train.rundir import RUN_MARKER, prepare_run_dir, remove_leftovers

    real = tmp_path / "disk" / "r"
    real.mkdir(parents=True)
    (real / RUN_MARKER).write_text(json.dumps({"tool": "kd-pipeline", "kind": "student-run"}))
    (real / "summary.json").write_text("{}")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "r").symlink_to(real, target_is_directory=True)
    cfg = load_config(None, stage2_overrides(tiny_cache, runs, "r", **{"train.overwrite": True}))
    prepare_run_dir(runs / "r", cfg)
    assert (runs / "r").is_symlink() and (runs / "r").resolve() == real.resolve()
    assert not (real / "summary.json").exists() and (real / "config.toml").is_file()
    assert sorted(p.name for p in runs.iterdir()) == ["r"]
    assert not [p for p in real.parent.iterdir() if ".deleting-" in p.name]
    # A link left renamed aside by an older version is removed, not followed.
    (runs / ".x.deleting-1").symlink_to(real, target_is_directory=True)
    remove_leftovers(runs)
    assert not (runs / ".x.deleting-1").is_symlink() and (real / "config.toml").is_file()


# -- nothing is silently different ----------------------------------------------------------------


def test_an_edited_manifest_is_caught_by_verify_and_on_open(capsys, cache_copy, tmp_path):
    manifest = json.loads((cache_copy / MANIFEST).read_text())
    (a, b), = manifest["spec"]["splits"]["train"]
    manifest["spec"]["splits"]["train"] = [[a, b + 1]]  # one held-out sequence moved into train
    manifest["spec"]["splits"]["eval"] = [[b + 1, s] for _, s in manifest["spec"]["splits"]["eval"]]
    (cache_copy / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    report = verify_cache(cache_copy)
    assert not report.ok and report.damaged[0].startswith("manifest.json was changed"), report.damaged
    assert_refused(capsys, ["inspect", cache_copy, "--verify"], r"damaged.*manifest.json was changed")
    with pytest.raises(CacheError, match="manifest.json was changed after this tool wrote it"):
        CacheReader(cache_copy)
    assert_refused(capsys, train_args(cache_copy, tmp_path / "runs"), r"manifest.json was changed")
    assert not (tmp_path / "runs" / "r").exists()


@pytest.fixture(scope="module")
def two_step_run(tiny_cache, tmp_path_factory) -> Path:
    """A finished 2-step run (checkpoint at step 2, exported student)."""
    from pipeline.cli import main as cli_main

    runs = tmp_path_factory.mktemp("r3-runs")
    assert cli_main([str(a) for a in train_args(tiny_cache, runs, "done", **{"train.save_every": 2})]) == 0
    return runs / "done"


@pytest.mark.slow
@pytest.mark.parametrize("victim", ["student/model.safetensors", "state.pt"])
def test_a_flipped_byte_in_a_checkpoint_is_refused_naming_the_file(capsys, two_step_run, tmp_path, victim):
    run_dir = tmp_path / "runs" / "done"
    shutil.copytree(two_step_run, run_dir)
    ckpt = run_dir / "checkpoints" / "step-00000002"
    assert (ckpt / "checksums.json").is_file()
    path = ckpt / victim
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x10  # in the tensor data: torch/safetensors still load it
    path.write_bytes(bytes(data))
    assert_refused(capsys, ["resume", ckpt, f"run.runs_dir={tmp_path / 'runs'}", "train.steps=3"],
                   rf"checkpoint .*step-00000002 is damaged \({victim} differs from what was saved.*pick an older", run_dir)
@pytest.mark.slow
def test_a_trainer_stops_when_its_cache_is_replaced(capsys, cache_copy, tmp_path, monkeypatch):
    import stage2_student_train.train as train_module

    replacement = tmp_path / "rebuilt"
    shutil.copytree(cache_copy, replacement)  # another build of the same config: same fingerprint, new id
    manifest = json.loads((replacement / MANIFEST).read_text())
    write_json(open_storage(replacement), MANIFEST, {**manifest, "cache_id": "another-build"})
    real = train_module.maybe_save

    def save_then_replace(setup, state, stop_at):
        out = real(setup, state, stop_at)
        if out is not None and state.step == 2:  # the first checkpoint is written: swap the cache
            shutil.rmtree(cache_copy)
            shutil.copytree(replacement, cache_copy)
        return out

    monkeypatch.setattr(train_module, "maybe_save", save_then_replace)
    runs = tmp_path / "runs"
    code, err = run(capsys, *train_args(cache_copy, runs, "r", **{"train.steps": 6, "train.eval_every": 3}))
    assert code == 2 and err.splitlines()[-1].startswith("error: cache "), err
    assert "was replaced while this run trained from it" in err.splitlines()[-1]
    assert not (runs / "r" / "final").exists() and not (runs / "r" / "summary.json").exists()
    # Removed instead of replaced: named as well.
    monkeypatch.setattr(train_module, "maybe_save", lambda setup, state, stop_at: (
        shutil.rmtree(cache_copy) if state.step == 2 and cache_copy.exists() else None) or real(setup, state, stop_at))
    code, err = run(capsys, *train_args(cache_copy, runs, "r2", **{"train.steps": 6, "train.eval_every": 3}))
    assert code == 2 and "was removed or damaged while this run trained from it" in err.splitlines()[-1], err


@pytest.mark.parametrize("row, named", [('{"text": null}', "has 'text' = null"), ('{"text": 3}', "has 'text' = 3"),
                                        ('{"text": ["a", "b"]}', r"has 'text' = \[\"a\", \"b\"\]"),
                                        ('{"title": "x"}', "has no 'text'")])
def test_jsonl_rows_without_text_are_named(capsys, tiny_teacher_dir, tmp_path, row, named):
    data = tmp_path / "data.jsonl"
    good = json.dumps({"text": "To be, or not to be, that is the question. " * 20})
    data.write_text("\n".join([good, good, row, good]) + "\n")
    assert_refused(capsys, stage1(tiny_teacher_dir, data, tmp_path / "c", **{"data.eval_documents": [],
                                                                             "data.eval_fraction": 0.3}),
                   rf"data.jsonl line 3 {named}.*fix or remove that row", tmp_path)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("override", ["train.lr=inf", "kd.temperature=inf", "train.lr=nan", "kd.weight=-inf",
                                      "data.eval_fraction=nan", "run.seed=-1"])
def test_non_finite_numbers_and_a_negative_seed_are_config_errors(capsys, override):
    key = override.split("=")[0]
    assert_refused(capsys, ["show-config", override], rf"config key '{key}' must be")


def test_an_export_never_holds_non_finite_weights():
    from transformers import LlamaConfig, LlamaForCausalLM

    from stage2_student_train.step import TrainingError
    from stage2_student_train.train import require_finite

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    require_finite(model)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[3, 5] = float("nan")
    with pytest.raises(TrainingError, match=r"NaN/Inf \(1 tensors, first: model.layers.0.mlp.up_proj.weight\)"):
        require_finite(model)
@pytest.mark.slow
def test_a_damaged_documents_table_is_healed_by_the_advised_rerun(capsys, cache_copy, tiny_teacher_dir, corpus_dir):
    docs = cache_copy / "meta" / "documents.arrow"
    good = docs.read_bytes()
    data = bytearray(good)
    data[len(data) // 2] ^= 0xFF
    docs.write_bytes(bytes(data))
    report = verify_cache(cache_copy)
    assert [d for d in report.damaged if d.startswith("meta/documents.arrow") and "rerun cache-teacher" in d]
    code, err = run(capsys, *stage1(tiny_teacher_dir, corpus_dir, cache_copy, **TINY_CACHE_EXTRA))
    assert code == 0, err
    assert verify_cache(cache_copy).ok and docs.read_bytes() == good


# -- one-line errors, nothing left behind ----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["safetensors", "torch.save"])
def test_a_full_disk_while_saving_a_checkpoint_is_one_line(capsys, tiny_cache, tmp_path, monkeypatch, failing):
    """The errors safetensors (Rust) and torch.save really raise on ENOSPC: not ``OSError``."""
    import transformers.modeling_utils as modeling_utils
    from safetensors import SafetensorError

    calls = []
    if failing == "safetensors":
        real = modeling_utils.safe_save_file

        def full(*args, **kw):
            calls.append(1)
            if len(calls) == 2:  # the checkpoint of step 4
                raise SafetensorError('Error while serializing: I/O error: No space left on device (os error 28)')
            return real(*args, **kw)

        monkeypatch.setattr(modeling_utils, "safe_save_file", full)
    else:
        real = torch.save

        def full(obj, f, *args, **kw):
            calls.append(1)
            if len(calls) == 2:
                raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                                   "file data/12: file write failed")
            return real(obj, f, *args, **kw)

        monkeypatch.setattr(torch, "save", full)
    runs = tmp_path / "runs"
    code, err = run(capsys, *train_args(tiny_cache, runs, "r",
                                        **{"train.steps": 6, "train.save_every": 2}))
    last = err.splitlines()[-1]
    assert code == 2 and last.startswith("error: could not write the checkpoint of step 4"), err
    assert "Traceback" not in err
    if failing == "safetensors":
        assert "the disk is full" in last
    assert not list((runs / "r" / "checkpoints").glob(".*"))  # no temp directory left
    assert (runs / "r" / "LATEST").read_text().strip() == "checkpoints/step-00000002"


def test_paths_whose_parent_is_a_file_are_one_line(capsys, tiny_cache, tiny_teacher_dir, corpus_dir, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.write_text("mine")
    assert_refused(capsys, train_args(tiny_cache, blocker / "runs"), r"run.runs_dir .*blocker is a file", tmp_path)
    assert_refused(capsys, train_args(tiny_cache, tmp_path / "runs", **{"cache.views_dir": str(blocker / "v")}),
                   r"cache.views_dir .*blocker is a file", tmp_path)
    assert_refused(capsys, stage1(tiny_teacher_dir, corpus_dir, blocker / "cache"),
                   r"cache.dir .*blocker is a file", tmp_path)
    assert blocker.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["blocker"]
@pytest.mark.slow
def test_eval_of_a_truncated_export_is_one_line(capsys, two_step_run, tiny_cache, tmp_path):
    run_dir = tmp_path / "runs" / "done"
    shutil.copytree(two_step_run, run_dir)
    weights = run_dir / "final" / "student" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    argv = ["eval", *stage2_overrides(tiny_cache, tmp_path / "runs", "done")]
    assert_refused(capsys, argv, r"exported student in .*done/final/student is damaged or incomplete", run_dir)
@pytest.mark.slow
def test_a_run_interrupted_before_its_first_checkpoint_reruns_with_the_same_command(capsys, tiny_cache, tmp_path,
                                                                                     monkeypatch):
    """A second SIGINT acts at once (KeyboardInterrupt from the default handler): raised here at
    step 2, before any checkpoint; the advised "rerun the same command" must then work."""
    import stage2_student_train.train as train_module

    real = train_module.train_step

    def interrupted(state, *args, **kw):
        if state.step == 1:
            raise KeyboardInterrupt
        return real(state, *args, **kw)

    argv = train_args(tiny_cache, tmp_path / "runs", "r", **{"train.steps": 4, "train.save_every": 4})
    monkeypatch.setattr(train_module, "train_step", interrupted)
    code, err = run(capsys, *argv)
    assert code == 130 and "rerun the same command" in err.splitlines()[-1]
    assert not (tmp_path / "runs" / "r" / "checkpoints").exists()
    monkeypatch.setattr(train_module, "train_step", real)
    code, err = run(capsys, *argv)
    assert code == 0, err
    assert (tmp_path / "runs" / "r" / "final" / "student" / "model.safetensors").is_file()
@pytest.mark.slow
def test_an_interrupted_extension_is_to_be_finished_not_rebuilt(capsys, tiny_teacher_dir, corpus_dir, tmp_path,
                                                                 monkeypatch):
    from pipeline.cache import CacheWriter

    cache = tmp_path / "cache"
    small = {"data.max_train_tokens": 9 * 32}
    large = {"data.max_train_tokens": 20 * 32, "cache.extend": True}
    assert run(capsys, *stage1(tiny_teacher_dir, corpus_dir, cache, **small))[0] == 0
    before = json.loads((cache / MANIFEST).read_text())
    real = CacheWriter.write_shard

    def killed(self, *args, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(CacheWriter, "write_shard", killed)
    assert run(capsys, *stage1(tiny_teacher_dir, corpus_dir, cache, **large))[0] == 130
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    finish = r"finish it: rerun cache-teacher with the config of the extension \(cache.extend=true"
    assert_refused(capsys, train_args(cache, tmp_path / "runs"), rf"incomplete: an extension of it was interrupted.*{finish}")
    assert_refused(capsys, stage1(tiny_teacher_dir, corpus_dir, cache, **small), rf"interrupted.*{finish}", cache)
    # Killed after the arrays grew and before the manifest vouched for their new metadata.
    manifest = json.loads((cache / MANIFEST).read_text())
    stale = {rel: rec for rel, rec in before["files"].items() if rel.endswith("zarr.json")}
    write_json(open_storage(cache), MANIFEST, {**manifest, "files": {**manifest["files"], **stale}})
    assert_refused(capsys, train_args(cache, tmp_path / "runs"), rf"array metadata.*{finish}")
    assert any(finish.replace("\\", "")[:20] in d for d in verify_cache(cache).damaged)
    assert run(capsys, *stage1(tiny_teacher_dir, corpus_dir, cache, **large))[0] == 0
    assert CacheReader(cache).complete and verify_cache(cache).ok


# -- memory with one huge document --------------------------------------------------------------


def long_text() -> str:
    """Prose with lines, tabs, runs of spaces, CRLF, non-ASCII, and one unbroken run longer than a
    window (no clean cut there: the rest is tokenized whole)."""
    from conftest import CORPUS

    prose = "".join(CORPUS[k] for k in sorted(CORPUS))
    return prose * 4 + "Line one.\r\nLine two \u00e9t\u00e9.\r\n" * 40 + prose + "#" * 2500 + " tail words\n" + prose


@pytest.mark.parametrize("which", ["gpt2", "smollm2"])
def test_a_long_document_in_pieces_has_the_ids_of_the_whole(which, request):
    from transformers import AutoTokenizer

    from conftest import gpt2_tokenizer
    from stage1_teacher_cache.pieces import tokenize_pieces
    from stage1_teacher_cache.plan import tokenize_batch

    tok = gpt2_tokenizer() if which == "gpt2" else AutoTokenizer.from_pretrained(
        request.getfixturevalue("smollm2_tokenizer_dir"))
    text = long_text()
    whole_ids, whole_offsets = tokenize_batch(tok, [text])[0]
    for piece_chars, margin in ((1500, 150), (4000, 400)):
        parts = list(tokenize_pieces(tok, text, piece_chars, margin))
        assert len(parts) >= len(text) // piece_chars // 2, len(parts)  # it really was cut, many times
        assert np.array_equal(np.concatenate([p[0] for p in parts]), whole_ids)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), whole_offsets)


@pytest.mark.parametrize("max_train_tokens", [0, 40 * 32])
def test_a_long_document_packs_as_when_tokenized_whole(tmp_path, monkeypatch, max_train_tokens):
    from conftest import gpt2_tokenizer
    from stage1_teacher_cache import pieces
    from stage1_teacher_cache.documents import documents_of
    from stage1_teacher_cache.plan import build_plan

    tok = gpt2_tokenizer()
    docs = [("short.txt", "A short one.\n", "train"), ("long.txt", long_text(), "train"),
            ("after.txt", "And another document after it.\n" * 3, "train"), ("held.txt", long_text(), "eval")]

    def plan(folder: str):
        p = build_plan(documents_of(docs), tok, 32, tok.eos_token_id, "\n\n", {"train": max_train_tokens},
                       tmp_path / folder, 8, show_progress=False)
        return p.count, p.rows_of(0, p.num_sequences)

    monkeypatch.setattr(pieces, "PIECE_CHARS", 1 << 30)  # every document whole: the reference
    count, want = plan("whole")
    monkeypatch.setattr(pieces, "PIECE_CHARS", 1500)
    monkeypatch.setattr(pieces, "MARGIN", 150)
    assert plan("pieces")[0] == count
    got = plan("pieces2")[1]
    assert np.array_equal(got.input_ids, want.input_ids)
    assert got.text.to_pylist() == want.text.to_pylist() and got.char_end.to_pylist() == want.char_end.to_pylist()
    assert got.doc_id.to_pylist() == want.doc_id.to_pylist()


def test_a_long_chat_document_keeps_its_loss_mask_across_pieces(tmp_path, monkeypatch):
    # a chat document longer than a piece: its targets (character spans) give the same per-token
    # mask whether it is tokenized whole or in bounded pieces
    from conftest import gpt2_tokenizer
    from stage1_teacher_cache import pieces
    from stage1_teacher_cache.documents import Document
    from stage1_teacher_cache.plan import build_plan

    tok = gpt2_tokenizer()
    text = long_text()
    third = len(text) // 3
    spans = ((100, third), (third + 50, third + 700), (2 * third, len(text) - 10))
    docs = [Document(0, "talk", text, "train", spans), Document(1, "held", "Who's there? Nay, answer me.", "eval",
                                                              ((13, 28),))]

    def plan(folder: str):
        p = build_plan(iter(docs), tok, 32, tok.eos_token_id, "\n\n", {}, tmp_path / folder, 8, show_progress=False)
        return p.rows_of(0, p.num_sequences)

    monkeypatch.setattr(pieces, "PIECE_CHARS", 1 << 30)
    want = plan("whole")
    monkeypatch.setattr(pieces, "PIECE_CHARS", 1500)
    monkeypatch.setattr(pieces, "MARGIN", 150)
    got = plan("pieces")
    assert want.loss_mask is not None and 0 < want.loss_mask.mean() < 1  # a real mask, not all ones
    assert np.array_equal(got.input_ids, want.input_ids)
    assert np.array_equal(got.loss_mask, want.loss_mask)
