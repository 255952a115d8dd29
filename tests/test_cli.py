"""The command contract: every command exists; unfinished ones say so and exit non-zero."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only


def run(*args):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)))


def test_doctor_reports_versions_and_the_precision_it_would_pick():
    r = run("doctor")
    assert r.returncode == 0, r.stderr
    fields = dict(line.split(None, 1) for line in r.stdout.splitlines() if line.strip() and "  " in line)
    assert fields["torch"].strip().startswith("2.")
    assert "zarr" in fields and "transformers" in fields
    assert fields["device"].strip() == "cpu"
    assert fields["precision"].strip().startswith("float32")


def test_show_config_prints_resolved_values_and_rejects_unknown_keys():
    r = run("show-config", "--config", "configs/default.toml", "cache.top_k=12")
    assert r.returncode == 0 and "top_k = 12" in r.stdout and 'model = "embedded:smollm2-135m-instruct"' in r.stdout
    r = run("show-config", "chache.top_k=12")
    assert r.returncode == 2 and "did you mean cache.top_k?" in r.stderr and "Traceback" not in r.stderr


def test_no_command_prints_help_and_fails():
    r = run()
    assert r.returncode == 2 and "cache-teacher" in r.stdout
