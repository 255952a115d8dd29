"""kd.divergence: forward KL, reverse KL and TRL's generalised JSD, against float64 references written
straight from the formulas on fresh random inputs, through every KD loss that takes them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from pipeline.config import load_config
from pipeline.errors import ConfigError
from stage2_student_train import divergences, kd_modes, losses

F64 = torch.float64


def ref_divergence(q: np.ndarray, s: np.ndarray, kind: str, beta: float = 0.5) -> float:
    """One row, plain float64 sums over the buckets (0 log 0 = 0)."""
    def kl(a, b):
        return sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)
    if kind == "forward_kl":
        return kl(q, s)
    if kind == "reverse_kl":
        return kl(s, q)
    m = [beta * x + (1 - beta) * y for x, y in zip(q, s)]
    return beta * kl(q, m) + (1 - beta) * kl(s, m)


@pytest.mark.parametrize("kind", divergences.NAMES)
def test_each_divergence_is_its_formula_with_masks_and_empty_buckets(kind):
    g = torch.Generator().manual_seed(101)
    log_q = torch.log_softmax(3 * torch.randn(6, 9, generator=g, dtype=F64), -1)
    log_s = torch.log_softmax(2 * torch.randn(6, 9, generator=g, dtype=F64), -1)
    mask = torch.rand(6, 9, generator=g, dtype=F64) > 0.2
    mask[:, 0] = True
    if kind != "reverse_kl":  # an empty teacher bucket adds nothing (reverse KL: +inf, floored by callers)
        log_q[0, 3] = float("-inf")
        mask[0, 3] = True
    log_q = torch.log_softmax(log_q.masked_fill(~mask, float("-inf")), -1)
    z = log_s.masked_fill(~mask, float("-inf")).requires_grad_(True)
    log_s = torch.log_softmax(z, -1)
    got = divergences.divergence(log_q, log_s, kind, 0.3, mask)
    got.sum().backward()
    assert torch.isfinite(z.grad).all()
    for r in range(6):
        keep = mask[r].numpy()
        want = ref_divergence(log_q[r].exp().numpy()[keep], log_s[r].detach().exp().numpy()[keep], kind, 0.3)
        assert abs(float(got[r].detach()) - want) <= 1e-12 * max(1.0, abs(want))


def test_reverse_kl_gradient_and_jsd_bounds():
    g = torch.Generator().manual_seed(5)
    log_q = torch.log_softmax(torch.randn(4, 12, generator=g, dtype=F64), -1)
    z = torch.randn(4, 12, generator=g, dtype=F64, requires_grad=True)
    log_s = torch.log_softmax(z, -1)
    rkl = divergences.reverse_kl(log_q, log_s)
    rkl.sum().backward()
    s = log_s.detach().exp()
    want = s * (log_s.detach() - log_q - rkl.detach()[:, None])  # d KL(s || q) / dz
    torch.testing.assert_close(z.grad, want, rtol=1e-10, atol=1e-13)
    jsd = divergences.generalised_jsd(log_q, log_s.detach(), 0.5)
    assert torch.allclose(jsd, divergences.generalised_jsd(log_s.detach(), log_q, 0.5), atol=1e-14)  # symmetric
    assert (jsd > 0).all() and (jsd <= math.log(2)).all()
    assert float(divergences.generalised_jsd(log_q, log_q, 0.7).abs().max()) < 1e-15
    with pytest.raises(ValueError):
        divergences.generalised_jsd(log_q, log_q, 1.0)


# ------------------------------------------------------------------ through the KD losses


def buckets(prob: torch.Tensor, ids: list[int], keep: list[bool] | None = None) -> torch.Tensor:
    """Explicit bucket probabilities: ``prob`` at the kept ids, then the sum of every other id."""
    keep = keep or [True] * len(ids)
    kept = [i for i, k in zip(ids, keep) if k]
    rest = [v for v in range(prob.shape[0]) if v not in kept]
    return torch.stack([prob[i] for i in kept] + [prob[rest].sum()])


def tempered(b: torch.Tensor, tau: float) -> torch.Tensor:
    w = b ** (1 / tau)
    return w / w.sum()


def ref_loss(p: torch.Tensor, z: torch.Tensor, ids_rows, kind: str, tau: float, beta: float, masks=None,
             tail: bool = True) -> torch.Tensor:
    """Per-row ``tau^2 * D(q_tau, s_tau)`` from explicit buckets (float64, autograd through z)."""
    s = torch.softmax(z, -1)
    out = []
    for r, ids in enumerate(ids_rows):
        keep = None if masks is None else masks[r]
        qb, sb = buckets(p[r], ids, keep), buckets(s[r], ids, keep)
        if not tail:
            qb, sb = qb[:-1] / qb[:-1].sum(), sb[:-1] / sb[:-1].sum()
        q, st = tempered(qb, tau), tempered(sb, tau)
        if kind == "forward_kl":
            d = (q * (q.log() - st.log())).sum()
        elif kind == "reverse_kl":
            d = (st * (st.log() - q.log())).sum()
        else:
            m = beta * q + (1 - beta) * st
            d = beta * (q * (q.log() - m.log())).sum() + (1 - beta) * (st * (st.log() - m.log())).sum()
        out.append(tau ** 2 * d)
    return torch.stack(out)


def problem(seed: int, n: int = 5, v: int = 40, k: int = 6):
    g = torch.Generator().manual_seed(seed)
    t_logits = 2.5 * torch.randn(n, v, generator=g, dtype=F64)
    p = torch.softmax(t_logits, -1)
    z = (1.5 * torch.randn(n, v, generator=g, dtype=F64)).requires_grad_(True)
    ids = p.topk(k, -1).indices
    return g, t_logits, p, z, ids


def check(got: torch.Tensor, want: torch.Tensor, z: torch.Tensor) -> None:
    g_got, = torch.autograd.grad(got.sum(), z, retain_graph=True)
    g_want, = torch.autograd.grad(want.sum(), z)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-13)


@pytest.mark.parametrize("kind", divergences.NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_tail_and_renorm_take_each_divergence_exactly(kind, tau):
    _, _, p, z, ids = problem(seed=10 * divergences.NAMES.index(kind) + int(tau))
    logp = torch.log_softmax(z, -1)
    at = logp.gather(-1, ids)
    t_lp = p.log().gather(-1, ids)
    t_tail = torch.log(p.sum(-1) - p.gather(-1, ids).sum(-1))
    got = losses.kd_topk_tail(at, t_lp, tau, teacher_log_tail=t_tail,
                              student_log_tail=losses.student_log_tail(logp, ids, at, exact_below=1.0),
                              divergence=kind, jsd_beta=0.3)
    check(got, ref_loss(p, z, ids.tolist(), kind, tau, 0.3), z)
    got = losses.kd_topk_renorm(logp.gather(-1, ids), t_lp, tau, divergence=kind, jsd_beta=0.3)
    check(got, ref_loss(p, z, ids.tolist(), kind, tau, 0.3, tail=False), z)


@pytest.mark.parametrize("kind", divergences.NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_union_takes_each_divergence_exactly(kind, tau):
    g, _, _, z, _ = problem(seed=7 + int(tau))
    hidden = torch.randn(5, 8, generator=g, dtype=F64)
    head = torch.randn(40, 8, generator=g, dtype=F64)
    t_logits = hidden @ head.T
    p = torch.softmax(t_logits, -1)
    logz = torch.logsumexp(t_logits, -1)
    ids = p.topk(6, -1).indices
    logp = torch.log_softmax(z, -1)
    t_tail = torch.log(p.sum(-1) - p.gather(-1, ids).sum(-1))
    got = losses.kd_union(logp, hidden, head, logz, ids, 5, tau, teacher_log_tail=t_tail, exact_student_tail=True,
                          divergence=kind, jsd_beta=0.6)
    union = []
    for r in range(5):  # teacher top-6 then the student's top-5 not already there
        extra = [i for i in logp[r].detach().topk(5).indices.tolist() if i not in ids[r].tolist()]
        union.append(ids[r].tolist() + extra)
    check(got, ref_loss(p, z, union, kind, tau, 0.6), z)


@pytest.mark.parametrize("kind", ["reverse_kl", "jsd"])
def test_mapped_takes_each_divergence_exactly_over_the_mapped_ids(kind):
    _, _, p, z, ids = problem(seed=31)
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 2] = False
    mask[1, 4] = False
    logp = torch.log_softmax(z, -1)
    at = logp.gather(-1, ids)
    t_tail = torch.log(p.sum(-1) - p.gather(-1, ids).sum(-1))
    got = losses.kd_mapped(at, p.log().gather(-1, ids), mask, 1.5, teacher_log_tail=t_tail,
                           student_log_tail=losses.student_log_tail(logp, ids, at, mask, exact_below=1.0),
                           divergence=kind)
    check(got, ref_loss(p, z, ids.tolist(), kind, 1.5, 0.5, masks=mask.tolist()), z)


def test_reverse_kl_with_an_empty_teacher_tail_is_finite():
    """K = V: both tails are empty; the student's floored tail must not meet a zero teacher bucket."""
    _, _, p, z, _ = problem(seed=3, v=6, k=6)
    ids = torch.arange(6).expand(5, 6)
    logp = torch.log_softmax(z, -1)
    got = losses.kd_topk_tail(logp.gather(-1, ids), p.log(), 1.0, teacher_log_tail=torch.full((5,), -math.inf,
                              dtype=F64), divergence="reverse_kl")
    want = (logp.exp() * (logp - p.log())).sum(-1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_the_registry_refuses_a_divergence_a_mode_cannot_take_in_one_line():
    common = dict(same_tokenizer=True, cache_has={"topk", "hidden", "head", "samples"}, teacher={}, cache_dir="c")
    assert kd_modes.check("union", divergence="jsd", **common).name == "union"
    assert kd_modes.check("topk_tail", divergence="reverse_kl", **common).name == "topk_tail"
    with pytest.raises(ConfigError, match=r"kd.divergence=jsd does not fit kd.mode=sampled: .*never drew") as e:
        kd_modes.check("sampled", divergence="jsd", **common)
    assert "\n" not in str(e.value) and "union" in str(e.value)


@pytest.mark.parametrize("override, match", [("kd.divergence=\"kl\"", "kd.divergence"),
                                             ("kd.jsd_beta=1.0", "kd.jsd_beta")])
def test_config_refuses_an_unknown_divergence_or_beta(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/default.toml", [override])
