"""Stage 1 on a tiny random teacher: values against a float64 recomputation, resume after
SIGKILL, refusal of a foreign cache, and a 2-process torchrun run equal to 1 process."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, assert_same_cache, stage1_overrides
from pipeline.cache import CacheReader
from pipeline.config import config_overrides, load_config
from pipeline.errors import FingerprintMismatch
from stage1_teacher_cache.run import cache_teacher


def run_cli(args, **kw):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, **kw)


@pytest.fixture(scope="module")
def built(tiny_teacher_dir, corpus_dir, tmp_path_factory):
    cache = tmp_path_factory.mktemp("built") / "cache"
    cfg = load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache))
    info = cache_teacher(cfg, show_progress=False)
    return cfg, cache, info


def test_cached_values_match_a_float64_recomputation(built, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    cfg, cache, info = built
    reader = CacheReader(cache)
    assert reader.complete and info["complete"] and len(reader) >= 20
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float64).eval()
    k = cfg.cache.top_k
    eval_nll, eval_n, exact_topk, positions = 0.0, 0, 0, 0
    for i in range(len(reader)):
        seq = reader.sequence(i)
        ids = torch.from_numpy(seq["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            hidden = model.model(input_ids=ids).last_hidden_state[0]  # [L, D] float64
            logits = hidden @ model.lm_head.weight.T  # full vocabulary, float64
        logz = torch.logsumexp(logits, -1)
        logp = logits - logz[:, None]
        ref_top = logits.topk(k + 1, -1)
        # The stored ids are the reference top-k set wherever the k-th and (k+1)-th logits are not
        # a near-tie (fp32 vs fp64 may swap those), and they are in descending logit order.
        stored = torch.from_numpy(seq["topk_ids"].astype(np.int64))
        clear = (ref_top.values[:, k - 1] - ref_top.values[:, k]) > 1e-4
        same = (stored.sort(-1).values == ref_top.indices[:, :k].sort(-1).values).all(-1)
        assert bool(same[clear].all())
        ref_at_stored = logits.gather(1, stored)
        assert bool((ref_at_stored[:, 1:] <= ref_at_stored[:, :-1] + 1e-4).all())
        exact_topk += int(same.sum())
        positions += len(same)
        np.testing.assert_allclose(seq["topk_logprobs"], logp.gather(1, stored).numpy(), atol=2e-5, rtol=0)
        np.testing.assert_allclose(seq["logz"], logz.numpy(), rtol=1e-6, atol=1e-5)
        np.testing.assert_allclose(seq.topk_logits(), logits.gather(1, stored).numpy(), atol=5e-5)
        want_next = logp[:-1].gather(1, ids[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(seq["next_logprob"][:-1], want_next, atol=2e-5)
        assert seq["next_logprob"][-1] == 0.0
        np.testing.assert_allclose(seq.hidden(), hidden.numpy(), rtol=1e-3, atol=2e-3)  # fp16 storage
        if seq.split == "eval":
            eval_nll -= float(want_next.sum())
            eval_n += len(want_next)
    assert exact_topk / positions > 0.99
    assert info["teacher_eval_ppl"] == pytest.approx(np.exp(eval_nll / eval_n), rel=1e-5)
    assert 0 < info["topk_mass_mean"] < 1


def test_int8_hidden_and_fp16_logprobs_stay_close(built, tiny_teacher_dir, corpus_dir, tmp_path):
    _, ref_cache, _ = built
    cfg = load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c",
                                             **{"cache.hidden_dtype": "int8", "cache.topk_encoding": "float16"}))
    cache_teacher(cfg, show_progress=False)
    ref, got = CacheReader(ref_cache), CacheReader(tmp_path / "c")
    for i in (0, len(ref) - 1):
        a, b = ref.sequence(i), got.sequence(i)
        assert np.array_equal(a["topk_ids"], b["topk_ids"])
        assert b["topk_logprobs"].dtype == np.float16 and b["hidden"].dtype == np.float32  # int8 decoded by the reader
        assert got.spec.array_specs()["hidden"][1] == np.int8
        np.testing.assert_allclose(b["topk_logprobs"], a["topk_logprobs"], atol=2e-2, rtol=1e-3)
        scale = got._read_stored(i, i + 1, ("hidden_scale",))["hidden_scale"][0][:, None]
        assert np.all(np.abs(b.hidden() - a.hidden()) <= scale / 2 + 2e-3 * np.abs(a.hidden()) + 1e-3)


def test_sqrt8_cache_holds_the_same_topk_sets_at_the_stated_fidelity(built, tiny_teacher_dir, corpus_dir, tmp_path):
    _, ref_cache, _ = built
    cfg = load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c",
                                             **{"cache.topk_encoding": "sqrt8"}))
    info = cache_teacher(cfg, show_progress=False)
    assert info["topk_encoding"] == "sqrt8" and 0 < info["topk_encoding_kl_mean"] < 1e-3
    ref, got = CacheReader(ref_cache), CacheReader(tmp_path / "c")
    a, b = ref.read_range(0, len(ref)), got.read_range(0, len(got))
    assert np.array_equal(np.sort(a["topk_ids"], -1), np.sort(b["topk_ids"], -1))
    assert np.array_equal(a["logz"], b["logz"]) and np.array_equal(a["hidden"], b["hidden"])
    # Decoded probabilities agree with the exact ones to about a sqrt-step.
    pa_, pb = np.exp(a["topk_logprobs"]), np.exp(b["topk_logprobs"])
    assert np.abs(np.sort(np.sqrt(pa_), -1) - np.sort(np.sqrt(pb), -1)).max() < 1.5 / got.spec.sqrt_levels


def test_rerun_skips_and_a_foreign_config_is_refused(built, capsys):
    cfg, cache, _ = built
    before = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert not (cache.parent / f".{cache.name}.plan").exists()  # the plan goes once the cache is complete
    cache_teacher(cfg, show_progress=False)
    assert "stage 1 skipped" in capsys.readouterr().out
    assert not (cache.parent / f".{cache.name}.plan").exists()
    other = load_config(None, [*config_overrides(cfg), "cache.top_k=4"])
    with pytest.raises(FingerprintMismatch, match="top_k: cache has 8, now 4"):
        cache_teacher(other, show_progress=False)
    after = {p: p.read_bytes() for p in cache.rglob("*") if p.is_file()}
    assert before == after


def test_cli_refusal_is_one_line_and_nonzero(built, tiny_teacher_dir, corpus_dir):
    _, cache, _ = built
    r = run_cli(["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{"data.seq_len": 16})])
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert err[-1].startswith("error: cache") and "seq_len: cache has 32, now 16" in err[-1]
    assert "Traceback" not in r.stderr


def test_torchrun_two_processes_equal_one(built, tiny_teacher_dir, corpus_dir, tmp_path):
    _, ref, _ = built
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        "-m", "pipeline", "cache-teacher",
                        *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "ddp")],
                       capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert_same_cache(ref, tmp_path / "ddp")
    markers = CacheReader(tmp_path / "ddp")._markers
    assert len(markers) == CacheReader(ref).spec.num_shards
