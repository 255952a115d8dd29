"""Gradient fidelity: the tail bucket's error on the worked example, and the fidelity measure
on a real tiny cache (each mode's gradient through its registry entry vs the exact s - p)."""

from __future__ import annotations

import torch

from bench import grad_fidelity


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
