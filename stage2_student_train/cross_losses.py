"""Cross-tokenizer KD losses beyond the mapped top-k (``losses.kd_mapped``), as small pure functions.

Notation (docs/loss-math.md, "Cross-tokenizer modes"): the teacher's full distribution ``p`` over
its vocabulary at the aligned teacher position; ``vmap`` sends a teacher id to the student id with
the identical byte string (-1: no twin). The **mapped target** is ``p`` pushed through the map,
``q_u = sum_{v: vmap[v] = u} p_v`` on the student ids that are twins, plus one *unmapped bucket*
``U = sum_{v: vmap[v] = -1} p_v`` held against the student's mass on its *no-twin* ids
``S_none = sum_{u not a twin} s_u``:

    KL_map(p || s) = sum_u q_u log(q_u / s_u) + U log(U / S_none)

(`kd_mapped_full`, the exact target: what the online cross-tokenizer reference trains on and what
`kd_mapped_sampled` estimates without bias from the cache). Its gradient w.r.t. the student's
logits is ``s_u - q_u - U [u no twin] s_u / S_none``.

`kd_uld` (Boizard et al. 2024) and `kd_chunk_likelihood` (in the spirit of ALM, Minixhofer et al.
2025) need no vocabulary map. All arithmetic is float64; results come back in the student's dtype.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .losses import F64, TAIL_FLOOR, _log1mexp, _sampled_tail_weights, _weighted_nll


def student_log_no_twin(logp: Tensor, twin_ids: Tensor) -> Tensor:
    """``log S_none`` [n]: ``logsumexp`` of the student's log-probs over its ids that are no teacher
    id's twin (every id of ``logp``'s vocabulary not in ``twin_ids``), summed directly (no
    ``1 - sum`` cancellation). -inf when every id is a twin."""
    no_twin = torch.ones(logp.shape[-1], dtype=torch.bool, device=logp.device)
    no_twin[twin_ids] = False
    if not bool(no_twin.any()):
        return logp.new_full(logp.shape[:-1], float("-inf"))
    return torch.logsumexp(logp.index_select(-1, no_twin.nonzero()[:, 0]), dim=-1)


def _unmapped_term(log_u: Tensor, log_s_none: Tensor) -> Tensor:
    """``U (log U - log S_none)``; 0 where U = 0; an empty student bucket is floored at TAIL_FLOOR."""
    has = log_u > float("-inf")
    safe_u = torch.where(has, log_u, torch.zeros_like(log_u))
    safe_s = torch.where(log_s_none > float("-inf"), log_s_none, torch.full_like(log_s_none, math.log(TAIL_FLOOR)))
    return torch.where(has, safe_u.exp() * (safe_u - safe_s), torch.zeros_like(safe_u))


def kd_mapped_full(logp: Tensor, teacher_logp: Tensor, vmap: Tensor, twin_ids: Tensor | None = None,
                   dtype: torch.dtype = F64, with_constant: bool = True) -> Tensor:
    """The exact mapped target: ``KL_map(p || s) = sum_u q_u log(q_u / s_u) + U log(U / S_none)`` [n].

    ``logp`` [n, Vs]: the student's full log-probs; ``teacher_logp`` [n, Vt]: the teacher's full
    log-probs; ``vmap`` [Vt] (int64, -1 = no twin). ``q = p`` scattered through ``vmap`` (teacher ids
    with the same twin add up), ``U`` = the mass of the teacher ids without a twin, ``S_none`` = the
    student's mass on ids that are no twin (``twin_ids``: default the ids ``vmap`` reaches).
    Computed as ``sum_u q_u log q_u - sum_{v mapped} p_v log s_{vmap[v]} + U log(U / S_none)``: the
    student term is one gather (no [n, Vs] target is built for the gradient). ``dtype``: the
    arithmetic (float64 for references; float32 for the online trainer); ``with_constant=False``
    leaves out ``sum_u q_u log q_u``, which does not depend on the student (same gradient, cheaper)."""
    has = vmap >= 0
    mapped_ids, unmapped_ids = has.nonzero()[:, 0], (~has).nonzero()[:, 0]
    t_lp = teacher_logp.to(dtype)
    p_mapped = t_lp.index_select(1, mapped_ids).exp()
    twins = vmap[has].unique() if twin_ids is None else twin_ids
    lp = logp.to(dtype)
    out = -(p_mapped * lp.index_select(1, vmap[mapped_ids])).sum(-1)
    if with_constant:
        with torch.no_grad():
            q = torch.zeros(p_mapped.shape[0], logp.shape[-1], dtype=dtype, device=p_mapped.device)
            q.index_add_(1, vmap[has], p_mapped)
            neg_entropy = torch.special.xlogy(q, q).sum(-1)
        out = out + neg_entropy
    log_u = (torch.logsumexp(t_lp.index_select(1, unmapped_ids), dim=-1) if len(unmapped_ids)
             else t_lp.new_full(t_lp.shape[:1], -math.inf))
    return (out + _unmapped_term(log_u, student_log_no_twin(lp, twins))).to(logp.dtype)


def kd_mapped_sampled(student_logp_at_ids: Tensor, teacher_logprobs: Tensor, twin_mask: Tensor,
                      student_logp_at_samples: Tensor, counts: Tensor, outside: Tensor, draw_twin: Tensor,
                      teacher_log_tail: Tensor, log_s_none: Tensor, position_mask: Tensor) -> Tensor:
    """Unbiased estimate of `kd_mapped_full` from the cache: the exact mapped top-k, and the tail's
    mass spread over the mapped draws beyond it [n].

    Entries, per aligned position (``position_mask`` [n]; others give 0):
    - each top-k teacher id with a twin (``twin_mask`` [n, K]; repeats of one twin allowed): weight
      ``p_i`` at its twin (``student_logp_at_ids`` [n, K] = the student's log-prob there);
    - each draw beyond the teacher's top-k (``outside`` [n, S]) with a twin (``draw_twin`` [n, S]):
      weight ``w_j = T c_j / (C_out (1 - (1 - T)^N))`` at its twin (``student_logp_at_samples``),
      ``T = exp(teacher_log_tail)`` the mass beyond the top-k, ``C_out`` the draws beyond it,
      ``N = sum_j counts_j``; none when ``C_out = 0``;
    - the unmapped bucket ``U_hat = sum_{top-k i, no twin} p_i + sum_{outside j, no twin} w_j``
      against ``log_s_none`` [n] (`student_log_no_twin`).

    Loss ``sum_e q_e log(q_e / s_e) + U_hat log(U_hat / S_none)``. Its gradient is linear in the
    weights and ``E[w_j-entries at u] = sum_{v beyond top-k, vmap[v] = u} p_v`` (as in
    `losses.kd_topk_sampled`), so ``E[grad] = s_u - q_u - U [u no twin] s_u / S_none``: the exact
    mapped target's gradient, for every student. Temperature 1 only (the draws are from p).
    """
    lp_t = teacher_logprobs.to(F64)
    pos = position_mask.to(torch.bool)
    twin = twin_mask.to(torch.bool) & pos[:, None]
    p_top = lp_t.exp()
    head = (torch.where(twin, p_top, 0.0) * (lp_t - student_logp_at_ids.to(F64).masked_fill(~twin, 0.0))).sum(-1)
    c = counts.to(F64) * pos[:, None]
    w = _sampled_tail_weights(teacher_log_tail.to(F64), c * outside, c.sum(-1))
    twin_draw = draw_twin.to(torch.bool)
    sampled = _weighted_nll(w * twin_draw, student_logp_at_samples)
    u = (p_top * (~twin_mask.to(torch.bool) & pos[:, None])).sum(-1) + (w * ~twin_draw).sum(-1)
    log_u = torch.where(u > 0, u, torch.ones_like(u)).log().masked_fill(u <= 0, float("-inf"))
    out = head + sampled + _unmapped_term(log_u, log_s_none.to(F64))
    return torch.where(pos, out, torch.zeros_like(out)).to(student_logp_at_ids.dtype)


def kd_uld(logp: Tensor, teacher_logprobs: Tensor, position_mask: Tensor | None = None,
           teacher_log_tail: Tensor | None = None) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024) from the cache: the L1 distance between the
    teacher's and the student's probabilities sorted in decreasing order, which needs no vocabulary
    map (rank r of one is compared with rank r of the other) [n]:

        ULD = sum_{r=1..K} |p_(r) - s_(r)| + |T - S_rest|

    ``p_(r)`` = the cached top-K teacher probabilities sorted, ``T`` their tail (``teacher_log_tail``,
    else ``1 - sum``), ``s_(r)`` = the student's K largest probabilities (from its full ``logp``
    [n, Vs]; gradients flow through them), ``S_rest = 1 - sum_r s_(r)``. The ranks beyond K are one
    bucket (the cache has no teacher values there): ``|T - S_rest| <= sum_{r>K} |p_(r) - s_(r)|``, so
    this is the full ULD minus a non-negative remainder that vanishes when both tails are small.
    Temperature 1 (the paper's setting). ``position_mask`` [n] False -> 0."""
    k = teacher_logprobs.shape[-1]
    p_sorted = teacher_logprobs.to(F64).exp().sort(dim=-1, descending=True).values
    s_sorted = logp.topk(k, dim=-1).values.to(F64).exp()
    t_tail = (-torch.expm1(torch.logsumexp(teacher_logprobs.to(F64), -1)) if teacher_log_tail is None
              else teacher_log_tail.to(F64).exp())
    s_rest = 1.0 - s_sorted.sum(-1)
    out = (p_sorted - s_sorted).abs().sum(-1) + (t_tail - s_rest).abs()
    if position_mask is not None:
        out = torch.where(position_mask.to(torch.bool), out, torch.zeros_like(out))
    return out.to(logp.dtype)


def kd_chunk_likelihood(student_logp_target: Tensor, chunk_len: Tensor, teacher_chunk_logp: Tensor,
                        temperature: float = 1.0) -> Tensor:
    """Likelihood matching over aligned chunks (in the spirit of ALM, Minixhofer et al. 2025) [n].

    A *chunk* is the text between two consecutive character offsets where both tokenizations end a
    token (aligned positions). Both models then predict exactly the chunk's characters from
    exactly the same prefix: the teacher with ``L_T`` = the sum of its cached ``next_logprob`` over
    its tokens in the chunk, the student with ``L_S`` = the sum of ``log s(target)`` over its
    positions in the chunk. At the chunk's last student position (``chunk_len`` [n] = its number of
    student positions; 0 elsewhere; the chunk is the ``chunk_len`` rows ending here, all in this
    call's rows) the loss is the binary KL of the tempered chunk probabilities
    ``a = exp(L_T / tau)``, ``b = exp(L_S / tau)``:

        tau^2 * [a log(a / b) + (1 - a) log((1 - a) / (1 - b))]

    ``teacher_chunk_logp`` [n] = ``L_T`` at the chunk ends. ``log(1 - b)`` is floored at
    ``log(TAIL_FLOOR)`` (a student certain of the chunk). Needs no vocabulary map and no top-k;
    gradients reach every student position of the chunk (``d/d log s_j = d/d L_S``)."""
    lp = student_logp_target.to(F64)
    cs = torch.cat([lp.new_zeros(1), lp.cumsum(0)])
    idx = torch.arange(len(lp), device=lp.device)
    length = chunk_len.to(torch.long)
    end = length > 0
    start = (idx + 1 - length).clamp(min=0)
    l_s = (cs[idx + 1] - cs[start]) / temperature
    l_t = teacher_chunk_logp.to(F64) / temperature
    a = l_t.exp()
    floor = math.log(TAIL_FLOOR)
    log_1ma, log_1mb = _log1mexp(l_t.clamp(max=0.0)), _log1mexp(l_s).clamp(min=floor)
    rest = torch.where(a < 1, (1 - a) * (log_1ma.clamp(min=-1e300) - log_1mb), torch.zeros_like(a))
    out = temperature ** 2 * (a * (l_t - l_s) + rest)
    return torch.where(end, out, torch.zeros_like(out)).to(student_logp_target.dtype)
