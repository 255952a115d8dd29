"""Stage-2 training losses: cross-entropy and the KD terms, as small pure torch functions.

The student's full-vocabulary log-probabilities ``logp`` [N, V] come from ONE fp32 ``log_softmax``
done by the caller and shared by all terms; nothing here normalises over the full vocabulary
again. The caller gathers, in ONE ``gather``, the student's log-probs at every id the terms need
(the target and the teacher's top-k): each separate gather would cost a [N, V] scatter in the
backward pass. Every function returns a per-position loss [N]; the caller masks and averages.

Bucket distributions: a set of M ids plus one *tail* bucket holding the rest of the mass,
``log b = [log p_1 .. log p_M, log(1 - sum_i p_i)]``. The tail is floored at ``TAIL_FLOOR``
(1e-12): cached fp16/bf16 teacher log-probs are rounded (relative error up to ~1e-3), so their
exponentials can sum slightly above 1, and ``log(1 - sum)`` would be NaN; fp32 rounding can do the
same for a very peaked student. The floor keeps the bucket finite and its KL contribution
negligible (~1e-12 * log-ratio). KL over buckets: ``KL(q || s) = sum_b q_b (log q_b - log s_b)``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

TAIL_FLOOR = 1e-12
_MAX_LSE = math.log1p(-TAIL_FLOOR)  # log of the largest subset mass allowed: 1 - TAIL_FLOOR


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); NaN-free gradients."""
    near0 = x > -math.log(2.0)
    a = torch.where(near0, x, torch.full_like(x, -1.0))  # safe placeholders for the
    b = torch.where(near0, torch.full_like(x, -1.0), x)  # branch that is not taken
    return torch.where(near0, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))


def _bucket_mask(mask: Tensor | None) -> Tensor | None:
    """[N, M] validity mask -> [N, M+1] (the tail bucket is always valid)."""
    return None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)


def fold_with_tail(logp_subset: Tensor, mask: Tensor | None = None) -> Tensor:
    """Fold M log-probs into M+1 bucket log-probs: ``[log p_1 .. log p_M, log(1 - sum_i p_i)]``.

    Entries with ``mask == False`` are dropped (log-prob -inf, left out of the tail sum).
    tail = log1p(-exp(logsumexp(log p))), with the logsumexp clamped to log(1 - TAIL_FLOOR) so the
    tail is >= TAIL_FLOOR (no gradient flows through a clamped tail).
    """
    if mask is not None:
        logp_subset = logp_subset.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(logp_subset, dim=-1, keepdim=True).clamp(max=_MAX_LSE)
    return torch.cat([logp_subset, _log1mexp(lse)], dim=-1)


def temper(log_buckets: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """Temper bucket log-probs: ``log softmax(log b / tau)`` over the valid buckets (masked -> -inf).

    tau = 1 leaves a normalised distribution unchanged (it only renormalises).
    """
    x = log_buckets / tau
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def _kl(log_q: Tensor, log_s: Tensor, mask: Tensor | None = None) -> Tensor:
    """``sum_b q_b (log q_b - log s_b)`` over valid buckets; masked buckets add 0 (and no NaN grad)."""
    if mask is not None:
        log_q, log_s = log_q.masked_fill(~mask, 0.0), log_s.masked_fill(~mask, 0.0)
    q = log_q.exp() if mask is None else log_q.exp() * mask
    return (q * (log_q - log_s)).sum(-1)


def cross_entropy(logp_target: Tensor, label_smoothing: float = 0.0, logp_mean: Tensor | None = None) -> Tensor:
    """``-(1 - eps) * logp[target] - eps * mean_v logp[v]`` per position.

    ``logp_target`` [N] = the student's log-prob of the target; ``logp_mean`` [N] =
    ``logp.mean(-1)``, needed only when ``eps > 0``. Same value as
    ``F.cross_entropy(..., label_smoothing=eps, reduction="none")``.
    """
    if label_smoothing == 0.0:
        return -logp_target
    return -(1.0 - label_smoothing) * logp_target - label_smoothing * logp_mean


def kd_topk_tail(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, temperature: float = 1.0) -> Tensor:
    """Top-k + tail KD: ``tau^2 * KL(q || s)`` over K+1 buckets.

    Teacher buckets ``p_i = exp(teacher_logprobs_i)``, tail ``1 - sum_i p_i``; student buckets
    ``s_i = exp(logp[ids_i])`` (``student_logp_at_ids`` [N, K] = ``logp.gather(-1, teacher_ids)``),
    tail ``1 - sum_i s_i``; both tempered as ``softmax(log b / tau)`` (see `temper`). Ids must be
    distinct within a row.
    """
    log_t = temper(fold_with_tail(teacher_logprobs.to(student_logp_at_ids.dtype)), temperature)
    log_s = temper(fold_with_tail(student_logp_at_ids), temperature)
    return temperature ** 2 * _kl(log_t, log_s)


def kd_mapped(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor,
              temperature: float = 1.0) -> Tensor:
    """Cross-tokenizer top-k + tail KD: ``tau^2 * KL(q || s)`` over the mapped buckets + tail.

    The teacher's top-k ids are sent through the vocab map (same byte string) to student ids;
    ``mask`` [N, K] is False where an id has no student twin (or repeats one already counted).
    Teacher buckets: ``p_i`` for the mapped ids, tail ``1 - sum_mapped p_i`` (so the unmapped
    top-k mass joins the mass beyond the top-k); student buckets: ``s_i = exp(logp[mapped id])``
    (``student_logp_at_ids``, any value where masked), tail ``1 - sum s_i``; both tempered over
    the valid buckets as in `temper`. A position with no mapped id contributes 0.
    """
    bmask = _bucket_mask(mask)
    log_t = temper(fold_with_tail(teacher_logprobs.to(student_logp_at_ids.dtype), mask), temperature, bmask)
    log_s = temper(fold_with_tail(student_logp_at_ids, mask), temperature, bmask)
    return temperature ** 2 * _kl(log_t, log_s, bmask)


def kd_topk_renorm(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, temperature: float = 1.0,
                   mask: Tensor | None = None) -> Tensor:
    """Renormalised top-k KD: ``tau^2 * KL(q || s)`` over the K cached ids.

    ``q = softmax(teacher_logprobs / tau)``, ``log s = log_softmax(logp[ids] / tau)`` with
    ``student_logp_at_ids`` = ``logp.gather(-1, teacher_ids)`` (= the student's logits at the
    ids, tempered and renormalised over them: log Z cancels). ``teacher_logprobs`` may be any
    logits (only their differences matter). ``mask`` [N, K] drops entries from both sides.
    """
    log_t = teacher_logprobs.to(student_logp_at_ids.dtype) / temperature
    log_s = student_logp_at_ids / temperature
    if mask is not None:
        log_t, log_s = log_t.masked_fill(~mask, float("-inf")), log_s.masked_fill(~mask, float("-inf"))
    return temperature ** 2 * _kl(torch.log_softmax(log_t, dim=-1), torch.log_softmax(log_s, dim=-1), mask)


def kd_union(logp: Tensor, teacher_hidden: Tensor, head: Tensor, teacher_logz: Tensor,
             teacher_ids: Tensor, student_k: int, temperature: float = 1.0) -> Tensor:
    """Union KD: ``tau^2 * KL(q || s)`` over the union of teacher top-K and student top-k ids + tail.

    ids = [teacher_ids | student top-`student_k` of logp (detached)], a fixed [N, K+k] layout whose
    mask drops student ids already among the teacher's. Exact teacher log-probs
    ``log p_j = hidden . head[j] - logZ`` (treated as constants), student ``log s_j = logp[j]``; each
    side gets the tail ``1 - sum_j`` and both are tempered as in `kd_topk_tail`. The teacher rows
    are gathered per position ([N, K+k, D] transient memory; chunk N in the caller if large).
    """
    student_ids = logp.detach().topk(student_k, dim=-1).indices
    fresh = ~(student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1)
    ids = torch.cat([teacher_ids, student_ids], dim=-1)
    mask = torch.cat([torch.ones_like(teacher_ids, dtype=torch.bool), fresh], dim=-1)
    with torch.no_grad():
        rows = head.detach()[ids].to(logp.dtype)  # [N, K+k, D]
        t_logits = torch.einsum("nd,nmd->nm", teacher_hidden.detach().to(logp.dtype), rows)
        t_logp = t_logits - teacher_logz.detach().to(logp.dtype).unsqueeze(-1)
    bmask = _bucket_mask(mask)
    log_t = temper(fold_with_tail(t_logp, mask), temperature, bmask)
    log_s = temper(fold_with_tail(logp.gather(-1, ids), mask), temperature, bmask)
    return temperature ** 2 * _kl(log_t, log_s, bmask)
