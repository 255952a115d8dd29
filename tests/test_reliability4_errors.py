"""Reliability, round 4 (part 2): documented input accepted (``work:`` paths on the command line,
parquet files mixing chat layouts) and one-line errors instead of tracebacks (prune-teacher's
``--out`` under a file, an unusable work folder, bad ``config.json`` values for doctor, quality
parts that cannot be read or pooled, a refused ``cache.overwrite`` that used to read the whole
source first). Every refusal is one ``error:`` line, exit 2, and leaves nothing behind."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, stage1_overrides
from pipeline.config import DataConfig
from pipeline.errors import DataError
from test_bad_input import assert_refused, finished_run, run  # noqa: F401  (finished_run: a fixture)

# -- documented input accepted -----------------------------------------------------------------------


def test_work_paths_are_resolved_on_the_command_line(capsys, finished_run, tiny_cache, tmp_path, monkeypatch):
    """The seed config's header says ``resume work:runs/NAME/checkpoints/step-N``."""
    work = tmp_path / "work"
    shutil.copytree(finished_run, work / "runs" / "done")
    monkeypatch.setenv("KD_PIPELINE_WORK_DIR", str(work))
    code, err = run(capsys, "resume", "work:runs/done/checkpoints/step-00000002", "run.runs_dir=work:runs",
                    "train.steps=3")
    assert code == 0, err
    assert (work / "runs" / "done" / "checkpoints" / "step-00000003").is_dir()
    shutil.copytree(tiny_cache, work / "cache")
    code, err = run(capsys, "inspect", "work:cache", "--json")
    assert code == 0, err
    # A work folder that cannot be made: one line naming it.
    monkeypatch.setenv("KD_PIPELINE_WORK_DIR", "/proc/nonexist")
    assert_refused(capsys, ["inspect", "work:cache"], r"work folder /proc/nonexist .*cannot be used")
    assert_refused(capsys, ["show-config", "cache.dir=work:caches/x"], r"work folder /proc/nonexist .*cannot be used")


def write_parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), path)


def test_parquet_may_mix_chat_layouts_and_a_null_text_is_refused(tmp_path):
    from stage1_teacher_cache.chat import as_messages
    from stage1_teacher_cache.sources import Source

    mixed = tmp_path / "mixed.parquet"
    write_parquet(mixed, [
        {"messages": [{"role": "user", "content": "Hail?"}, {"role": "assistant", "content": "Hail."}],
         "prompt": None, "completion": None},
        {"messages": None, "prompt": "Say hello.", "completion": "Hello."}])
    rows = list(Source(DataConfig(source=str(mixed), format="chat")))
    assert [as_messages(r, name)[-1]["content"] for name, r in rows] == ["Hail.", "Hello."]
    nulls = tmp_path / "nulls.parquet"
    write_parquet(nulls, [{"text": "To be."}, {"text": None}, {"text": "Or not."}])
    with pytest.raises(DataError, match=r"nulls.parquet row 1 has 'text' = null, not a string"):
        list(Source(DataConfig(source=str(nulls))))


def test_chat_format_on_plain_text_files_is_refused(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    argv = ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c", **{"data.format": "chat"})]
    assert_refused(capsys, argv, r"data.format=chat, but .*\.txt is a \.txt file")
    assert not (tmp_path / "c").exists() and not (tmp_path / ".c.plan").exists()


# -- one-line errors -----------------------------------------------------------------------------------


def test_prune_teacher_out_under_a_file_is_refused_before_loading(capsys, tiny_teacher_dir, corpus_dir, tmp_path,
                                                                  monkeypatch):
    from stage1_teacher_cache import prune

    monkeypatch.setattr(prune, "load_model", lambda *a: pytest.fail("the teacher was loaded"))
    (tmp_path / "afile").write_text("mine")
    argv = ["prune-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c"),
            "--out", tmp_path / "afile" / "sub"]
    assert_refused(capsys, argv, r"--out .*afile/sub cannot be made: .*afile is a file", tmp_path)


@pytest.mark.parametrize("change, says", [
    ({"hidden_size": 0}, r"hidden_size = 0; it must be at least 1"),
    ({"num_hidden_layers": -30}, r"num_hidden_layers = -30; it must be at least 1"),
    ({"hidden_size": "576"}, r"hidden_size = '576', not a whole number"),
    ({"num_key_value_heads": 4}, r"num_attention_heads = 9, not a multiple of num_key_value_heads = 4"),
    ({"hidden_size": 577, "head_dim": None}, r"hidden_size = 577, not divisible by num_attention_heads = 9"),
    (None, r"has no vocab_size"),
])
def test_doctor_refuses_invalid_model_configs(capsys, tmp_path, change, says):
    base = json.loads((REPO / "configs" / "hf" / "HuggingFaceTB--SmolLM-135M" / "config.json").read_text())
    raw = {"model_type": "llama"} if change is None else {**base, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert_refused(capsys, ["doctor", "--config", REPO / "configs" / "default.toml", "--device-memory", "16GiB",
                            "--teacher-config", tmp_path / "config.json"], says)


def quality_part(folder: Path, lr: str = "0.01", seed: int = 0) -> Path:
    folder.mkdir(parents=True)
    row = {"ppl": 100.0, "ce": 4.6, "ece": 0.1, "positions": 10}
    (folder / "results.json").write_text(json.dumps({
        "setting": "dev", "seeds": [seed], "per_seed": {"none": {str(seed): row}, "online": {str(seed): row}},
        "step_s": {"none": [0.1], "online": [0.2]}, "times": {}, "facts": {"top_k": 8}, "gradient_fidelity": {},
        "equal_wall": None,
        "commands": [f"python -m pipeline quality --setting dev --seeds {seed} --out {folder} train.lr={lr} "
                     f"run.runs_dir=runs/q{seed}"]}))
    return folder


def test_quality_merge_refuses_unreadable_or_mismatched_parts(capsys, tmp_path):
    out = tmp_path / "merged"
    empty = tmp_path / "empty"
    empty.mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "results.json").write_text("{not json")
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "results.json").write_text("{}")
    a, b = quality_part(tmp_path / "a", seed=0), quality_part(tmp_path / "b", lr="0.5", seed=1)
    for merge, says in ((tmp_path / "missing", "missing/results.json does not exist"), (empty, "results.json does not exist"),
                        (bad, "is not readable JSON"), (blank, "not the results of a finished quality run"),
                        (f"{a},{b}", r"ran with other options .*train.lr: 0.01 vs 0.5")):
        assert_refused(capsys, ["quality", "--merge", merge, "--out", out], says)
        assert not out.exists(), "--out was made for a refused merge"
    for folder, says in ((bad, "is not readable JSON"), (blank, "not the results of a finished quality run")):
        assert_refused(capsys, ["quality", "--fidelity-only", "--out", folder], says, folder)


def test_quality_merge_pools_parts_that_differ_only_in_the_seed_and_where_they_ran(tmp_path):
    from bench.quality_merge import load_parts

    a, b = quality_part(tmp_path / "a", seed=0), quality_part(tmp_path / "b", seed=1)
    assert [p["seeds"] for p in load_parts([str(a), str(b)])] == [[0], [1]]


def test_a_refused_overwrite_reads_no_source_and_leaves_no_plan(capsys, tiny_teacher_dir, corpus_dir, tmp_path,
                                                                monkeypatch):
    from stage1_teacher_cache.sources import Source

    monkeypatch.setattr(Source, "__iter__", lambda self: pytest.fail("the data source was read"))
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("years of work")
    argv = ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, folder, **{"cache.overwrite": True})]
    assert_refused(capsys, argv, r"is not a cache of this tool .*only replaces caches", tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
