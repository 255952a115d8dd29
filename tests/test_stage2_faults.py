"""Stage 2 loses nothing under any flag or fault: overwrite only replaces this tool's runs, a
signal ends the run with a checkpoint and the resume command, a full disk while saving is one
line and leaves no temp directory, a resume changes only what it may, damaged inputs are named."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, stage2_overrides
from pipeline.tomlcompat import tomllib
from test_bad_input import assert_refused, run, snapshot, train_args

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

ENV = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def finished(tiny_cache, tmp_path_factory) -> Path:
    from pipeline.config import load_config
    from stage2_student_train.train import train

    runs = tmp_path_factory.mktemp("runs")
    train(load_config(None, stage2_overrides(tiny_cache, runs, "done", **{"train.steps": 4, "train.warmup_steps": 0})),
          show_progress=False)
    return runs / "done"


def copy_run(run_dir: Path, runs: Path) -> Path:
    shutil.copytree(run_dir, runs / run_dir.name)
    return runs / run_dir.name


# -- overwrite ----------------------------------------------------------------------------------


def test_overwrite_replaces_only_runs_this_tool_made(capsys, tiny_cache, tmp_path):
    runs = tmp_path / "runs"
    precious = runs / "r"
    precious.mkdir(parents=True)
    (precious / "thesis.tex").write_text("years of work")
    assert_refused(capsys, train_args(tiny_cache, runs, "r", **{"train.overwrite": True}),
                   r"is not a run directory of this tool .*only replaces runs it made", runs)
    # The cache itself, as a run directory: refused before anything is touched.
    assert_refused(capsys, train_args(tiny_cache, tiny_cache.parent, tiny_cache.name, **{"train.overwrite": True}),
                   r"and cache .* overlap", tiny_cache)
    for name in ("../escape", "/abs", "a/b", ".."):
        assert_refused(capsys, train_args(tiny_cache, runs, name, **{"train.overwrite": True}),
                       r"'run.name' must be a plain name", runs)
    (runs / "file").write_text("x")
    assert_refused(capsys, train_args(tiny_cache, runs, "file"), r"run directory .* is a file", runs)


def test_overwrite_of_a_run_and_its_leftovers(capsys, tiny_cache, finished, tmp_path):
    runs = tmp_path / "runs"
    mine = copy_run(finished, runs)
    # What a kill during an earlier overwrite leaves: the old run renamed aside, half deleted.
    leftover = runs / ".done.deleting-999"
    shutil.copytree(finished / "checkpoints", leftover)
    assert run(capsys, *train_args(tiny_cache, runs, "done", **{"train.overwrite": True}))[0] == 0
    assert not leftover.exists() and (mine / "final" / "student" / "model.safetensors").is_file()
    assert len([line for line in (mine / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]) == 2


# -- signals ------------------------------------------------------------------------------------


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=ENV, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_records(metrics: Path, proc: subprocess.Popen, n: int) -> None:
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().count('"loss"') >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"the run did not reach {n} steps: {proc.poll()}")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_saves_a_checkpoint_and_prints_the_resume_command(tiny_cache, tmp_path, sig):
    extra = {"train.steps": 40, "train.save_every": 1000, "train.eval_every": 1000, "train.warmup_steps": 2}
    proc = start(["train-student", *stage2_overrides(tiny_cache, tmp_path / "runs", "r", **extra)])
    wait_for_records(tmp_path / "runs" / "r" / "metrics.jsonl", proc, 2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    line = [x for x in out.splitlines() if "continue with: make resume CKPT=" in x][-1]
    ckpt = Path(line.split("CKPT=")[1].split()[0])
    step = int(ckpt.name.split("-")[1])
    assert 2 <= step < 40 and (ckpt / "state.pt").is_file() and f"{sig.name} received" in line
    if sig != signal.SIGTERM:
        return
    # Following the printed command ends where an uninterrupted run ends, bit for bit.
    r = subprocess.run([sys.executable, "-m", "pipeline", "resume", str(ckpt)], env=ENV, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    subprocess.run([sys.executable, "-m", "pipeline", "train-student",
                    *stage2_overrides(tiny_cache, tmp_path / "clean", "r", **extra)], env=ENV, cwd=REPO, check=True,
                   capture_output=True, timeout=300)
    a = load_file(tmp_path / "runs" / "r" / "final" / "student" / "model.safetensors")
    b = load_file(tmp_path / "clean" / "r" / "final" / "student" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- disk full, damaged checkpoints, metrics ------------------------------------------------------


def test_disk_full_while_saving_is_one_line_and_removes_the_temp_checkpoint(capsys, tiny_cache, tmp_path, monkeypatch):
    import stage2_student_train.train as train_module

    real = train_module.write_state

    def fills_the_disk(tmp, state, config_toml):
        if state["step"] == 4:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "state.pt"))
        real(tmp, state, config_toml)

    monkeypatch.setattr(train_module, "write_state", fills_the_disk)
    runs = tmp_path / "runs"
    code, err = run(capsys, *train_args(tiny_cache, runs, "r", **{"train.steps": 6, "train.save_every": 2}))
    assert code == 2 and err.splitlines()[-1].startswith("error: could not write the checkpoint of step 4 (the disk")
    assert not list((runs / "r" / "checkpoints").glob(".*"))  # no temp directory left
    assert (runs / "r" / "LATEST").read_text().strip() == "checkpoints/step-00000002"


def test_incomplete_checkpoints_and_cut_metrics(capsys, finished, tmp_path):
    runs = tmp_path / "runs"
    run_dir = copy_run(finished, runs)
    ckpt = run_dir / "checkpoints" / "step-00000004"
    for victim in ("student/model.safetensors", "student/config.json"):
        broken = runs / f"broken-{victim.replace('/', '-')}"
        shutil.copytree(ckpt, broken)
        (broken / victim).unlink()
        assert_refused(capsys, ["resume", broken], rf"is not a complete checkpoint \({victim} is missing\)", runs)
    # A crash mid-write leaves half a line at the end of metrics.jsonl: resume drops it.
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    assert run(capsys, "resume", run_dir / "checkpoints" / "step-00000002",
               f"run.runs_dir={json.dumps(str(runs))}")[0] == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]


# -- resume overrides -----------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [("train.lr=0.5", "train.lr"), ("student.hidden_size=64", "student.hidden_size"),
                                           ("kd.feature_weight=1.0", "kd.feature_weight"), ("kd.mode=\"none\"", "kd.mode")])
def test_resume_refuses_keys_that_define_the_run(capsys, finished, tmp_path, override, key):
    runs = tmp_path / "runs"
    run_dir = copy_run(finished, runs)
    assert_refused(capsys, ["resume", run_dir / "checkpoints" / "step-00000002", override,
                            f"run.runs_dir={json.dumps(str(runs))}"],
                   rf"resume cannot change {key} \(the run has .*start a new run instead", runs)


def test_resume_applies_the_keys_it_may_change(capsys, finished, tmp_path):
    runs = tmp_path / "runs"
    run_dir = copy_run(finished, runs)
    lr = json.loads(json.dumps(float(tomllib.loads((run_dir / "config.toml").read_text())["train"]["lr"])))
    code, err = run(capsys, "resume", run_dir / "checkpoints" / "step-00000004", "train.steps=6", f"train.lr={lr}",
                    "train.save_every=1", f"run.runs_dir={json.dumps(str(runs))}")
    assert code == 0, err
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"loss"' in x] == [1, 2, 3, 4, 5, 6]
    assert "steps = 6" in (run_dir / "checkpoints" / "step-00000006" / "config.toml").read_text()


# -- bad input that used to crash -------------------------------------------------------------------


def test_more_bad_values_are_one_line(capsys, tiny_cache, tmp_path):
    runs = tmp_path / "runs"
    assert_refused(capsys, train_args(tiny_cache, runs, **{"train.eval_sequences": -6}),
                   r"'train.eval_sequences' must be >= 0", runs)
    assert_refused(capsys, train_args(tiny_cache, runs, **{"kd.mode": "union", "kd.union_student_k": 10**6}),
                   r"kd.union_student_k=1000000 exceeds the vocabulary", runs)


def test_a_student_that_fails_to_load_leaves_no_run_directory(capsys, tiny_cache, tmp_path):
    runs = tmp_path / "runs"
    assert_refused(capsys, train_args(tiny_cache, runs, **{"student.model": str(tmp_path / "no-such-model")}),
                   r"cannot load student", runs)
    assert not (runs / "r").exists()
    assert run(capsys, *train_args(tiny_cache, runs))[0] == 0  # the rerun needs no overwrite


def test_eval_uses_the_exported_students_tokenizer(capsys, tiny_cache, smollm2_tokenizer_dir, tmp_path):
    runs = tmp_path / "runs"
    extra = {"student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "mapped"}
    assert run(capsys, *train_args(tiny_cache, runs, "x", **extra))[0] == 0
    capsys.readouterr()
    before = snapshot(runs)
    from pipeline.cli import main as cli_main
    assert cli_main(["eval", *stage2_overrides(tiny_cache, runs, "x")]) == 0  # no student.tokenizer given
    out = capsys.readouterr().out
    got = json.loads(out[out.index("{"):])
    last = [json.loads(x) for x in (runs / "x" / "metrics.jsonl").read_text().splitlines() if '"eval"' in x][-1]
    assert got["ppl"] == pytest.approx(last["ppl"], rel=1e-6)
    assert snapshot(runs) == before
