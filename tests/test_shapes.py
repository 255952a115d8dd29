"""The model shapes shipped in configs/hf: each one read by the installed transformers as the real
model's shape, in keys every supported transformers reads alike, and the README's planning
command working offline because of them."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO
from pipeline.config import load_config
from pipeline.memplan import dims_from_hf_config, local_hf_config
from pipeline.shapes import shipped_shape

SHAPES = REPO / "configs" / "hf"
EXPECTED = {
    # folder: (class, layers, hidden, vocab, experts, experts per token, expert width, tied, parameters)
    "huihui-ai--Huihui-MoE-1.2B-A0.6B": ("Qwen3MoeForCausalLM", 28, 1024, 151936, 3, 1, 3072, False, 1.28e9),
    "HuggingFaceTB--SmolLM-135M": ("LlamaForCausalLM", 30, 576, 49152, 0, 0, 0, True, 1.345e8),
}
MISREAD = {"num_local_experts": "num_experts", "rope_parameters": "rope_theta", "dtype": "torch_dtype"}
"""5.x-only keys that transformers 4.x ignores (its defaults then apply: 128 experts for a
Qwen3-MoE), and the key both read."""


def test_every_shipped_shape_is_expected():
    assert sorted(p.name for p in SHAPES.iterdir() if p.is_dir()) == sorted(EXPECTED)


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_a_shipped_shape_reads_as_the_real_model(folder):
    cls, layers, hidden, vocab, experts, per_token, width, tied, params = EXPECTED[folder]
    raw = json.loads((SHAPES / folder / "config.json").read_text())
    for key, portable in MISREAD.items():
        assert key not in raw, f"{folder}: {key} is read by transformers 5 only; write {portable}"
    hf = local_hf_config(str(SHAPES / folder))
    assert hf.architectures == [cls] and bool(hf.tie_word_embeddings) is tied
    d = dims_from_hf_config(hf)
    assert (d.layers, d.hidden, d.vocab) == (layers, hidden, vocab)
    assert (d.experts, d.experts_per_token, d.moe_intermediate) == (experts, per_token, width)
    assert d.moe_layers == (layers if experts else 0)
    assert abs(d.params - params) / params < 0.01, d.params


def test_a_hub_id_finds_its_shipped_shape_and_nothing_else_does(tmp_path):
    teacher = load_config(REPO / "configs" / "seed-p100.toml").teacher.model
    assert shipped_shape(teacher) == SHAPES / "huihui-ai--Huihui-MoE-1.2B-A0.6B" / "config.json"
    assert shipped_shape("HuggingFaceTB/SmolLM-135M") is not None
    for other in ("someone/else", "embedded:smollm2-135m-instruct", "", "a/b/c", str(tmp_path)):
        assert shipped_shape(other) is None
    # Beside a config in another folder, its own hf/ comes first.
    own = tmp_path / "hf" / "someone--else"
    own.mkdir(parents=True)
    (own / "config.json").write_text("{}")
    assert shipped_shape("someone/else", tmp_path / "mine.toml") == own / "config.json"


def test_doctor_plans_from_the_shipped_shapes_without_being_told():
    from pipeline.doctor import model_shapes
    from pipeline.memplan import plan

    path = REPO / "configs" / "seed-p100.toml"
    cfg = load_config(path)
    shapes = model_shapes(cfg, argparse.Namespace(config=str(path), teacher_config=None, student_config=None))
    assert "the hub is not asked" in shapes["teacher"][1] and "the hub is not asked" in shapes["student"][1]
    p = plan(cfg, budget=16 * 2**30, cuda=True, capability=(6, 0), teacher_config=shapes["teacher"][0],
             student_config=shapes["student"][0])
    assert p["teacher"]["experts"] == 3 and p["teacher"]["experts_per_token"] == 1
    assert p["stage1"]["fits"] and p["stage2"]["fits"]
    given = model_shapes(cfg, argparse.Namespace(config=str(path), teacher_config="x.json", student_config=None))
    assert given["teacher"] == ("x.json", "x.json (--teacher-config)")


def readme_planning_command() -> list[str]:
    m = re.search(r"^python -m pipeline (doctor --config configs/seed-p100\.toml --card p100)\s",
                  (REPO / "README.md").read_text(), re.M)
    assert m, "the README's planning command is gone"
    return m.group(1).split()


@pytest.mark.slow  # starts a process
def test_the_readmes_planning_command_works_offline_as_printed():
    """No HF_HUB_OFFLINE and a hub that refuses every connection: the command as the README prints
    it plans from the shipped shapes, at once, without a retry."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    env.update(PYTHONPATH=str(REPO), HF_ENDPOINT="http://127.0.0.1:9")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "pipeline", *readme_planning_command(), "--json"], capture_output=True,
                       text=True, cwd=REPO, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert time.perf_counter() - t0 < 30
    p = json.loads(r.stdout)["plan"]
    assert p["capability"] == "6.0" and p["teacher"]["experts"] == 3 and p["teacher"]["moe_intermediate"] == 3072
    assert round(p["stage1"]["peak"] / 2**30, 2) == 3.60 and round(p["stage2"]["peak"] / 2**30, 2) == 10.96


def test_the_gpu_check_builds_the_shipped_teacher_shape():
    """bench.gpu's random seed teacher (the check that travels to a GPU box without this folder)
    is the shipped shape, key for key."""
    from bench.gpu_parts import QWEN_VOCAB, TEACHER

    raw = json.loads((SHAPES / "huihui-ai--Huihui-MoE-1.2B-A0.6B" / "config.json").read_text())
    assert {k: raw[k] for k in TEACHER["seed"]} == TEACHER["seed"] and raw["vocab_size"] == QWEN_VOCAB
