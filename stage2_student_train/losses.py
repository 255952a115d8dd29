"""Stage-2 training losses: cross-entropy and the KD terms, as small pure torch functions.

The student's full-vocabulary log-probabilities ``logp`` [N, V] come from ONE fp32 ``log_softmax``
done by the caller and shared by all terms; nothing here normalises over the full vocabulary
again. The caller gathers, in ONE ``gather``, the student's log-probs at every id the terms need
(the target and the teacher's top-k): each separate gather would cost a [N, V] scatter in the
backward pass. Every function returns a per-position loss [N]; the caller masks and averages.
The math, with the reasons for each choice, is in docs/loss-math.md.

Bucket distributions: a set of M ids plus one *tail* bucket holding the rest of the mass,
``log b = [log p_1 .. log p_M, log T]`` with ``T = sum_{v not in set} p_v``. Tempering at tau:
``b_tau = softmax(log b / tau)``. KL over buckets: ``KL(q || s) = sum_b q_b (log q_b - log s_b)``
(buckets where the teacher has no mass add 0). Every KD loss is ``tau^2 * KL(q_tau || s_tau)``.

How the tails are computed (never ``1 - sum`` in the input precision):

- teacher: ``teacher_log_tail`` [N] when the caller has it (an explicit cached tail, or
  ``logsumexp`` over the complement); otherwise ``log1mexp(logsumexp(log p))`` in float64 on the
  K cached values, which is as exact as those values are (a tail below ~1e-7 of an fp32 cache
  is rounding noise: pass the explicit tail to train on it). A teacher tail of 0 (the top-k is
  the whole vocabulary, or rounding put the sum at or above 1) is an empty bucket: it adds 0.
- student: ``student_log_tail`` [N] when the caller passes it (exact: `student_log_tail`, which
  sums the complement directly, only on the rows where ``1 - sum`` would cancel); otherwise
  ``1 - sum`` in float64 on the gathered values (cheap; cancels below ~1e-6 for fp32 ``logp``).
- the floor acts on the TEMPERED scale and only where the student's tail is empty (log -inf: the
  ids cover its vocabulary, or ``1 - sum`` rounded to <= 0): its log becomes
  ``tau * log(TAIL_FLOOR)``, so the tempered bucket is TAIL_FLOOR / Z (Z <= (M+1)^(1-1/tau)) at
  every tau, not ``TAIL_FLOOR^(1/tau)`` (1e-3 at tau = 4). A finite tail, however small, is the
  student's real tail and is left alone. The teacher is never floored (an empty teacher bucket
  adds 0).

The bucket arithmetic runs in float64 ([N, M+1] values: negligible cost); the result comes back
in the student's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .divergences import divergence as bucket_divergence

TAIL_FLOOR = 1e-12
"""The tempered value an EMPTY student tail bucket takes (see the module docstring)."""
EXACT_TAIL_BELOW = {torch.float32: 1e-3, torch.float64: 1e-6}
"""`student_log_tail` sums the complement directly on rows whose ``1 - sum`` tail T is below this
(by ``logp`` dtype; 1e-3 for others): ``1 - sum`` is off by ~eps * 10 / T relative (fp32 log-probs
carry ~1e-6 absolute error), i.e. <= ~1e-3 (fp32) / ~1e-9 (fp64) relative above it."""
F64 = torch.float64


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012); NaN-free gradients.
    x >= 0 (a sum of probabilities at or above 1) gives -inf (an empty bucket), gradient 0."""
    ok = x < 0
    x = torch.where(ok, x, torch.full_like(x, -1.0))
    near0 = x > -math.log(2.0)
    a = torch.where(near0, x, torch.full_like(x, -1.0))  # safe placeholders for the
    b = torch.where(near0, torch.full_like(x, -1.0), x)  # branch that is not taken
    out = torch.where(near0, torch.log(-torch.expm1(a)), torch.log1p(-torch.exp(b)))
    return torch.where(ok, out, torch.full_like(out, float("-inf")))


def _masked(logp_subset: Tensor, mask: Tensor | None) -> Tensor:
    return logp_subset if mask is None else logp_subset.masked_fill(~mask, float("-inf"))


def _bucket_mask(mask: Tensor | None) -> Tensor | None:
    """[N, M] validity mask -> [N, M+1] (the tail bucket is always valid)."""
    return None if mask is None else torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)


def log_tail(logp_subset: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log(1 - sum_i p_i)`` [N] over the valid entries, in float64: ``log1mexp(logsumexp)``.

    As exact as the inputs: the cancellation left is the one already in the rounded ``p_i``.
    A sum at or above 1 gives -inf (empty tail)."""
    return _log1mexp(torch.logsumexp(_masked(logp_subset.to(F64), mask), dim=-1))


def complement_log_mass(logp: Tensor, ids: Tensor, mask: Tensor | None = None) -> Tensor:
    """``log sum_{v not in ids} exp(logp_v)`` [N], summed directly (no cancellation); -inf if the
    ids cover the vocabulary. ``mask`` [N, M] False drops an id from the set. One pass over
    ``logp`` [N, V] (forward and backward): use `student_log_tail` to pay it only where needed."""
    excl = torch.zeros(logp.shape, dtype=torch.bool, device=logp.device)
    rows = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(ids)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask
    excl[rows[keep], ids[keep]] = True  # only True is written: repeated ids are harmless
    return torch.logsumexp(logp.masked_fill(excl, float("-inf")), dim=-1)


def student_log_tail(logp: Tensor, ids: Tensor, logp_at_ids: Tensor | None = None, mask: Tensor | None = None,
                     exact_below: float | None = None) -> Tensor:
    """The student's log-tail ``log sum_{v not in ids} s_v`` [N] (float64), exact where it matters.

    ``log(1 - sum_i s_i)`` from the gathered ``logp_at_ids`` (= ``logp.gather(-1, ids)``; gathered
    here if not given) is accurate to ~eps(dtype) / T relative; on the rows where it is below
    ``exact_below`` (default `EXACT_TAIL_BELOW` for the dtype) the complement is summed directly
    (`complement_log_mass` on those rows only), so the extra full-vocabulary work is proportional
    to the confident rows. ``exact_below=1`` makes every row exact; ``0`` none."""
    if logp_at_ids is None:
        logp_at_ids = logp.gather(-1, ids)
    if exact_below is None:
        exact_below = EXACT_TAIL_BELOW.get(logp.dtype, 1e-3)
    cheap = log_tail(logp_at_ids, mask)
    small = cheap < math.log(exact_below)
    if not bool(small.any()):
        return cheap
    idx = small.nonzero(as_tuple=True)[0]
    exact = complement_log_mass(logp[idx], ids[idx], None if mask is None else mask[idx]).to(F64)
    return cheap.index_put((idx,), exact)


def fold_with_tail(logp_subset: Tensor, mask: Tensor | None = None, tail: Tensor | None = None) -> Tensor:
    """Fold M log-probs into M+1 bucket log-probs ``[log p_1 .. log p_M, log T]`` (float64).

    Entries with ``mask == False`` are dropped (log-prob -inf, left out of the tail). ``tail`` [N]
    = the log-tail when known (see the module docstring); otherwise `log_tail` of the entries."""
    x = _masked(logp_subset.to(F64), mask)
    t = log_tail(x) if tail is None else tail.to(F64)
    return torch.cat([x, t.unsqueeze(-1)], dim=-1)


def temper(log_buckets: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """Temper bucket log-probs: ``log softmax(log b / tau)`` over the valid buckets (masked -> -inf).

    tau = 1 leaves a normalised distribution unchanged (it only renormalises)."""
    x = log_buckets / tau
    if mask is not None:
        x = x.masked_fill(~mask, float("-inf"))
    return torch.log_softmax(x, dim=-1)


def _floor_tail(log_buckets: Tensor, tau: float) -> Tensor:
    """An empty student tail (log -inf, or NaN: ``1 - sum`` at or above 1 from rounding) becomes
    ``tau * log(TAIL_FLOOR)``: after tempering it is TAIL_FLOOR / Z, whatever tau. A finite tail,
    however small, is left as it is (it is the student's real tail)."""
    floor = torch.full_like(log_buckets[:, -1:], tau * math.log(TAIL_FLOOR))
    tail = log_buckets[:, -1:]
    return torch.cat([log_buckets[:, :-1], torch.where(tail > float("-inf"), tail, floor)], dim=-1)


def _tail_kd(student_logp_at_ids: Tensor, teacher_log_buckets: Tensor, temperature: float,
             mask: Tensor | None, student_tail: Tensor | None, divergence: str = "forward_kl",
             jsd_beta: float = 0.5) -> Tensor:
    bmask = _bucket_mask(mask)
    if divergence == "reverse_kl":  # the student's floored mass in an EMPTY teacher tail would cost +inf
        teacher_log_buckets = _floor_tail(teacher_log_buckets, temperature)
    log_t = temper(teacher_log_buckets, temperature, bmask)
    log_s = temper(_floor_tail(fold_with_tail(student_logp_at_ids, mask, student_tail), temperature),
                   temperature, bmask)
    div = bucket_divergence(log_t, log_s, divergence, jsd_beta, bmask)
    return (temperature ** 2 * div).to(student_logp_at_ids.dtype)


def cross_entropy(logp_target: Tensor, label_smoothing: float = 0.0, logp_mean: Tensor | None = None) -> Tensor:
    """``-(1 - eps) * logp[target] - eps * mean_v logp[v]`` per position.

    ``logp_target`` [N] = the student's log-prob of the target; ``logp_mean`` [N] =
    ``logp.mean(-1)``, needed only when ``eps > 0``. Same value as
    ``F.cross_entropy(..., label_smoothing=eps, reduction="none")``.
    """
    if label_smoothing == 0.0:
        return -logp_target
    return -(1.0 - label_smoothing) * logp_target - label_smoothing * logp_mean


def kd_topk_tail(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, temperature: float = 1.0,
                 teacher_log_tail: Tensor | None = None, student_log_tail: Tensor | None = None,
                 divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
    """Top-k + tail KD: ``tau^2 * KL(q_tau || s_tau)`` over K+1 buckets (or ``tau^2 * D(q_tau, s_tau)``
    for another ``divergence``, `divergences.divergence`).

    Teacher buckets ``p_i = exp(teacher_logprobs_i)`` and tail ``T = sum_{v not in top-k} p_v``
    (``teacher_log_tail`` [N] = log T if known, else ``log(1 - sum_i p_i)`` in float64); student
    buckets ``s_i = exp(logp[ids_i])`` (``student_logp_at_ids`` [N, K] =
    ``logp.gather(-1, teacher_ids)``) and tail ``sum_{v not in ids} s_v`` (``student_log_tail``
    [N], e.g. `student_log_tail`, else ``1 - sum_i s_i`` in float64); both tempered as
    ``softmax(log b / tau)``; the student's tail floored after tempering. Ids distinct in a row.
    """
    log_t = fold_with_tail(teacher_logprobs, None, teacher_log_tail)
    return _tail_kd(student_logp_at_ids, log_t, temperature, None, student_log_tail, divergence, jsd_beta)


def kd_mapped(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, mask: Tensor,
              temperature: float = 1.0, teacher_log_tail: Tensor | None = None,
              student_log_tail: Tensor | None = None, divergence: str = "forward_kl",
              jsd_beta: float = 0.5) -> Tensor:
    """Cross-tokenizer top-k + tail KD: ``tau^2 * KL(q_tau || s_tau)`` over the mapped buckets + tail.

    The teacher's top-k ids are sent through the vocab map (same byte string) to student ids;
    ``mask`` [N, K] is False where an id has no student twin (or repeats one already counted).
    Teacher buckets: ``p_i`` for the mapped ids, tail = the mass beyond the top-k plus the unmapped
    top-k mass: ``logaddexp(teacher_log_tail, logsumexp(log p_unmapped))`` when ``teacher_log_tail``
    [N] is given (no cancellation), else ``1 - sum_mapped p_i`` in float64. Student buckets:
    ``s_i = exp(logp[mapped id])`` (``student_logp_at_ids``, any value where masked), tail
    ``sum_{v not in mapped ids} s_v`` (``student_log_tail`` [N], e.g. `student_log_tail` with the
    mapped ids and ``mask``; else ``1 - sum s_i`` in float64); tempered over the valid buckets, the
    student's tail floored after tempering. A position with no mapped id contributes 0.
    """
    t_tail = None
    if teacher_log_tail is not None:
        unmapped = torch.logsumexp(_masked(teacher_logprobs.to(F64), ~mask), dim=-1)
        t_tail = torch.logaddexp(teacher_log_tail.to(F64), unmapped)
    log_t = fold_with_tail(teacher_logprobs, mask, t_tail)
    return _tail_kd(student_logp_at_ids, log_t, temperature, mask, student_log_tail, divergence, jsd_beta)


def kd_topk_renorm(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, temperature: float = 1.0,
                   mask: Tensor | None = None, divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
    """Renormalised top-k KD: ``tau^2 * KL(q || s)`` over the K cached ids (no tail), or
    ``tau^2 * D(q, s)`` for another ``divergence``.

    ``q = softmax(teacher_logprobs / tau)``, ``log s = log_softmax(logp[ids] / tau)`` with
    ``student_logp_at_ids`` = ``logp.gather(-1, teacher_ids)`` (= the student's logits at the
    ids, tempered and renormalised over them: log Z cancels). ``teacher_logprobs`` may be any
    logits (only their differences matter). ``mask`` [N, K] drops entries from both sides.
    """
    log_t = _masked(teacher_logprobs.to(F64) / temperature, mask)
    log_s = _masked(student_logp_at_ids.to(F64) / temperature, mask)
    div = bucket_divergence(torch.log_softmax(log_t, dim=-1), torch.log_softmax(log_s, dim=-1), divergence,
                            jsd_beta, mask)
    return (temperature ** 2 * div).to(student_logp_at_ids.dtype)


def kd_union(logp: Tensor, teacher_hidden: Tensor, head: Tensor, teacher_logz: Tensor,
             teacher_ids: Tensor, student_k: int, temperature: float = 1.0,
             teacher_log_tail: Tensor | None = None, exact_student_tail: bool = False,
             divergence: str = "forward_kl", jsd_beta: float = 0.5) -> Tensor:
    """Union KD: ``tau^2 * KL(q_tau || s_tau)`` over the union of teacher top-K and student top-k ids + tail
    (``tau^2 * D(q_tau, s_tau)`` for another ``divergence``: the student's own top ids are buckets
    with exact teacher values, which reverse KL and JSD weight by the student's mass).

    ids = [teacher_ids | student top-`student_k` of logp (detached)], a fixed [N, K+k] layout whose
    mask drops student ids already among the teacher's. Exact teacher log-probs
    ``log p_j = hidden . head[j] - logZ`` (treated as constants), student ``log s_j = logp[j]``.
    Teacher tail (the mass outside the union): with ``teacher_log_tail`` [N] (log of the mass
    beyond the teacher's top-K) it is ``T_K - sum_fresh p_j`` =
    ``log T_K + log1mexp(logsumexp(log p_fresh) - log T_K)``, else ``1 - sum_union p_j`` in
    float64; exactly empty when the union is the whole vocabulary. Student tail: ``1 - sum`` in
    float64, or with ``exact_student_tail`` `student_log_tail` (exact; costs a full-vocabulary
    pass on the confident rows, see docs/loss-math.md). Both sides tempered,
    the student's tail floored after tempering. The teacher rows are gathered per position
    ([N, K+k, D] transient memory; chunk N in the caller if large).
    """
    student_ids = logp.detach().topk(student_k, dim=-1).indices
    fresh = ~(student_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)).any(-1)
    ids = torch.cat([teacher_ids, student_ids], dim=-1)
    mask = torch.cat([torch.ones_like(teacher_ids, dtype=torch.bool), fresh], dim=-1)
    with torch.no_grad():
        rows = head.detach()[ids].to(logp.dtype)  # [N, K+k, D]
        t_logits = torch.einsum("nd,nmd->nm", teacher_hidden.detach().to(logp.dtype), rows)
        t_logp = t_logits.to(F64) - teacher_logz.detach().to(F64).unsqueeze(-1)
        if teacher_log_tail is None:
            t_tail = log_tail(t_logp, mask)
        else:
            lt = teacher_log_tail.detach().to(F64)
            lse_fresh = torch.logsumexp(_masked(t_logp[:, teacher_ids.shape[1]:], fresh), dim=-1)
            t_tail = torch.where(lse_fresh > float("-inf"), lt + _log1mexp(lse_fresh - lt), lt)
        whole = mask.sum(-1) >= logp.shape[-1]  # the union is the vocabulary: nothing is left
        t_tail = t_tail.masked_fill(whole, float("-inf"))
    at_ids = logp.gather(-1, ids)
    s_tail = student_log_tail(logp, ids, at_ids, mask) if exact_student_tail else None
    log_t = fold_with_tail(t_logp, mask, t_tail)
    return _tail_kd(at_ids, log_t, temperature, mask, s_tail, divergence, jsd_beta)


def kd_sampled(student_logp_at_samples: Tensor, counts: Tensor, temperature: float = 1.0) -> Tensor:
    """Random-sampling KD (RS-KD): ``sum_i w_i (log w_i - log s(id_i))`` per position, ``w_i = c_i / N``.

    The cache holds, per position, the distinct ids of ``N`` tokens drawn with replacement from the
    teacher's full distribution ``p`` (temperature 1) and their counts ``c_i`` (``counts`` [N_pos, S],
    0 = padding; ``N = sum_i c_i``). ``student_logp_at_samples`` [N_pos, S] = ``logp.gather(-1, ids)``
    from the student's FULL-vocabulary ``log_softmax`` (any value where the count is 0).

    Gradient: w.r.t. the student's logits ``z``, ``d/dz_v = sum_i w_i (s_v - [v = id_i]) = s_v - w_v``
    (``sum_i w_i = 1``), and ``E[w_v] = p_v``, so ``E[grad] = s - p``: exactly the gradient of full
    ``KL(p || s)``, for every student (unbiased; its variance falls as 1 / N). Value: ``E[loss] =
    KL(p || s) + H(p) - E[H(w)] >= KL(p || s)``, a student-independent upward bias (it is not an
    estimate of the KL, its gradient is). A position with no draws contributes 0.

    Only temperature 1: ``p`` is sampled as it is, and tempering would need importance weights
    ``p_tau / p`` over a normaliser ``sum_v p_v^(1/tau)`` that samples do not give; refused.
    """
    if temperature != 1.0:
        raise ValueError(f"kd_sampled holds at temperature 1 only (the cache samples the teacher at 1), "
                         f"got {temperature}")
    c = counts.to(F64)
    total = c.sum(-1, keepdim=True)
    w = c / total.clamp(min=1.0)
    keep = c > 0
    log_w = torch.where(keep, w, torch.ones_like(w)).log()
    lp = student_logp_at_samples.to(F64).masked_fill(~keep, 0.0)
    return (w * (log_w - lp)).sum(-1).to(student_logp_at_samples.dtype)


def draws_outside_probability(log_tail: Tensor, draws: Tensor) -> Tensor:
    """``1 - (1 - T)^N`` [N_pos] (float64): the probability that at least one of ``draws`` independent
    draws from p lands outside a set of mass ``1 - T`` (``log_tail`` = log T). Computed as
    ``-expm1(N log(1 - T))`` (no cancellation for small ``N T``); 0 where T = 0 or N = 0."""
    log_keep = _log1mexp(log_tail.to(F64))  # log(1 - T); -inf when T >= 1
    n = draws.to(F64)
    prod = torch.where(n > 0, n * log_keep, torch.zeros_like(n))  # 0 * -inf guarded
    return -torch.expm1(prod)


def _sampled_tail_weights(t_tail: Tensor, counts_out: Tensor, draws: Tensor) -> Tensor:
    """``w_j = T c_j / (C_out (1 - (1 - T)^N))`` [N_pos, S]: the tail mass T spread over the draws
    outside the exact set by their counts, divided by the probability that any draw lands there;
    all 0 where no draw does (``C_out = 0``)."""
    c_out = counts_out.sum(-1, keepdim=True)
    hit = draws_outside_probability(t_tail, draws).unsqueeze(-1)
    scale = t_tail.exp().unsqueeze(-1) / (c_out * hit).clamp(min=1e-300)
    return torch.where(c_out > 0, counts_out * scale, torch.zeros_like(counts_out))


def _weighted_nll(w: Tensor, student_logp: Tensor) -> Tensor:
    """``sum_j w_j (log w_j - log s_j)`` over the entries with ``w_j > 0`` (float64)."""
    keep = w > 0
    log_w = torch.where(keep, w, torch.ones_like(w)).log()
    return (w * (log_w - student_logp.to(F64).masked_fill(~keep, 0.0))).sum(-1)


def kd_topk_sampled(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, topk_ids: Tensor,
                    student_logp_at_samples: Tensor, draw_ids: Tensor, counts: Tensor,
                    teacher_log_tail: Tensor | None = None, student_log_tail: Tensor | None = None) -> Tensor:
    """Top-k exact + the tail from samples: ``sum_i p_i log(p_i / s_i) + sum_j w_j log(w_j / s_j)``.

    The K cached ids keep their exact teacher values ``p_i``. The tail mass ``T`` (``teacher_log_tail``
    [N], else ``1 - sum p_i`` in float64) is spread over the sampled ids OUTSIDE the top-k in
    proportion to their counts and divided by the probability that any of the ``N = sum_j c_j``
    draws lands outside: ``w_j = T c_j / (C_out (1 - (1 - T)^N))`` (``C_out`` = the draws that fell
    outside); a position whose draws all fell in the top-k has no tail term at all.

    Why exactly unbiased: given ``C_out > 0`` the outside draws are distributed as ``p_v / T``, so
    ``E[T c_v / C_out | C_out > 0] = p_v``, and ``P(C_out > 0) = 1 - (1 - T)^N``; hence
    ``E[w_v] = p_v`` for every tail id. The gradient w.r.t. the student's logits,
    ``W s_v - q_v`` (``q`` = the entries' weights, ``W = sum q``, with ``E[W] = 1``), is linear in the
    weights, so ``E[grad] = s - p``, the gradient of full ``KL(p || s)``, exactly, for every student
    (checked by enumerating every draw multiset: tests/test_sampled_kd.py). The old fallback (the one
    tail bucket ``T log(T / S_tail)`` when ``C_out = 0``, weights without the division) added
    ``(1 - T)^N (p_v - T s_v / S_tail)`` to the expected gradient of every tail id. The value is not
    an estimate of the KL (its gradient is). ``student_log_tail`` is accepted and unused (kept for
    callers of the old signature).

    Shapes: ``student_logp_at_ids`` / ``teacher_logprobs`` / ``topk_ids`` [N, K];
    ``student_logp_at_samples`` / ``draw_ids`` / ``counts`` [N, S] (count 0 = padding). Temperature
    1 only (the draws are from p), like `kd_sampled`.
    """
    del student_log_tail
    lp_t = teacher_logprobs.to(F64)
    t_tail = log_tail(lp_t) if teacher_log_tail is None else teacher_log_tail.to(F64)
    head = (lp_t.exp() * (lp_t - student_logp_at_ids.to(F64))).sum(-1)
    c = counts.to(F64)
    outside = c * ~(draw_ids.unsqueeze(-1) == topk_ids.unsqueeze(-2)).any(-1)
    w = _sampled_tail_weights(t_tail, outside, c.sum(-1))
    return (head + _weighted_nll(w, student_logp_at_samples)).to(student_logp_at_ids.dtype)
