"""The cross-tokenizer losses (``stage2_student_train/cross_losses.py``) against float64 references
written from their formulas, on fresh random inputs: values, gradients, and for the sampled mode
the exact expectation over every draw multiset and a Monte Carlo check through stage 1's sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stage2_student_train import cross_losses, kd_modes
from test_sampled_kd import draws, multisets

F64 = torch.float64
VMAP = torch.tensor([3, -1, 0, 3, 5, -1, 1])  # teacher id -> student twin; ids 0 and 3 share twin 3
VS = 7                                        # student ids 2, 4, 6 are nobody's twin


def reference_mapped(logp: torch.Tensor, p: torch.Tensor, vmap: torch.Tensor) -> torch.Tensor:
    """``sum_u q_u log(q_u / s_u) + U log(U / S_none)`` with explicit loops (one row)."""
    q = [0.0] * logp.shape[-1]
    u = 0.0
    for v, pv in enumerate(p.tolist()):
        if vmap[v] >= 0:
            q[int(vmap[v])] += pv
        else:
            u += pv
    twins = {int(x) for x in vmap.tolist() if x >= 0}
    out = sum(qu * (math.log(qu) - logp[i]) for i, qu in enumerate(q) if qu > 0)
    s_none = sum(logp[i].exp() for i in range(logp.shape[-1]) if i not in twins)
    return out + (u * (math.log(u) - s_none.log()) if u > 0 else 0.0)


def _pair(seed: int, n: int = 1, vt: int = 7):
    g = torch.Generator().manual_seed(seed)
    z_t = 1.3 * torch.randn(n, vt, generator=g, dtype=F64)
    z_s = torch.randn(n, VS, generator=g, dtype=F64)
    return torch.log_softmax(z_t, -1), z_s


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapped_full_is_its_formula_with_the_expected_gradient(seed):
    t_logp, z_s = _pair(seed, n=3)
    z = z_s.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    got = cross_losses.kd_mapped_full(logp, t_logp, VMAP)
    for n in range(3):
        want = reference_mapped(logp[n].detach(), t_logp[n].exp(), VMAP)
        assert abs(float(got[n].detach()) - float(want)) <= 1e-12 * max(1.0, abs(float(want)))
    got.sum().backward()
    s, p = logp.detach().exp(), t_logp.exp()
    q = torch.zeros(3, VS, dtype=F64).index_add_(1, VMAP[VMAP >= 0], p[:, VMAP >= 0])
    u = p[:, VMAP < 0].sum(-1, keepdim=True)
    none = torch.tensor([i not in set(VMAP.tolist()) for i in range(VS)])
    want = s - q - u * none * s / (s * none).sum(-1, keepdim=True)
    assert torch.allclose(z.grad, want, rtol=0, atol=1e-12)


def _mapped_sampled_estimator(t_logp: torch.Tensor, k: int):
    """The loss of a batch of draw multisets (rows) for one teacher row, through kd_mapped_sampled."""
    top = t_logp.topk(k).indices
    t_tail = torch.log1p(-t_logp[top].exp().sum())
    twin_ids = VMAP[VMAP >= 0].unique()

    def estimator(logp, ids, counts):
        n = len(ids)
        top_twin = VMAP[top].clamp(min=0).expand(n, k)
        outside = ~(ids.unsqueeze(-1) == top).any(-1)
        draw_twin = VMAP[ids] >= 0
        return cross_losses.kd_mapped_sampled(
            logp.gather(-1, top_twin), t_logp[top].expand(n, k), (VMAP[top] >= 0).expand(n, k),
            logp.gather(-1, VMAP[ids].clamp(min=0)), counts, outside, draw_twin, t_tail.expand(n),
            cross_losses.student_log_no_twin(logp, twin_ids), torch.ones(n, dtype=torch.bool))

    return estimator


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mapped_sampled_expected_gradient_is_exactly_the_mapped_targets_over_every_draw_multiset(seed):
    from test_sampled_kd import exact_expected_gradient

    t_logp, z_s = _pair(seed)
    t_logp, z_s = t_logp[0], z_s[0]
    expected = exact_expected_gradient(_mapped_sampled_estimator(t_logp, 2), t_logp.exp(), z_s, draws=4)
    z = z_s.clone().requires_grad_(True)
    cross_losses.kd_mapped_full(torch.log_softmax(z, -1)[None], t_logp[None], VMAP).sum().backward()
    assert torch.allclose(expected, z.grad, rtol=0, atol=1e-12), (expected - z.grad).abs().max()


@pytest.mark.parametrize("seed", [0, 1])
def test_mapped_sampled_monte_carlo_mean_gradient_matches_the_exact_target(seed):
    """4000 independent draws of 16 tokens through stage 1's own sampler; every student logit within
    5 standard errors of the exact mapped target's gradient."""
    t_logp, z_s = _pair(seed)
    t_logp, z_s = t_logp[0], z_s[0]
    repeats = 4000
    ids, counts = draws(t_logp.expand(repeats, -1).contiguous(), 16, seed + 7)
    z = z_s.expand(repeats, -1).clone().requires_grad_(True)
    _mapped_sampled_estimator(t_logp, 2)(torch.log_softmax(z, -1), ids, counts).sum().backward()
    zx = z_s.clone().requires_grad_(True)
    cross_losses.kd_mapped_full(torch.log_softmax(zx, -1)[None], t_logp[None], VMAP).sum().backward()
    se = z.grad.std(0).clamp(min=1e-4) / repeats ** 0.5
    assert ((z.grad.mean(0) - zx.grad).abs() <= 5 * se).all()


def test_mapped_sampled_value_is_its_formula_and_masked_positions_give_zero():
    t_logp, z_s = _pair(5)
    t_logp = t_logp[0]
    logp = torch.log_softmax(z_s, -1).expand(2, -1)
    ids = torch.tensor([[0, 1, 4, 5, 6], [0, 1, 4, 5, 6]])
    counts = torch.tensor([[1, 0, 2, 1, 1], [1, 0, 2, 1, 1]])
    est = _mapped_sampled_estimator(t_logp, 2)
    got = est(logp, ids, counts)
    top = t_logp.topk(2).indices.tolist()
    p = t_logp.exp()
    tail = 1 - float(p[top].sum())
    out = [(i, c) for i, c in zip(ids[0].tolist(), counts[0].tolist()) if c and i not in top]
    c_out, total = sum(c for _, c in out), int(counts[0].sum())
    scale = tail / c_out / (1 - (1 - tail) ** total)
    entries, u = [], 0.0
    for i in top:
        entries.append((int(VMAP[i]), float(p[i]))) if VMAP[i] >= 0 else None
        u += float(p[i]) if VMAP[i] < 0 else 0.0
    for i, c in out:
        entries.append((int(VMAP[i]), c * scale)) if VMAP[i] >= 0 else None
        u += c * scale if VMAP[i] < 0 else 0.0
    lp = logp[0]
    want = sum(w * (math.log(w) - float(lp[j])) for j, w in entries)
    s_none = float(lp[[2, 4, 6]].exp().sum())
    want += u * (math.log(u) - math.log(s_none))
    assert abs(float(got[0]) - want) <= 1e-12 * max(1.0, abs(want))
    masked = cross_losses.kd_mapped_sampled(*(torch.zeros(1, 2, dtype=F64),) * 2, torch.ones(1, 2, dtype=torch.bool),
                                            torch.zeros(1, 3, dtype=F64), torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool),
                                            torch.ones(1, 3, dtype=torch.bool), torch.tensor([-1.0], dtype=F64),
                                            torch.tensor([-1.0], dtype=F64), torch.tensor([False]))
    assert float(masked) == 0.0


# ---------------------------------------------------------------- ULD


def reference_uld(logp: np.ndarray, t_logp_topk: np.ndarray, t_tail: float) -> float:
    p = np.sort(np.exp(t_logp_topk))[::-1]
    s = np.sort(np.exp(logp))[::-1][:len(p)]
    return float(np.abs(p - s).sum() + abs(t_tail - (1 - s.sum())))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_uld_is_its_formula_and_its_gradient_is_the_sorted_l1s(seed):
    g = torch.Generator().manual_seed(seed)
    vt, vs, k = 40, 30, 6
    t_full = torch.log_softmax(2 * torch.randn(4, vt, generator=g, dtype=F64), -1)
    t_top = t_full.topk(k, -1).values[:, torch.randperm(k, generator=g)]  # the loss sorts them itself
    t_tail = torch.log(1 - t_top.exp().sum(-1))
    z = (1.5 * torch.randn(4, vs, generator=g, dtype=F64)).requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    got = cross_losses.kd_uld(logp, t_top, teacher_log_tail=t_tail)
    for n in range(4):
        want = reference_uld(logp[n].detach().numpy(), t_top[n].numpy(), float(t_tail[n].exp()))
        assert abs(float(got[n]) - want) <= 1e-12
    got.sum().backward()
    zr = z.detach().clone().requires_grad_(True)  # reference: a full sort (differentiable), explicit L1
    s_sorted = torch.softmax(zr, -1).sort(-1, descending=True).values
    p_sorted = t_top.exp().sort(-1, descending=True).values
    ref = (p_sorted - s_sorted[:, :k]).abs().sum(-1) + (t_tail.exp() - s_sorted[:, k:].sum(-1)).abs()
    ref.sum().backward()
    assert torch.allclose(z.grad, zr.grad, rtol=0, atol=1e-10)
    masked = cross_losses.kd_uld(logp.detach(), t_top, torch.tensor([True, False, True, False]), t_tail)
    assert masked[1] == 0 and masked[3] == 0 and masked[0] == got[0]


# ---------------------------------------------------------------- chunk likelihood


def reference_chunks(lp: list[float], length: list[int], lt: list[float], tau: float) -> list[float]:
    out = []
    for j, (n, l_t) in enumerate(zip(length, lt)):
        if n == 0:
            out.append(0.0)
            continue
        l_s = sum(lp[j - n + 1:j + 1]) / tau
        a, b = math.exp(l_t / tau), math.exp(l_s)
        out.append(tau ** 2 * (a * math.log(a / b) + (1 - a) * math.log((1 - a) / (1 - b))))
    return out


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_chunk_likelihood_is_the_binary_kl_of_the_chunk_probabilities(tau):
    g = torch.Generator().manual_seed(int(tau))
    n = 12
    z = torch.randn(n, 9, generator=g, dtype=F64).requires_grad_(True)
    targets = torch.randint(0, 9, (n,), generator=g)
    lp = torch.log_softmax(z, -1).gather(-1, targets[:, None])[:, 0]
    length = torch.tensor([0, 2, 1, 0, 0, 3, 1, 0, 2, 0, 0, 3])
    lt = torch.where(length > 0, -torch.rand(n, generator=g, dtype=F64) * 4 - 0.05, 0.0)
    got = cross_losses.kd_chunk_likelihood(lp, length, lt, tau)
    want = reference_chunks(lp.tolist(), length.tolist(), lt.tolist(), tau)
    assert np.allclose(got.detach().numpy(), want, rtol=1e-12, atol=1e-14)
    got.sum().backward()
    # d/d lp_j of the chunk's loss = tau^2 * (-(a / tau) + (1 - a) b / ((1 - b) tau)) for each j in the chunk
    grad_lp = torch.zeros(n, dtype=F64)
    for j, m in enumerate(length.tolist()):
        if m:
            l_s = float(lp[j - m + 1:j + 1].sum()) / tau
            a, b = math.exp(float(lt[j]) / tau), math.exp(l_s)
            grad_lp[j - m + 1:j + 1] = tau * (-a + (1 - a) * b / (1 - b))
    zr = z.detach().clone().requires_grad_(True)
    (torch.log_softmax(zr, -1).gather(-1, targets[:, None])[:, 0] * grad_lp).sum().backward()
    assert torch.allclose(z.grad, zr.grad, rtol=1e-10, atol=1e-12)


def test_the_new_cross_modes_are_registered_with_their_needs():
    args = dict(same_tokenizer=False, teacher={}, cache_dir="c")
    assert kd_modes.check("mapped_sampled", cache_has={"topk", "samples"}, **args).needs == {"topk", "samples"}
    from pipeline.errors import ConfigError
    with pytest.raises(ConfigError, match="cache.samples"):
        kd_modes.check("mapped_sampled", cache_has={"topk"}, **args)
    with pytest.raises(ConfigError, match="temperature 1"):
        kd_modes.check("mapped_sampled", cache_has={"topk", "samples"}, temperatures=(2.0,), **args)
    assert kd_modes.check("uld", cache_has={"topk"}, **args).tokenizer == "cross"
    assert kd_modes.check("chunk_likelihood", cache_has={"topk"}, **args).needs == {"next_logprob"}


def test_online_cross_reference_sums_the_exact_mapped_kl_over_aligned_positions():
    """bench/quality_cross.mapped_kd_sum: the float32 training form (without the student-independent
    sum q log q) has the float64 reference's gradient, and the eval form its value, summed over the
    aligned target positions through their aligned teacher positions."""
    from bench.quality_cross import mapped_kd_sum

    g = torch.Generator().manual_seed(4)
    t_logp = torch.log_softmax(1.3 * torch.randn(2, 5, 7, generator=g), -1)  # [B, Lt, Vt]
    z = torch.randn(2, 4, VS, generator=g, dtype=F64)                         # [B, Ls-1, Vs]
    batch = {"kd_position": torch.tensor([[True, False, True, True], [False, True, True, False]]),
             "aligned": torch.tensor([[0, -1, 2, 4], [-1, 1, 3, -1]])}
    twins = VMAP[VMAP >= 0].unique()
    zr = z.clone().requires_grad_(True)
    ref = sum(cross_losses.kd_mapped_full(torch.log_softmax(zr[b, j], -1)[None], t_logp[b, t][None].double(), VMAP)
              for b, j, t in [(0, 0, 0), (0, 2, 2), (0, 3, 4), (1, 1, 1), (1, 2, 3)])
    ref.sum().backward()
    zt = z.float().requires_grad_(True)
    train_form = mapped_kd_sum(torch.log_softmax(zt, -1), t_logp, batch, VMAP, twins, with_constant=False)
    train_form.backward()
    assert torch.allclose(zt.grad.double(), zr.grad, atol=1e-6)
    value = mapped_kd_sum(torch.log_softmax(z.float(), -1), t_logp, batch, VMAP, twins)
    assert abs(float(value) - float(ref.sum())) < 1e-5
