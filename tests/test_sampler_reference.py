"""The two-level sampler (``sampling.draw_from_weights``) against the full-vocabulary inverse CDF
it replaced: for the same uniforms the draws are the same, except where a uniform falls within
float rounding of a CDF step (then the neighbouring id). The reference is a verbatim copy of the
replaced implementation."""

from __future__ import annotations

import pytest
import torch

from stage1_teacher_cache import sampling


def reference_draw(logits: torch.Tensor, logz: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The sampler before the two-level scan: exp, cumsum over the whole vocabulary, searchsorted."""
    cdf = torch.cumsum(torch.exp(logits - logz[:, None]), dim=-1)  # [n, V] fp32
    last = cdf[:, -1:]
    target = (u.to(cdf.device, torch.float64) * last.double()).to(cdf.dtype)
    target = torch.minimum(target, torch.nextafter(last, torch.zeros_like(last)))  # never C itself
    return torch.searchsorted(cdf, target, right=True)


def teacher_like_logits(n: int, vocab: int, seed: int) -> torch.Tensor:
    """fp32 logits with a real LM's shape of distribution: a few dominant ids, a long tail."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, vocab, generator=g) * 2.0
    z[:, torch.randint(vocab, (8,), generator=g)] += 9.0
    return z


@pytest.mark.parametrize("n,vocab,samples,block", [
    (64, 1000, 48, None), (32, 50257, 48, None), (32, 49152, 48, None), (16, 151936, 48, None),
    (32, 49152, 48, 16), (16, 4099, 12, 256), (8, 37, 200, 16)])
def test_two_level_draws_match_the_full_vocabulary_scan(n, vocab, samples, block):
    logits = teacher_like_logits(n, vocab, seed=vocab + n)
    u = torch.rand(n, samples, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = reference_draw(logits, torch.logsumexp(logits, -1), u)
    # What stage 1 passes: the exponentials from the top-1 logit, not normalised.
    ours = sampling.draw_from_weights(torch.exp(logits - logits.max(-1, keepdim=True).values), u, block)
    differ = ours != reference
    mismatches = int(differ.sum())
    # Both sides compare fp32 roundings of the CDF (the reference's entries are exp(z - logZ), ours
    # exp(z - max) rounded on their own), so a uniform within ~1 fp32 ulp (6e-8 near 1) of a step can
    # land on either side: about ulp / step of the draws (measured on logits like these: ~0.15% at
    # V ~ 50k, ~0.4% at 151936; all of them ties).
    assert mismatches <= max(2, reference.numel() // 50), f"{mismatches} of {reference.numel()} draws differ"
    cdf = torch.cumsum(torch.softmax(logits.double(), -1), -1)
    rows, cols = torch.nonzero(differ, as_tuple=True)
    lo, hi = torch.minimum(ours, reference)[rows, cols], torch.maximum(ours, reference)[rows, cols]
    # Ids lo .. hi - 1 all end within rounding of u: the steps between the two draws are a tie.
    at = u[rows, cols]
    assert ((cdf[rows, lo] - at).abs() < 5e-7).all() and ((cdf[rows, hi - 1] - at).abs() < 5e-7).all(), \
        "a mismatch whose uniform is not within rounding of the CDF steps between the two ids"


def test_the_comparison_can_fail_on_a_wrong_sampler():
    """A sampler off by one id (drawing the next token up) is caught by the same count."""
    logits = teacher_like_logits(32, 1000, seed=3)
    u = torch.rand(32, 48, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    reference = reference_draw(logits, torch.logsumexp(logits, -1), u)
    shifted = (sampling.draw_from_weights(torch.exp(logits - logits.max(-1, keepdim=True).values), u) + 1) % 1000
    assert int((shifted != reference).sum()) > reference.numel() // 2


@pytest.mark.parametrize("block", [16, 64])
def test_zero_weight_ids_and_blocks_are_never_drawn(block):
    """Whole blocks of zero weight, zero ids at both ends and inside blocks, u at 0 and just below
    1: every draw has positive weight, also when the last block is short."""
    vocab = 16 * 37 + 5
    w = torch.rand(4, vocab, generator=torch.Generator().manual_seed(1))
    w[:, :block * 2] = 0.0           # leading zero blocks
    w[:, 300:300 + 3 * block] = 0.0  # zero blocks in the middle
    w[:, ::3] = 0.0                  # zero ids inside every block
    w[:, -7:] = 0.0                  # trailing zeros, short last block included
    w[1] = 0.0
    w[1, 401] = 1e-30                # one id holds all the mass, tiny
    u = torch.tensor([0.0, 1e-300, 0.5, 1 - 2 ** -53, 1 - 1e-9, 0.999999]).double().expand(4, -1).contiguous()
    u = torch.cat([u, torch.rand(4, 2000, generator=torch.Generator().manual_seed(2), dtype=torch.float64)], 1)
    ids = sampling.draw_from_weights(w, u, block)
    assert (w.gather(1, ids) > 0).all()
    assert (ids[1] == 401).all()
