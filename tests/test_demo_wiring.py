"""`make demo`'s wiring, read from `make -n` (nothing runs): both students start from the teacher
pruned to 10 of 30 layers and differ only in the KD term; DEMO_STUDENT=fresh is the config's own
fresh student; the commands' overrides make a valid config."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess

import pytest

from conftest import REPO
from pipeline.config import load_config

pytestmark = [pytest.mark.slow,  # starts make
              pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")]


def demo_commands(*make_args: str) -> list[list[str]]:
    """The `python -m pipeline ...` commands `make -n demo` would run, as argument lists."""
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "-n", "--no-print-directory", "demo", *make_args], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout
    cmds = []
    for line in out.splitlines():
        for part in re.split(r";|\bthen\b|\belse\b", line):
            if " -m pipeline " in part:
                words = [w for w in shlex.split(part) if w != "fi"]
                cmds.append(words[words.index("pipeline") + 1:])
    return cmds


def overrides(cmd: list[str]) -> list[str]:
    return [w for w in cmd if "=" in w and not w.startswith("-")]


def test_the_demo_students_start_from_the_pruned_teacher():
    cmds = demo_commands()
    assert [c[0] for c in cmds] == ["cache-teacher", "prune-teacher", "train-student", "train-student", "report"]
    prune = cmds[1]
    assert prune[prune.index("--layers") + 1] == "10"
    out = prune[prune.index("--out") + 1]
    kd, ce = overrides(cmds[2]), overrides(cmds[3])
    assert f"student.model={out}" in kd
    # identical but for the run's name and the KD term
    assert ({o for o in kd if not o.startswith("run.name=")}
            == {o for o in ce if not o.startswith(("run.name=", "kd.mode="))}) and "kd.mode=none" in ce
    cfg = load_config(REPO / "configs" / "default.toml", kd)
    assert cfg.student.model == out and cfg.kd.mode == "topk_sampled"
    # the recipe docs/prune.md measured: 150 steps of 4 x 256 tokens at lr 1e-3
    assert (cfg.train.steps, cfg.train.batch_size, cfg.data.seq_len, cfg.train.lr) == (150, 4, 256, 1e-3)


def test_a_fresh_student_is_one_option_away():
    cmds = demo_commands("DEMO_STUDENT=fresh")
    assert [c[0] for c in cmds] == ["cache-teacher", "train-student", "train-student", "report"]
    assert not any(o.startswith("student.model=") for c in cmds for o in overrides(c))
    cfg = load_config(REPO / "configs" / "default.toml", overrides(cmds[1]))
    assert cfg.student.model == "" and cfg.train.steps == 200
