"""Stage 2 on a tiny cache: training reads only the cache, resume is bit-exact (also after
SIGKILL), every KD mode trains, and bad checkpoints are refused with one line."""

import json
import os
from pathlib import Path
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, stage1_overrides, stage2_overrides
from pipeline.config import load_config
from pipeline.errors import PipelineError
from stage1_teacher_cache.run import cache_teacher
from stage2_student_train.train import train

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

VOLATILE = ("tokens_per_s", "mem_mb", "mem_peak_mb", "data_stall_s")


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=str(REPO)), **kw)


def train_records(run_dir):
    recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in VOLATILE} for r in recs]


def assert_same_run(a, b, step):
    sa = load_file(a / "final" / "student" / "model.safetensors")
    sb = load_file(b / "final" / "student" / "model.safetensors")
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ca = torch.load(a / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=False)
    cb = torch.load(b / "checkpoints" / f"step-{step:08d}" / "state.pt", weights_only=False)
    for k in ca["ema"]["shadow"]:
        assert torch.equal(ca["ema"]["shadow"][k], cb["ema"]["shadow"][k]), k
    for pid, st in ca["optimizer"]["state"].items():
        for name, value in st.items():
            assert torch.equal(value, cb["optimizer"]["state"][pid][name]), (pid, name)
    wa = load_file(a / "checkpoints" / f"step-{step:08d}" / "student" / "model.safetensors")
    wb = load_file(b / "checkpoints" / f"step-{step:08d}" / "student" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert ca["data"] == cb["data"]
    assert train_records(a) == train_records(b)


@pytest.fixture(scope="module")
def uninterrupted(tiny_cache, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = train(load_config(None, stage2_overrides(tiny_cache, runs, "full")), show_progress=False)
    return runs / "full", result


def test_training_learns_and_writes_the_run_directory(uninterrupted):
    run_dir, result = uninterrupted
    from transformers import AutoModelForCausalLM

    recs = train_records(run_dir)
    train_recs = [r for r in recs if "split" not in r]
    evals = [r for r in recs if r.get("split") == "eval"]
    assert [r["step"] for r in train_recs] == list(range(1, 7))
    assert [r["step"] for r in evals] == [3, 6]
    for r in train_recs:
        assert set(r) >= {"step", "loss", "ce", "kd", "lr"} and r["kd"] > 0
    for r in evals:
        assert set(r) >= {"ce", "ppl", "bpb", "teacher_top1_agree"} and 0 <= r["teacher_top1_agree"] <= 1
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]
    card = (run_dir / "final" / "student" / "README.md").read_text()  # the model card, from this run's numbers
    assert "| KD mode | topk_tail |" in card and f"| ppl | {evals[-1]['ppl']:.6g} |" in card
    assert (run_dir / "LATEST").read_text().strip() == "checkpoints/step-00000006"
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000006"]
    model = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "student")
    assert model.config.hidden_size == 32
    # The export holds the EMA weights, not the raw ones.
    raw = load_file(run_dir / "checkpoints" / "step-00000006" / "student" / "model.safetensors")
    ema = torch.load(run_dir / "checkpoints" / "step-00000006" / "state.pt", weights_only=False)["ema"]["shadow"]
    name = "model.layers.0.mlp.up_proj.weight"
    assert torch.equal(model.state_dict()[name], ema[name]) and not torch.equal(raw[name], ema[name])


def test_stop_then_resume_is_bit_identical(uninterrupted, tiny_cache, tmp_path):
    full, _ = uninterrupted
    train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "full", **{"train.stop_after": 3})),
          show_progress=False)
    run_dir = tmp_path / "full"
    assert not (run_dir / "final").exists()
    r = cli("resume", str(run_dir / "checkpoints" / "step-00000003"), "train.stop_after=0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(full, run_dir, 6)


def test_training_never_loads_the_teacher(tiny_teacher_dir, corpus_dir, tmp_path):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    cache = tmp_path / "cache"
    cache_teacher(load_config(None, stage1_overrides(teacher, corpus_dir, cache)), show_progress=False)
    for weights in teacher.glob("*.safetensors"):
        weights.unlink()  # only the tokenizer files remain
    out = train(load_config(None, stage2_overrides(cache, tmp_path / "runs", **{"train.steps": 3})),
                show_progress=False)
    assert out["step"] == 3 and out["eval"]["ppl"] > 1


@pytest.mark.parametrize("mode", ["none", "topk_renorm", "union"])
def test_every_kd_mode_trains(tiny_cache, tmp_path, mode):
    extra = {"kd.mode": mode, "train.steps": 3, "kd.temperature": 2.0, "kd.temperature_final": 1.0}
    if mode == "union":
        extra["kd.feature_weight"] = 0.5
    out = train(load_config(None, stage2_overrides(tiny_cache, tmp_path, mode, **extra)), show_progress=False)
    recs = train_records(tmp_path / mode)
    assert out["step"] == 3
    assert all((r["kd"] > 0) == (mode != "none") for r in recs if "split" not in r)
    assert [r["temperature"] for r in recs if "split" not in r] == [2.0, 1.5, 1.0]


def test_bad_checkpoints_are_refused_in_one_line(uninterrupted, tiny_cache, tmp_path):
    full, _ = uninterrupted
    r = cli("resume", str(tmp_path / "nope" / "checkpoints" / "step-00000002"))
    assert r.returncode == 2 and "does not exist" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    # A run copied elsewhere: its checkpoint says it belongs to another run directory.
    moved = tmp_path / "moved"
    shutil.copytree(full, moved)
    r = cli("resume", str(moved / "checkpoints" / "step-00000006"))
    assert r.returncode == 2 and "belongs to run directory" in r.stderr
    # A run that already exists is not overwritten by a new train-student.
    r = cli("train-student", *stage2_overrides(tiny_cache, full.parent, "full"))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_training_refuses_an_incomplete_cache(tiny_cache, tmp_path):
    broken = tmp_path / "cache"
    shutil.copytree(tiny_cache, broken)
    (broken / "done" / "shard-00001.json").unlink()
    with pytest.raises(PipelineError, match="incomplete"):
        train(load_config(None, stage2_overrides(broken, tmp_path / "runs")), show_progress=False)


def test_torchrun_two_processes_train_like_one_and_resume(uninterrupted, tiny_cache, tmp_path):
    """Two ranks with half the batch each see the same global batches as one process with the
    whole batch, so their losses agree to float rounding; their checkpoint resumes under torchrun."""
    full, _ = uninterrupted
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pipeline"]
    args = stage2_overrides(tiny_cache, tmp_path, "full", **{"train.batch_size": 2, "train.stop_after": 4})
    r = subprocess.run([*launch, "train-student", *args], capture_output=True, text=True, env=env, cwd=REPO,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    state = torch.load(tmp_path / "full" / "checkpoints" / "step-00000004" / "state.pt", weights_only=False)
    assert state["step"] == 4 and len(state["rng"]) == 2  # one RNG state per rank
    r = subprocess.run([*launch, "resume", str(tmp_path / "full" / "checkpoints" / "step-00000004"),
                        "train.stop_after=0"], capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    one = [r for r in train_records(full) if "split" not in r]
    two = [r for r in train_records(tmp_path / "full") if "split" not in r]
    assert [r["step"] for r in two] == list(range(1, 7))
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    assert (tmp_path / "full" / "final" / "student" / "model.safetensors").is_file()


def test_non_finite_steps_are_skipped_counted_and_stop_the_run(tiny_cache, tmp_path, monkeypatch):
    import stage2_student_train.state as state_module
    import stage2_student_train.train as train_module

    real_build = state_module.build_student

    def poisoned(*a, **kw):  # a student whose forward yields NaN: every step is non-finite
        model = real_build(*a, **kw)
        with torch.no_grad():
            model.model.norm.weight[0] = float("nan")
        return model

    monkeypatch.setattr(state_module, "build_student", poisoned)
    cfg = load_config(None, stage2_overrides(tiny_cache, tmp_path, "nan", **{"train.max_bad_steps": 3}))
    with pytest.raises(train_module.TrainingError, match=r"3 non-finite steps in a row.*sample ids of that step: \[\d+"):
        train(cfg, show_progress=False)
    recs = train_records(tmp_path / "nan")
    assert [r["skipped_steps"] for r in recs] == [1, 2]  # the third raised before its record
    assert all(r["grad_norm"] is None for r in recs)


def test_cross_tokenizer_student_trains_from_the_same_cache(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    """The tiny cache's teacher speaks GPT-2 BPE; this student speaks SmolLM2's tokenizer. The
    view (alignment + vocab map) is built once beside the cache and reused; KD flows."""
    from pipeline.cache import CacheReader
    from stage2_student_train.cross import view_dir
    from transformers import AutoTokenizer

    extra = {"student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "mapped", "train.steps": 3}
    out = train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "x", **extra)), show_progress=False)
    cov = out["cross_tokenizer"]
    assert 0.5 < cov["student_positions_aligned"] <= 1.0 and 0.0 < cov["teacher_topk_mass_mapped"] < 1.0
    folder = view_dir(CacheReader(tiny_cache), AutoTokenizer.from_pretrained(smollm2_tokenizer_dir))
    stamp = (folder / "view.npz").stat().st_mtime_ns
    recs = train_records(tmp_path / "x")
    assert all(r["kd"] > 0 for r in recs if "split" not in r)
    evals = [r for r in recs if r.get("split") == "eval"]
    assert evals and 0 < evals[-1]["bpb"] < 20
    # A second run reuses the stored view instead of re-aligning.
    train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "y", **{**extra, "train.steps": 1, "train.warmup_steps": 0})),
          show_progress=False)
    assert (folder / "view.npz").stat().st_mtime_ns == stamp
    # Same-tokenizer KD modes are refused for a student with another tokenizer.
    with pytest.raises(PipelineError, match="kd.mode=topk_tail needs the teacher's tokenizer"):
        train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "z", **{**extra, "kd.mode": "topk_tail"})),
              show_progress=False)


def test_projected_mode_trains_the_router_from_the_cache(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    extra = {"student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "projected", "train.steps": 3,
             "train.warmup_steps": 1, "train.save_every": 3, "router.num_experts": 3, "router.initial_top_k": 2,
             "router.final_top_k": 1}
    out = train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "p", **extra)), show_progress=False)
    assert out["step"] == 3
    recs = [r for r in train_records(tmp_path / "p") if "split" not in r]
    assert [r["router_k"] for r in recs] == [2, 2, 1]  # the k schedule, halves rounded up
    for r in recs:
        assert r["kd"] > 0 and len(r["router_utilisation"]) == 3
        assert sum(r["router_utilisation"]) == pytest.approx(1.0, abs=1e-3)
    state = torch.load(tmp_path / "p" / "checkpoints" / "step-00000003" / "state.pt", weights_only=False)
    assert {"weight", "bias", "gate.weight"} <= set(state["router"])
    assert any(k.startswith("router.") for k in state["ema"]["shadow"])  # EMA covers the router too


def test_eval_command_reproduces_the_final_eval_record(uninterrupted, tiny_cache, capsys):
    from pipeline.cli import main as cli_main

    run_dir, _ = uninterrupted
    capsys.readouterr()
    assert cli_main(["eval", *stage2_overrides(tiny_cache, run_dir.parent, "full")]) == 0
    got = json.loads(capsys.readouterr().out)
    last = [r for r in train_records(run_dir) if r.get("split") == "eval"][-1]
    # The exported student is the EMA model the last in-training eval used.
    assert got["ppl"] == pytest.approx(last["ppl"], rel=1e-6) and got["bpb"] == pytest.approx(last["bpb"], rel=1e-6)


def test_cross_tokenizer_objective_does_not_depend_on_the_chunk_size(tiny_cache, smollm2_tokenizer_dir):
    """Padded cross-tokenizer batches: every valid target counts, however positions are chunked."""
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from pipeline.config import KDConfig
    from stage2_student_train.data import data_access
    from stage2_student_train.objective import Weights, batch_objective
    from stage2_student_train.student import build_student

    reader = CacheReader(tiny_cache)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    access = data_access(reader, tok, False, need_hidden=False, show_progress=False)
    batch = access.load(np.arange(6))
    assert not bool(batch["target_mask"].all())  # the batch really is padded
    torch.manual_seed(0)
    cfg = load_config(None, stage2_overrides(tiny_cache, Path("/unused")))
    model = build_student(cfg, len(tok), access.seq_len)
    w = Weights(1.0, 1.0, 1.0, 0.0, 0.0)
    outs = [batch_objective(model, batch, KDConfig(mode="mapped"), w, chunk=c) for c in (7, 64, 100000)]
    for o in outs[1:]:
        assert o["ce"] == pytest.approx(outs[0]["ce"], rel=1e-6) and o["kd"] == pytest.approx(outs[0]["kd"], rel=1e-6)
    assert outs[0]["positions"] == int(batch["target_mask"].sum())
