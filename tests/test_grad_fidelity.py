"""Gradient fidelity: the tail bucket's error on the worked example, and the fidelity measure
on a real tiny cache (each mode's gradient through its registry entry vs the exact s - p)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import grad_fidelity
from conftest import stage1_overrides
from pipeline.cache import CacheReader
from pipeline.config import load_config
from stage2_student_train.data import array_names, load_batch
from stage2_student_train.objective import flat_targets


def test_the_worked_example_reproduces_the_tail_buckets_error():
    ex = grad_fidelity.worked_example()
    assert [round(x, 3) for x in ex["exact"]] == [-0.270, 0.010, 0.080, 0.180]
    assert [round(x, 3) for x in ex["union"]] == [-0.270, 0.010, 0.130, 0.130]
    # By hand: s = softmax([0, .3, 0, 0]); kept {0, 1}; T = .2, S = s_2 + s_3; others get s_v (1 - T/S).
    s = torch.softmax(torch.tensor([0.0, 0.3, 0.0, 0.0], dtype=torch.float64), -1)
    outside = s[2] * (1 - 0.2 / (s[2] + s[3]))
    assert abs(ex["union"][2] - float(outside)) < 1e-12 and abs(ex["union"][3] - float(outside)) < 1e-12


def test_agreement_is_cosine_and_norm_ratio_over_all_positions():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(5, 30, generator=g, dtype=torch.float64)
    a = grad_fidelity.Agreement()
    a.add(2 * e[:3], e[:3])
    a.add(2 * e[3:], e[3:])
    r = a.result()
    assert abs(r["cosine"] - 1) < 1e-12 and abs(r["norm_ratio"] - 2) < 1e-12 and abs(r["position_cosine"] - 1) < 1e-12
    b = grad_fidelity.Agreement()
    noisy = e + torch.randn(5, 30, generator=g, dtype=torch.float64)
    b.add(noisy, e)
    want = float((noisy * e).sum() / (noisy.norm() * e.norm()))
    assert abs(b.result()["cosine"] - want) < 1e-12


@pytest.fixture(scope="module")
def fidelity_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory):
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("fidelity") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{
        "cache.samples": 12, "cache.store_hidden": True, "cache.store_head": True})), show_progress=False)
    return cache


@pytest.mark.slow
def test_fidelity_reads_each_modes_gradient_through_the_registry_on_a_real_cache(fidelity_cache, tiny_teacher_dir):
    """On cached rows: topk_tail's gradient is s - p on the top-k and s_v (1 - T/S) beyond; sampled's
    is s - c/N; and measure() reports cosine 1 / ratio 1 for a mode against itself."""
    reader = CacheReader(fidelity_cache)
    i = list(reader.split_indices("eval"))[0]
    batch = load_batch(reader, np.asarray([i]), array_names(reader, need_hidden=True, need_samples=True))
    rows = flat_targets(batch, torch.device("cpu"))
    logits = 2 * torch.randn(rows["targets"].shape[0], reader.spec.vocab_size, generator=torch.Generator().manual_seed(0))
    s = torch.softmax(logits.double(), -1)
    got = grad_fidelity.mode_logit_grad("topk_tail", logits, rows, None).double()
    ids, p = rows["topk_ids"], rows["topk_logprobs"].double().exp()
    t = rows["topk_log_tail"].double().exp()
    s_tail = 1 - s.gather(-1, ids).sum(-1)
    want = s * (1 - t / s_tail)[:, None]
    want.scatter_(1, ids, s.gather(-1, ids) - p)
    torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-6)
    got = grad_fidelity.mode_logit_grad("sampled", logits, rows, None).double()
    w = torch.zeros_like(s).scatter_add_(1, rows["draw_ids"], rows["draw_counts"].double() / 12)
    torch.testing.assert_close(got, s - w, rtol=2e-3, atol=2e-6)
    a = grad_fidelity.Agreement()
    a.add(got, got)
    assert abs(a.result()["cosine"] - 1) < 1e-9
