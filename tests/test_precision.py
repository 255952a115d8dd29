"""The teacher pass in low precision: the head runs in fp32 (Fp32Head), so logits, logZ and
top-k carry only the error of the low-precision body; and ``inspect --precision-check`` reports
a cache's low-precision error against an fp32 recomputation."""

import json

import numpy as np
import pytest
import torch

from conftest import stage1_overrides
from pipeline.cache import CacheReader
from pipeline.config import load_config
from stage1_teacher_cache.audit import precision_check
from stage1_teacher_cache.run import cache_teacher
from stage1_teacher_cache.teacher import Fp32Head, TeacherPass


@pytest.fixture(scope="module")
def fp16_teacher(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float16).eval()


def float64_reference(model, ids):
    """The fp16 body's own hidden state, then the head in float64 over the full vocabulary."""
    with torch.inference_mode():
        hidden = model.model(input_ids=ids, use_cache=False).last_hidden_state[0]
        logits = hidden.double() @ model.lm_head.weight.double().T
    return hidden, logits, torch.logsumexp(logits, -1)


@pytest.mark.parametrize("chunk, mode", [(64, "cached"), (16, "slabs")])
def test_fp32_head_matches_float64_on_the_fp16_body(fp16_teacher, chunk, mode):
    torch.manual_seed(0)
    ids = torch.randint(0, fp16_teacher.config.vocab_size, (1, 48))
    teacher = TeacherPass(fp16_teacher, top_k=8, logits_chunk=chunk)
    assert teacher.head32.mode == mode
    if mode == "slabs":
        assert teacher.head32.slab_rows < teacher.head32.vocab  # really walks the vocabulary in pieces
    out = teacher(ids)
    _, ref, ref_logz = float64_reference(fp16_teacher, ids)
    # logZ: fp32 accumulation of exact fp16 products: ~1e-7 relative, where an fp16 head is off
    # by ~1e-5 relative here (and by 1e-3 on a real teacher's larger logits).
    np.testing.assert_allclose(out["logz"][0], ref_logz.numpy(), rtol=1e-6, atol=5e-6)
    top = ref.topk(9, -1)
    clear = (top.values[:, 7] - top.values[:, 8]) > 1e-4  # no near-tie at the k-th place
    assert np.array_equal(out["topk_ids"][0][clear.numpy()], top.indices[:, :8][clear].numpy())
    want_lp = (top.values[:, :8] - ref_logz[:, None]).numpy()
    np.testing.assert_allclose(out["topk_logprobs"][0][clear.numpy()], want_lp[clear.numpy()], atol=5e-5)


def test_the_fp16_head_it_replaces_would_fail_that_bound(fp16_teacher):
    """The old path (head in fp16, upcast after) misses the float64 logZ by far more than the
    fp32 path: the bound above is not vacuous."""
    torch.manual_seed(0)
    ids = torch.randint(0, fp16_teacher.config.vocab_size, (1, 48))
    teacher = TeacherPass(fp16_teacher, top_k=8, logits_chunk=64)
    hidden, _, ref_logz = float64_reference(fp16_teacher, ids)
    with torch.inference_mode():
        old = torch.logsumexp(teacher.native_logits(hidden), -1).double()
        new = torch.logsumexp(teacher.logits(hidden), -1).double()
    old_err, new_err = float((old - ref_logz).abs().max()), float((new - ref_logz).abs().max())
    assert new_err < 5e-6 and old_err > 20 * new_err and old_err > 2e-5, (old_err, new_err)


def test_fp32_teacher_uses_its_head_without_a_copy(tiny_teacher_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32)
    head = Fp32Head(model.lm_head, logits_chunk=4)
    assert head.mode == "native-fp32" and head.w32 is model.lm_head.weight


@pytest.mark.slow  # builds an fp16 cache with stage 1
def test_precision_check_of_an_fp32_and_an_fp16_cache(tiny_cache, tiny_teacher_dir, corpus_dir, tmp_path):
    exact = precision_check(CacheReader(tiny_cache), sequences=3)
    assert exact["positions"] == 3 * 32
    assert exact["logz_abs_diff_max"] < 1e-4 and exact["top1_agreement"] == 1.0
    assert exact["kl_topk_tail_mean"] < 1e-7  # float32 encoding: nothing lost

    cfg = load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "fp16",
                                             **{"teacher.dtype": "float16"}))
    cache_teacher(cfg, show_progress=False)
    low = precision_check(CacheReader(tmp_path / "fp16"), sequences=3)
    assert low["cache_precision"] == "float16"
    assert 1e-4 < low["logz_abs_diff_max"] < 0.5 and low["kl_topk_tail_mean"] > exact["kl_topk_tail_mean"]
    assert low["top1_agreement"] > 0.9


@pytest.mark.slow  # starts a process
def test_inspect_precision_check_cli(tiny_cache):
    import subprocess
    import sys

    from conftest import REPO
    r = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(tiny_cache), "--json", "--precision-check",
                        "--audit-sequences", "2"], capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout)["precision_check"]
    for key in ("logz_abs_diff_max", "logz_abs_diff_mean", "top1_agreement", "kl_topk_tail_mean", "cache_precision"):
        assert key in got
