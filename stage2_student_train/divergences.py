"""The divergences a KD loss can use between the teacher's and the student's bucket distributions
(``kd.divergence``), as pure functions of log-probabilities.

Each takes ``log_q`` (teacher) and ``log_s`` (student), [N, B] log-probabilities over the same B
buckets (normalised over the valid ones), and an optional [N, B] validity ``mask``, and returns
the per-row divergence [N]. Masked buckets, and buckets where both sides are empty (-inf), add 0;
no NaN reaches the gradient. The arithmetic is whatever dtype the inputs have (the losses call
these in float64). The math and what each one is for: docs/loss-math.md ("Divergences").
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NAMES = ("forward_kl", "reverse_kl", "jsd")


def _weighted_log_ratio(log_a: Tensor, log_b: Tensor, mask: Tensor | None) -> Tensor:
    """``sum_b a_b (log a_b - log b_b)`` over the buckets where a > 0 (and ``mask``)."""
    keep = log_a > float("-inf")
    if mask is not None:
        keep = keep & mask
    log_a, log_b = log_a.masked_fill(~keep, 0.0), log_b.masked_fill(~keep, 0.0)
    return (log_a.exp() * keep * (log_a - log_b)).sum(-1)


def forward_kl(log_q: Tensor, log_s: Tensor, mask: Tensor | None = None) -> Tensor:
    """``KL(q || s) = sum_b q_b (log q_b - log s_b)``: mass-covering (the student pays wherever
    the teacher has mass it lacks). Gradient w.r.t. the student's logits over the buckets:
    ``s - q``."""
    return _weighted_log_ratio(log_q, log_s, mask)


def reverse_kl(log_q: Tensor, log_s: Tensor, mask: Tensor | None = None) -> Tensor:
    """``KL(s || q) = sum_b s_b (log s_b - log q_b)``: mode-seeking (the student pays for mass
    where the teacher has little). Gradient w.r.t. the student's logits:
    ``s_b (log s_b - log q_b - KL(s || q))``. Infinite where ``q_b = 0 < s_b``: callers floor an
    empty teacher bucket first."""
    return _weighted_log_ratio(log_s, log_q, mask)


def generalised_jsd(log_q: Tensor, log_s: Tensor, beta: float, mask: Tensor | None = None) -> Tensor:
    """The generalised Jensen-Shannon divergence of TRL's GKD (Agarwal et al. 2024):
    ``m = beta q + (1 - beta) s``, ``JSD_beta = beta KL(q || m) + (1 - beta) KL(s || m)``,
    for ``0 < beta < 1`` (beta = 0.5: the symmetric JSD, at most log 2). Finite for any q, s
    (``m > 0`` wherever either is). Small beta behaves like ``beta`` times forward KL, beta near 1
    like ``1 - beta`` times reverse KL (first order; TRL's beta = 0 / 1 ARE those KLs, here the
    separate ``forward_kl`` / ``reverse_kl``)."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"generalised_jsd needs 0 < beta < 1, got {beta}")
    empty = (log_q == float("-inf")) & (log_s == float("-inf"))  # finite placeholders: no NaN gradient
    log_m = torch.logaddexp(log_q.masked_fill(empty, 0.0) + math.log(beta),
                            log_s.masked_fill(empty, 0.0) + math.log1p(-beta)).masked_fill(empty, float("-inf"))
    return beta * _weighted_log_ratio(log_q, log_m, mask) + (1.0 - beta) * _weighted_log_ratio(log_s, log_m, mask)


def divergence(log_q: Tensor, log_s: Tensor, kind: str = "forward_kl", beta: float = 0.5,
               mask: Tensor | None = None) -> Tensor:
    """``kind`` (one of `NAMES`) between teacher ``log_q`` and student ``log_s``, per row."""
    if kind == "forward_kl":
        return forward_kl(log_q, log_s, mask)
    if kind == "reverse_kl":
        return reverse_kl(log_q, log_s, mask)
    if kind == "jsd":
        return generalised_jsd(log_q, log_s, beta, mask)
    raise ValueError(f"unknown divergence {kind!r} (choose from {', '.join(NAMES)})")
