"""The GPU check (``python -m bench.gpu``) and the bundle that carries it (``bench/bundle.py``):
a one-line refusal without CUDA; the bundle's dependency closure; and the CPU rehearsal: build a
bundle for this interpreter, install it into a temp folder with ``pip --no-index --target``, and
run the whole orchestration from there on tiny shapes, so a broken bundle fails here rather than
on the GPU machine."""

import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch

from conftest import REPO

SHAKESPEARE = REPO / "data" / "shakespeare"


def env_with(pythonpath):
    return dict(os.environ, PYTHONPATH=str(pythonpath), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_exits_at_once_with_one_line():
    r = subprocess.run([sys.executable, "-m", "bench.gpu"], capture_output=True, text=True, cwd=REPO,
                       env=env_with(REPO), timeout=60)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bench.gpu needs a CUDA GPU"), r.stderr
    assert r.stdout == ""


def fake_wheel(path, name, requires):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-1.0.dist-info/METADATA",
                   "Metadata-Version: 2.1\nName: " + name + "\n" + "".join(f"Requires-Dist: {r}\n" for r in requires))


def test_the_bundle_must_be_closed_under_its_wheels_requirements(tmp_path):
    from bench.bundle import unmet_requirements

    fake_wheel(tmp_path / "zarr-1.0-py3-none-any.whl", "zarr",
               ["numpy>=2", "donfig>=0.8", "typing-extensions", "left-out-pkg>=1", "s3fs; extra == 's3'",
                "tomli; python_version < '3.11'"])
    fake_wheel(tmp_path / "kd_pipeline-0.1.0-py3-none-any.whl", "kd_pipeline", ["gguf>=0.10"])  # checked at run time
    assert unmet_requirements(tmp_path, "3.12") == ["zarr needs left-out-pkg>=1"]
    assert unmet_requirements(tmp_path, "3.10") == ["zarr needs left-out-pkg>=1", "zarr needs tomli"]


SEED = """# a stand-in for configs/seed-p100.toml: hub models the rehearsal replaces, a cross-tokenizer mode
[teacher]
model = "Qwen/a-moe-teacher"
[data]
source = "somewhere/else"
seq_len = 32
[student]
model = "HuggingFaceTB/SmolLM-135M"
tokenizer = "HuggingFaceTB/SmolLM-135M"
[train]
steps = 1000
batch_size = 2
grad_accum = 2
[kd]
mode = "mapped"
"""


@pytest.mark.slow
@pytest.mark.skipif(not SHAKESPEARE.is_dir(), reason="needs data/shakespeare (make setup)")
def test_cpu_rehearsal_from_the_installed_bundle(tmp_path):
    from bench.bundle import BOX_HAS, BUNDLED, MAX_FILE, normalise

    bundle, site, out = tmp_path / "gpu-bundle", tmp_path / "site", tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "bench.bundle", "--local", "--out", str(bundle), "--plays", "3"],
                       capture_output=True, text=True, cwd=REPO, env=env_with(REPO), timeout=600)
    if r.returncode != 0 and "needs PyPI" in r.stderr:
        pytest.fail(f"the rehearsal downloads {', '.join(BUNDLED)} for this interpreter: {r.stderr.strip()}")
    assert r.returncode == 0, r.stderr[-3000:]
    manifest = json.loads((bundle / "MANIFEST.json").read_text())
    assert manifest["tokenizers"] == {"qwen": 151851, "smollm2": 49152}
    assert all(f["bytes"] <= MAX_FILE for f in manifest["files"].values())
    wheels = sorted(p.name for p in (bundle / "wheels").glob("*.whl"))
    assert len(wheels) == len(BUNDLED) + 1 and any(w.startswith("kd_pipeline-") for w in wheels), wheels
    # Install as the GPU machine does: no index, no dependency resolution, into a plain folder.
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--target", str(site), *map(str, (bundle / "wheels").glob("*.whl"))],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    (tmp_path / "seed.toml").write_text(SEED)
    # -P and cwd outside the checkout: the installed copy runs, not the repository's.
    r = subprocess.run([sys.executable, "-P", "-m", "bench.gpu", "--cpu-rehearsal", "--tiny", "--bundle", str(bundle),
                        "--out", str(out), "--seed-config", str(tmp_path / "seed.toml"), "--sequences", "8",
                        "--steps", "3", "--p100-steps", "3", "--batch-size", "2"],
                       capture_output=True, text=True, cwd=tmp_path, env=env_with(site), timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    got = json.loads((out / "gpu-results.json").read_text())
    assert got["errors"] == {} and got["skipped"] == {}
    assert set(got["imported"]["bundle"]) >= {normalise(n) for n in BUNDLED} | {"kd-pipeline"}
    assert set(got["imported"]["interpreter"]) <= BOX_HAS, got["imported"]
    teacher = got["teacher"]
    assert teacher["vocab_size"] == 151936 and teacher["num_experts"] == 8 and teacher["active_params"] < teacher["params"]
    assert set(got["stage2"]) == {"none", "topk_tail", "sampled", "cross_none", "cross_mapped"}
    for label, res in got["stage2"].items():
        assert res["tokens_per_s"] > 0 and res["mfu"] > 0 and res["planner_peak_mb"] > 0, (label, res)
        assert res["data_stall_s_per_step"] is not None and res["steps"] == 3, (label, res)
        assert res["student_vocab"] == (49152 if label.startswith("cross_") else 151936), (label, res)
    assert got["stage1"]["P1"] > 0 and got["stage1"]["teacher_tokens_per_s"] > 0
    assert 0 < got["ratios"]["P3"] < 1 and {"P2_topk_tail", "P2_sampled", "P2_cross_mapped"} <= set(got["ratios"])
    p100 = got["p100"]
    assert p100["fits"] and p100["batch"] == 2 and p100["grad_accum"] == 2 and p100["kd_mode"] == "mapped"
    assert set(got["phase_s"]) >= {"matmul", "tokenizers", "teacher_build", "stage1", "p100"}
    md = (out / "gpu-results.md").read_text()
    assert "P1 pass / pure forward" in md and "P100 emulation" in md and "G3 seed batch fits 16 GiB" in md
