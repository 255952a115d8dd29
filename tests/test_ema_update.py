"""The EMA update (batched with foreach calls) equals its per-tensor formula bit for bit, with the
decay warm-up ``min(decay, (1 + n) / (10 + n))``."""

import torch

from stage2_student_train.optim import EMA


def test_ema_update_is_its_formula_bit_for_bit():
    torch.manual_seed(0)
    params = [("w", torch.nn.Parameter(torch.randn(300, 70))), ("b", torch.nn.Parameter(torch.randn(7))),
              ("frozen", torch.nn.Parameter(torch.randn(3), requires_grad=False))]
    ema = EMA(params, 0.99)
    assert set(ema.shadow) == {"w", "b"}
    reference = {n: p.detach().clone() for n, p in params[:2]}
    for n_updates in range(30):
        for _, p in params:
            p.data.add_(torch.randn_like(p))
        d = min(0.99, (1 + n_updates) / (10 + n_updates))
        for n, p in params[:2]:
            reference[n].mul_(d).add_(p.detach(), alpha=1 - d)
        ema.update(params)
    assert all(torch.equal(reference[n], ema.shadow[n]) for n in reference)
    assert not torch.equal(ema.shadow["w"], params[0][1].detach())  # it lags the weights
