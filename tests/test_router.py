"""Projector + student-aware router: routing, load balance, gradients (anti-collapse), helpers."""

from __future__ import annotations

import pytest
import torch

from stage2_student_train.router import (ProjectorRouter, projected_logits, projector_targets_loss,
                                         topk_schedule)

DT, DS, N = 12, 8, 64


def make(num_experts: int = 4, noise_std: float = 1.0, seed: int = 0) -> ProjectorRouter:
    torch.manual_seed(seed)
    return ProjectorRouter(DT, DS, num_experts=num_experts, noise_std=noise_std).double()


def inputs(seed: int = 1, n: int = N) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, DT, generator=g, dtype=torch.float64),
            torch.randn(n, DS, generator=g, dtype=torch.float64))


def force_expert0(router: ProjectorRouter, margin: float) -> None:
    with torch.no_grad():
        router.gate.weight.zero_()
        router.gate.bias.copy_(torch.tensor([margin] + [-margin] * (router.num_experts - 1)))


@pytest.mark.parametrize("margin", [10.0, 1e4])  # 1e4: the other experts' gate probs underflow to 0
def test_load_balance_finite_when_experts_get_no_tokens(margin):
    router = make().eval()
    force_expert0(router, margin)
    t, s = inputs()
    out = router(t, s, top_k=1)
    assert torch.equal(out.utilisation, torch.tensor([1.0, 0.0, 0.0, 0.0]))
    assert torch.isfinite(out.load_balance) and out.load_balance.item() >= 0
    # E * f_0 * P_0 with f_0 = 1 and P_0 ~ 1: the worst imbalance scores ~E.
    assert out.load_balance.item() == pytest.approx(4.0, rel=1e-3)
    out.load_balance.backward()
    assert all(torch.isfinite(p.grad).all() for p in router.gate.parameters())


def test_load_balance_all_experts_used_matches_formula():
    router = make().train()
    t, s = inputs(n=512)
    out = router(t, s, top_k=2)
    u = out.utilisation
    assert (u > 0).all() and u.sum().item() == pytest.approx(1.0)
    expected = 4 * (u * out.gate_probs.mean(dim=0)).sum()
    assert torch.isfinite(out.load_balance) and out.load_balance.item() >= 0
    assert out.load_balance.item() == pytest.approx(expected.item(), rel=1e-6)
    assert out.gate_probs.shape == (512, 4)
    assert torch.allclose(out.gate_probs.sum(dim=-1), torch.ones(512, dtype=out.gate_probs.dtype))


def test_mixing_matches_dense_reference():
    router = make().eval()
    t, s = inputs()
    out = router(t, s, top_k=2)
    logits = router.gate(torch.cat([s, t], dim=-1))
    top_l, top_i = logits.topk(2, dim=-1)
    w = torch.zeros_like(logits).scatter(1, top_i, top_l.softmax(-1))  # [N, E]
    y = torch.einsum("nd,eds->nes", t, router.weight) + router.bias  # every expert, [N, E, Ds]
    assert torch.allclose(out.projected, (w.unsqueeze(-1) * y).sum(dim=1), atol=1e-12)


def test_gate_learns_from_output_and_load_balance():
    router = make().train()
    t, s = inputs()
    out = router(t, s, top_k=2)
    (out.projected.sum() + out.load_balance).backward()
    for p in (router.gate.weight, router.gate.bias, router.weight, router.bias):
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    router.zero_grad(set_to_none=True)
    router(t, s, top_k=1).load_balance.backward()  # the balance term alone moves the gate
    assert router.gate.weight.grad.abs().sum() > 0


def test_student_hidden_gets_no_gradient_but_steers_the_gate():
    router = make().train()
    t, s = inputs()
    s.requires_grad_(True)
    out = router(t, s, top_k=2)
    (out.projected.sum() + out.load_balance).backward()
    assert s.grad is None or torch.count_nonzero(s.grad) == 0
    router.eval()
    other = router(t, s.detach() + 1.0, top_k=2).gate_probs
    assert not torch.allclose(router(t, s.detach(), top_k=2).gate_probs, other)


def _targets(seed: int = 3, vocab: int = 30, k: int = 5, m: int = 6):
    g = torch.Generator().manual_seed(seed)
    nxt = torch.randint(0, vocab, (N,), generator=g)
    cand = torch.cat([nxt[:, None], torch.randint(0, vocab, (N, m - 1), generator=g)], dim=1)
    mapped = torch.stack([torch.randperm(vocab, generator=g)[:k] for _ in range(N)])
    logp = torch.randn(N, k, generator=g, dtype=torch.float64).log_softmax(-1)
    mask = torch.rand(N, k, generator=g) > 0.3
    mask[0] = False  # a position whose teacher ids all failed to map
    head = torch.randn(vocab, DS, generator=g, dtype=torch.float64)
    return head, nxt, mapped, logp, mask, cand


def test_anti_collapse_projector_gradients_independent_of_student():
    head, nxt, mapped, logp, mask, cand = _targets()
    t, s_a = inputs(seed=1)
    s_b = torch.randn_like(s_a) * 5
    grads = []
    for s in (s_a, s_b):
        router = make().eval()
        with torch.no_grad():
            router.gate.weight[:, :DS] = 0  # the student columns: routing is then identical
        head_param = torch.nn.Parameter(head.clone())
        out = router(t, s, top_k=2)
        loss = projector_targets_loss(out.projected, head_param.detach(), nxt, mapped, logp, mask, cand)
        loss.backward()
        assert head_param.grad is None  # the projector cannot move the student's head
        grads.append([router.weight.grad, router.bias.grad, router.gate.bias.grad, router.gate.weight.grad[:, DS:]])
    for ga, gb in zip(*grads):
        assert ga.abs().sum() > 0 and torch.equal(ga, gb)
    # Positive control: an undetached head does receive gradient.
    head_param = torch.nn.Parameter(head.clone())
    projector_targets_loss(make().eval()(t, s_a, 2).projected, head_param, nxt, mapped, logp, mask, cand).backward()
    assert head_param.grad.abs().sum() > 0


def test_projector_targets_loss_matches_dense_reference():
    head, nxt, mapped, logp, mask, cand = _targets()
    proj = torch.randn(N, DS, dtype=torch.float64, requires_grad=True)
    loss = projector_targets_loss(proj, head, nxt, mapped, logp, mask, cand)
    full = proj @ head.T  # [N, V], reference only
    z_c = full.gather(1, cand)
    ce = torch.logsumexp(z_c, -1) - full.gather(1, nxt[:, None]).squeeze(1)
    kl = torch.zeros(N, dtype=torch.float64)
    for n in range(N):
        valid = mask[n]
        if valid.any():
            q = logp[n][valid].softmax(-1)
            log_r = full[n, mapped[n][valid]].log_softmax(-1)
            kl[n] = (q * (q.log() - log_r)).sum()
    assert kl[0] == 0 and (kl[1:] > 0).any()
    assert loss.item() == pytest.approx((ce + kl).mean().item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(proj.grad).all()
    with pytest.raises(ValueError, match="next student token"):
        projector_targets_loss(proj, head, (nxt + 1) % 30, mapped, logp, mask, cand)


def test_single_expert_is_a_plain_linear_projector():
    router = make(num_experts=1).train()  # noise on: it must not matter with one expert
    t, s = inputs()
    out = router(t, s, top_k=3)  # k is clamped to E
    assert torch.allclose(out.projected, torch.addmm(router.bias[0], t, router.weight[0]), atol=1e-12, rtol=0)
    assert out.load_balance.item() == 0.0  # defined as 0 for E == 1 (the formula's constant 1 is dropped)
    assert torch.equal(out.gate_probs, torch.ones(N, 1, dtype=torch.float64))
    assert torch.equal(out.utilisation, torch.ones(1))


def test_topk_schedule():
    # Rounds halves up: 4 -> 1 at progress 0.5 is 2.5 -> 3.
    assert [topk_schedule(4, 1, p) for p in (0.0, 0.5, 1.0)] == [4, 3, 1]
    assert [topk_schedule(1, 4, p) for p in (0.0, 0.5, 1.0)] == [1, 3, 4]
    assert topk_schedule(4, 1, 0.4) == 3 and topk_schedule(4, 1, 0.6) == 2
    assert {topk_schedule(2, 2, p) for p in (-1.0, 0.0, 0.3, 1.0, 5.0)} == {2}
    assert topk_schedule(4, 1, -0.5) == 4 and topk_schedule(4, 1, 7.0) == 1


def test_projected_logits_equals_dense_gather():
    g = torch.Generator().manual_seed(5)
    proj = torch.randn(N, DS, generator=g, dtype=torch.float64)
    head = torch.randn(50, DS, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (N, 7), generator=g)
    got = projected_logits(proj, head, ids)
    assert got.shape == (N, 7)
    assert torch.allclose(got, (proj @ head.T).gather(1, ids), atol=1e-12)


def test_eval_is_deterministic_train_is_noisy():
    router = make(noise_std=1.0)
    t, s = inputs()
    router.eval()
    a, b = router(t, s, top_k=2), router(t, s, top_k=2)
    assert torch.equal(a.projected, b.projected) and torch.equal(a.utilisation, b.utilisation)
    router.train()
    torch.manual_seed(11)
    c = router(t, s, top_k=2)
    d = router(t, s, top_k=2)
    assert not torch.equal(c.projected, d.projected)
    assert torch.equal(c.gate_probs, a.gate_probs)  # gate_probs are noise-free
    torch.manual_seed(11)
    assert torch.equal(router(t, s, top_k=2).projected, c.projected)  # noise comes from torch's RNG
