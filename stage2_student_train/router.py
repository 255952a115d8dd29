"""Projector and student-aware router (cross-tokenizer KD): teacher hidden -> student hidden.

Experts. ``E`` affine maps ``y_e(t) = t W_e + b_e`` from the teacher hidden state ``t`` (Dt) to the
student hidden space (Ds), stored stacked: ``weight`` [E, Dt, Ds], ``bias`` [E, Ds].

Gate. ``l = [stopgrad(s), t] G + c`` (logits [N, E]) reads the student's own hidden state ``s``,
detached here, so no gradient ever reaches the student through the router. In training mode
fixed-std Gaussian noise is added before the top-k choice, ``l~ = l + noise_std * eps`` with
``eps ~ N(0, I)`` drawn from torch's default generator (checkpointed RNG states replay it); in
eval mode ``l~ = l``. With ``S`` = the top-k experts of ``l~`` per position::

    w_e = exp(l~_e) / sum_{j in S} exp(l~_j)  for e in S, else 0     (renormalised over the kept)
    projected = sum_{e in S} w_e * y_e(t)

Only the rows routed to an expert are multiplied by it (cost ~ N*k*Dt*Ds, not N*E*Dt*Ds).
With E = 1 the single weight is exactly 1.0: a plain linear projector.

Load balance (Switch Transformer), with ``p = softmax(l)`` (no noise)::

    f_e = #{n : e in S_n} / (N k)        (sums to 1; reported as ``utilisation``)
    P_e = mean_n p_{n,e}
    load_balance = E * sum_e f_e P_e     (1 when perfectly balanced; 0 by definition when E = 1)

It is a product of bounded terms (no log, no division by a per-expert count), so it is finite
for every routing, including experts that receive no token. Its gradient reaches the gate
through ``P`` only (``f`` is a count).

Anti-collapse: the projector and router learn only from student-independent
targets (``projector_targets_loss``); the caller passes the student head detached there and
uses ``projected`` detached in the student's KD term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class RouterOutput:
    projected: Tensor  # [N, Ds] mixed expert outputs
    load_balance: Tensor  # scalar, E * sum_e f_e P_e (0 when E == 1)
    utilisation: Tensor  # [E] fraction of routing assignments per expert (detached, sums to 1)
    gate_probs: Tensor  # [N, E] softmax of the noise-free gate logits
    gate_input: Tensor  # [N, Ds+Dt] what the gate read (detached): recomputes gate_probs per step
    counts: Tensor  # [E] routing assignments (detached): f = counts / (N k)


class ProjectorRouter(nn.Module):
    def __init__(self, teacher_dim: int, student_dim: int, num_experts: int = 4, noise_std: float = 1.0):
        super().__init__()
        if num_experts < 1 or teacher_dim < 1 or student_dim < 1 or noise_std < 0:
            raise ValueError("ProjectorRouter needs positive dims, num_experts >= 1 and noise_std >= 0")
        self.teacher_dim, self.student_dim, self.num_experts = teacher_dim, student_dim, num_experts
        self.noise_std = float(noise_std)
        bound = 1.0 / math.sqrt(teacher_dim)  # the nn.Linear default init, per expert
        self.weight = nn.Parameter(torch.empty(num_experts, teacher_dim, student_dim).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(num_experts, student_dim).uniform_(-bound, bound))
        self.gate = nn.Linear(student_dim + teacher_dim, num_experts)  # input: [student.detach(), teacher]

    def forward(self, teacher_hidden: Tensor, student_hidden: Tensor, top_k: int) -> RouterOutput:
        n, num_e = teacher_hidden.shape[0], self.num_experts
        if teacher_hidden.shape[1:] != (self.teacher_dim,) or student_hidden.shape != (n, self.student_dim):
            raise ValueError(f"expected teacher [N, {self.teacher_dim}] and student [N, {self.student_dim}], "
                             f"got {tuple(teacher_hidden.shape)} and {tuple(student_hidden.shape)}")
        k = max(1, min(int(top_k), num_e))
        gate_in = torch.cat([student_hidden.detach().to(teacher_hidden.dtype), teacher_hidden], dim=-1)
        logits = self.gate_logits(gate_in)
        probs = logits.softmax(dim=-1)
        noisy = logits
        if self.training and self.noise_std > 0:
            noisy = logits + self.noise_std * torch.randn_like(logits)
        top_logits, top_idx = noisy.topk(k, dim=-1)  # [N, k]
        top_w = top_logits.softmax(dim=-1)  # renormalised over the kept experts

        projected = None
        for e in range(num_e):
            hit = top_idx == e  # [N, k], at most one True per row
            rows = hit.any(dim=-1).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            w = (top_w[rows] * hit[rows]).sum(dim=-1, keepdim=True)  # [R, 1]
            y = torch.addmm(self.bias[e], teacher_hidden[rows], self.weight[e])
            if projected is None:
                projected = y.new_zeros(n, self.student_dim)
            projected = projected.index_add(0, rows, y * w.to(y.dtype))
        if projected is None:  # N == 0
            projected = teacher_hidden.new_zeros(0, self.student_dim)

        counts = torch.zeros(num_e, device=logits.device).index_add_(
            0, top_idx.reshape(-1), torch.ones(top_idx.numel(), device=logits.device))
        f = counts / max(n * k, 1)
        mean_p = probs.sum(dim=0) / max(n, 1)
        load_balance = num_e * (f * mean_p).sum() if num_e > 1 else logits.new_zeros(())
        return RouterOutput(projected=projected, load_balance=load_balance, utilisation=f, gate_probs=probs,
                            gate_input=gate_in.detach(), counts=counts)

    def gate_logits(self, gate_input: Tensor) -> Tensor:
        """Noise-free gate logits (>= fp32) for ``gate_input`` = [stopgrad(s), t]."""
        logits = self.gate(gate_input)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))


def step_load_balance(router: ProjectorRouter, gate_inputs: list[Tensor], counts: Tensor,
                      positions: int, world: int = 1) -> Tensor:
    """The Switch load balance over a whole optimizer step, so chunking and micro-batching do not
    change it: ``E * sum_e f_e P_e`` with ``f = counts / sum(counts)`` and ``P_e`` the mean gate
    probability over the step's ``positions`` routed positions (all ranks: ``counts`` and
    ``positions`` must already be global). This rank's share: its gate inputs' probabilities summed,
    divided by the global count, times ``world`` (data parallelism averages gradients over ranks)."""
    num_e = router.num_experts
    if num_e == 1 or not gate_inputs or positions == 0:
        return router.gate.weight.sum() * 0.0
    prob_sum = router.gate_logits(torch.cat(gate_inputs)).softmax(dim=-1).sum(dim=0)
    f = counts / counts.sum().clamp(min=1)
    return num_e * (f * prob_sum).sum() * (world / positions)


def topk_schedule(initial_top_k: int, final_top_k: int, progress: float) -> int:
    """k = round(initial + (final - initial) * clamp(progress, 0, 1)), rounding halves UP
    (floor(x + 0.5): 4 -> 1 at progress 0.5 gives 3), clamped to [min, max] of the two."""
    p = min(max(float(progress), 0.0), 1.0)
    k = math.floor(initial_top_k + (final_top_k - initial_top_k) * p + 0.5)
    return min(max(k, min(initial_top_k, final_top_k)), max(initial_top_k, final_top_k))


def projected_logits(projected: Tensor, head_weight: Tensor, ids: Tensor) -> Tensor:
    """z[n, m] = projected[n] . head_weight[ids[n, m]]  ([N, Ds], [V, Ds], [N, M] -> [N, M]).

    Gathers the M needed head rows per position ([N, M, Ds], so the caller chunks positions);
    never forms [N, V]. Gradients flow into ``head_weight`` unless the caller detaches it."""
    rows = F.embedding(ids, head_weight)  # [N, M, Ds]
    return torch.bmm(rows, projected.to(rows.dtype).unsqueeze(-1)).squeeze(-1)


def projector_targets_loss(projected: Tensor, head_weight: Tensor, next_student_ids: Tensor,
                           mapped_teacher_ids: Tensor, mapped_teacher_logprobs: Tensor, mask: Tensor,
                           candidate_ids: Tensor) -> Tensor:
    """Student-independent loss of the projector/router, mean over the N (aligned) positions.

    With z = projected_logits(projected, head_weight, .) (fp32) at C = candidate_ids (column 0
    must be the next student token y; checked) and at the mapped teacher ids T (valid where
    ``mask``)::

        (a) CE  = -log softmax_C(z)[0] = logsumexp_{c in C} z_c - z_y
        (b) KL  = sum_{i valid} q_i (log q_i - log r_i),
                  q = softmax over the valid i of mapped_teacher_logprobs   (renormalised)
                  r = softmax over the valid i of z_{T_i}                    (log_softmax over T)
        loss = mean_n (CE_n + KL_n)          (a position with no valid mapped id has KL = 0)

    Nothing here reads the student's logits: pass ``head_weight.detach()`` so the projector
    cannot move the student's head."""
    if not torch.equal(candidate_ids[:, 0], next_student_ids):
        raise ValueError("candidate_ids[:, 0] must be the next student token of each position")
    m = candidate_ids.shape[1]
    z = projected_logits(projected, head_weight, torch.cat([candidate_ids, mapped_teacher_ids], dim=1)).float()
    z_cand, z_map = z[:, :m], z[:, m:]
    ce = torch.logsumexp(z_cand, dim=-1) - z_cand[:, 0]

    mask = mask.bool()
    # Invalid entries get -inf (0 for a row with none valid, to keep log_softmax finite).
    fill = torch.where(mask.any(dim=-1, keepdim=True), float("-inf"), 0.0)
    log_q = torch.where(mask, mapped_teacher_logprobs.float(), fill).log_softmax(dim=-1)
    log_r = torch.where(mask, z_map, fill).log_softmax(dim=-1)
    log_q, log_r = torch.where(mask, log_q, 0.0), torch.where(mask, log_r, 0.0)
    kl = (log_q.exp() * (log_q - log_r)).sum(dim=-1)  # 0 at invalid entries
    return (ce + kl).mean()
