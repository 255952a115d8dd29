"""A logp16 cache end to end: stage 1 builds it from the tiny teacher, ``CacheReader`` decodes the
teacher's exact top-k (the float32 cache of the same sequences) within the codec's bound,
``inspect --verify`` finds it clean, and stage 2 trains from it with kd.mode=topk_tail at tau 2."""

from __future__ import annotations

import json

import numpy as np

from conftest import stage2_overrides
from pipeline.cache import CacheReader
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stage2_student_train.train import train


def aligned(ids: np.ndarray, values: np.ndarray, order_ids: np.ndarray) -> np.ndarray:
    """``values`` (one per id of ``ids``) in the order of ``order_ids`` (same id sets), per position."""
    sort = np.argsort(ids, -1)
    sorted_ids = np.take_along_axis(ids, sort, -1)
    where = np.stack([np.searchsorted(a, b) for a, b in zip(sorted_ids.reshape(-1, ids.shape[-1]),
                                                            order_ids.reshape(-1, ids.shape[-1]))])
    return np.take_along_axis(np.take_along_axis(values, sort, -1).reshape(where.shape), where, -1).reshape(ids.shape)


def test_stage1_logp16_cache_decodes_the_teachers_topk_within_the_bound(logp16_cache, tiny_cache):
    exact, got = CacheReader(tiny_cache), CacheReader(logp16_cache)
    info = got.info()
    assert info["topk_encoding"] == "logp16" and 0 < info["topk_encoding_kl_mean"] < 1e-4
    stored = got.spec.array_specs()
    assert stored["topk_log_codes"][1] == np.uint16 and "topk_ids" not in stored
    names = got.spec.logical_arrays() + ("topk_log_tail",)
    a, b = exact.read_range(0, len(exact), names), got.read_range(0, len(got), names)
    assert b["topk_ids"].dtype == a["topk_ids"].dtype and b["topk_logprobs"].dtype == np.float32
    assert np.array_equal(np.sort(a["topk_ids"], -1), np.sort(b["topk_ids"], -1))
    assert (np.diff(b["topk_logprobs"], axis=-1) <= 0).all()
    assert np.array_equal(a["logz"], b["logz"]) and np.array_equal(a["hidden"], b["hidden"])
    # each log-prob within half a step, so each ratio to the top-1 (and the tail's) within one step
    ref = aligned(a["topk_ids"], a["topk_logprobs"].astype(np.float64), b["topk_ids"])
    step, tol = got.spec.logp_step, 1e-5
    ratio = (b["topk_logprobs"] - b["topk_logprobs"][..., :1]) - (ref - ref[..., :1])
    assert np.abs(ratio).max() <= step + tol
    tail = (b["topk_log_tail"] - b["topk_logprobs"][..., 0]) - (a["topk_log_tail"] - ref[..., 0])
    assert np.abs(tail).max() <= step + tol
    assert np.allclose(np.exp(b["topk_logprobs"].astype(np.float64)).sum(-1) + np.exp(b["topk_log_tail"]), 1.0,
                       atol=1e-5)


def test_inspect_verify_is_clean(logp16_cache, capsys):
    assert cli_main(["inspect", str(logp16_cache), "--verify", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["verify"]["ok"] and not out["verify"]["damaged"]


def test_stage2_trains_from_it_with_topk_tail_at_tau2(logp16_cache, tmp_path):
    extra = {"kd.mode": "topk_tail", "train.steps": 3, "kd.temperature": 2.0, "kd.temperature_final": 2.0}
    out = train(load_config(None, stage2_overrides(logp16_cache, tmp_path, "logp16", **extra)), show_progress=False)
    assert out["step"] == 3
    recs = [json.loads(line) for line in (tmp_path / "logp16" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "split" not in r and "kd" in r]
    assert len(steps) == 3 and all(np.isfinite(r["kd"]) and r["kd"] > 0 for r in steps)


def test_a_run_states_the_caches_fidelity_at_its_temperature(logp16_cache, tiny_cache, tmp_path, capsys):
    """Stage 2 says what the cache's top-k encoding costs at the run's temperature (the KD floor
    stage 1 recorded), in its log, summary.json and model card; sampled/CE runs do not."""
    from pipeline.cache import CacheReader

    extra = {"kd.mode": "topk_tail", "train.steps": 2, "train.warmup_steps": 1, "kd.temperature": 2.0,
             "kd.temperature_final": 4.0}
    capsys.readouterr()
    out = train(load_config(None, stage2_overrides(logp16_cache, tmp_path, "floor", **extra)), show_progress=False)
    floor = CacheReader(logp16_cache).summary_stats()["kd_floor"]
    assert [f["temperature"] for f in out["cache_kd_floor"]] == [2.0, 4.0]
    assert [f["nats"] for f in out["cache_kd_floor"]] == [floor["2"], floor["4"]]
    assert 0 < floor["2"] < 1e-4 and 0 < floor["4"] < 1e-4
    assert f"{floor['2']:.2e} nats at kd.temperature=2" in capsys.readouterr().out
    assert "cache KD floor (nats)" in (tmp_path / "floor" / "final" / "student" / "README.md").read_text()
    ce = train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "ce", **{
        "kd.mode": "none", "train.steps": 2, "train.warmup_steps": 1})), show_progress=False)
    assert ce["cache_kd_floor"] == []


def test_the_teacher_pass_gives_tails_exact_where_one_minus_the_sum_is_noise(tiny_teacher_dir):
    """The mass beyond the top-k, summed over the other ids, against a float64 reference from the
    same logits; on a sharpened teacher (tails down to ~1e-11) ``1 - sum p`` of the fp32 top-k is
    rounding noise, the teacher pass's tail is not."""
    import torch
    from transformers import AutoModelForCausalLM

    from stage1_teacher_cache.teacher import TeacherPass

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    for sharpen in (1.0, 12.0):
        with torch.no_grad():
            model.model.norm.weight.mul_(sharpen)  # logits scale with the final norm
        out = TeacherPass(model, top_k=8, logits_chunk=16)(ids)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
        rest = logp.scatter(-1, torch.from_numpy(out["topk_ids"]).long(), -torch.inf)
        want = torch.logsumexp(rest, -1).numpy()
        got = out["topk_log_tail"].astype(np.float64)
        assert np.abs(got - want).max() < 1e-4, sharpen
        if sharpen > 1:
            assert want.min() < -25  # tails far below what 1 - sum can resolve
            derived = np.log(np.clip(1 - np.exp(out["topk_logprobs"].astype(np.float64)).sum(-1), 1e-300, None))
            assert np.abs(derived - want).max() > 1.0
