"""The KD modes, in one registry: what each mode is for, what it needs, and its loss.

A mode is one ``KDMode`` entry. The recipe validates a run against it ("this mode needs X, the
cache has Y") before anything is written, the data path reads what it ``needs``, and the
objective calls its ``loss`` once per chunk of positions. Adding a mode = one entry here, its
loss in ``losses.py``, and their tests.

``loss(chunk)`` returns a ``KDTerm``: the student's KD loss per position (summed by the caller,
so padding / unaligned positions must be 0) and, for modes with modules of their own (the
projector/router), their student-independent loss as a sum and their routing statistics.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import Tensor

from pipeline.errors import ConfigError

from . import cross_losses, losses
from . import router as routing


@dataclass
class Chunk:
    """What a KD loss sees for one chunk of positions (rows of the flattened batch)."""

    logp: Tensor            # [n, V] the student's fp32 log-probs (ONE log_softmax, shared with CE)
    picked: Tensor          # [n, 1+K] logp gathered at [target, teacher top-k ids] (ONE gather)
    rows: dict[str, Tensor]  # the batch's per-position arrays for these rows (topk_*, logz, hidden, masks)
    """``topk_log_tail``: log of the teacher's mass beyond its top-k (from the cache, exact);
    the losses take the student's tail exactly too (``losses.student_log_tail``), so they hold
    at every temperature, not only at 1."""
    temperature: float
    union_student_k: int = 8
    head: Tensor | None = None          # the teacher's output head [V, Dt] (union)
    router: torch.nn.Module | None = None  # the projector/router (projected)
    lm_head: torch.nn.Module | None = None  # the student's output head (projected reads it detached)
    student_hidden: Tensor | None = None  # [n, Ds] the student's hidden state (the router's gate reads it detached)
    router_k: int = 1
    divergence: str = "forward_kl"   # kd.divergence (divergences.NAMES)
    jsd_beta: float = 0.5

    @property
    def at_ids(self) -> Tensor:
        """The student's log-probs at the teacher's top-k ids (cross-tokenizer: their twins)."""
        return self.picked[:, 1:1 + self.rows["topk_ids"].shape[1]] if "topk_ids" in self.rows else self.picked[:, 1:]

    @property
    def at_samples(self) -> Tensor:
        """The student's log-probs at the sampled ids (the last columns of ``picked``)."""
        return self.picked[:, -self.rows["draw_ids"].shape[1]:]


@dataclass
class KDTerm:
    per_position: Tensor            # [n] the student's KD loss (0 where a position has no KD target)
    aux_sum: Tensor | None = None   # summed loss of the mode's own modules (student-independent)
    gate_input: Tensor | None = None  # [m, Ds+Dt] detached router gate inputs (per-step load balance)
    gate_counts: Tensor | None = None  # [E] routing assignments in this chunk


@dataclass(frozen=True)
class KDMode:
    name: str
    tokenizer: Literal["same", "cross", "any"]
    """same: the student shares the teacher's tokenizer; cross: it has another one."""
    needs: frozenset[str] = field(default_factory=frozenset)
    """From the cache: 'topk' (top-k ids + log-probs), 'hidden' (teacher hidden states), 'head',
    'samples' (RS-KD sampled ids + counts; the objective gathers them with the target and top-k)."""
    loss: Callable[[Chunk], KDTerm] | None = None
    modules: tuple[str, ...] = ()
    """Trainable modules the mode adds beside the student ('router')."""
    summary: str = ""
    check: Callable[[dict], str | None] | None = None
    """Extra check on the cache's teacher facts; returns a problem (one line) or None."""
    temperature_one: bool = False
    """The mode's estimator holds at kd.temperature = 1 only (a run at another one is refused)."""
    student_k: bool = False
    """The mode adds the student's own top-k ids to the teacher's (``kd.union_student_k`` of them)."""
    divergences: frozenset[str] = frozenset({"forward_kl"})
    """The kd.divergence values its target supports exactly (others refused at config check)."""
    why_forward_only: str = ""
    """Why a forward-KL-only mode cannot take the others (said in the refusal)."""
    why_temperature_one: str = "the cache samples the teacher at 1"
    """Why a ``temperature_one`` mode holds at 1 only (said in the refusal)."""
    whole_sequences: bool = False
    """Its loss at one position reads other positions of the same sequence: the objective cuts
    positions into chunks of whole sequences."""

    @property
    def distills(self) -> bool:
        """False for the cross-entropy-only baseline: no KD term, and CE gets the whole weight."""
        return self.loss is not None


BUCKET_DIVERGENCES = frozenset({"forward_kl", "reverse_kl", "jsd"})
"""Modes whose target is an explicit teacher distribution over the same buckets as the student's
take every divergence: it is computed exactly between the two bucket distributions."""


def _topk_tail(c: Chunk) -> KDTerm:
    ids = c.rows["topk_ids"]
    return KDTerm(losses.kd_topk_tail(c.at_ids, c.rows["topk_logprobs"], c.temperature,
                                      teacher_log_tail=c.rows.get("topk_log_tail"),
                                      student_log_tail=losses.student_log_tail(c.logp, ids, c.at_ids),
                                      divergence=c.divergence, jsd_beta=c.jsd_beta))


def _topk_renorm(c: Chunk) -> KDTerm:
    return KDTerm(losses.kd_topk_renorm(c.at_ids, c.rows["topk_logprobs"], c.temperature,
                                        divergence=c.divergence, jsd_beta=c.jsd_beta))


def _union(c: Chunk) -> KDTerm:
    return KDTerm(losses.kd_union(c.logp, c.rows["hidden"], c.head, c.rows["logz"], c.rows["topk_ids"],
                                  c.union_student_k, c.temperature, teacher_log_tail=c.rows.get("topk_log_tail"),
                                  exact_student_tail=True, divergence=c.divergence, jsd_beta=c.jsd_beta))


def _mapped(c: Chunk) -> KDTerm:
    ids, mask = c.rows["topk_ids"], c.rows["topk_mask"]
    return KDTerm(losses.kd_mapped(c.at_ids, c.rows["topk_logprobs"], mask, c.temperature,
                                   teacher_log_tail=c.rows.get("topk_log_tail"),
                                   student_log_tail=losses.student_log_tail(c.logp, ids, c.at_ids, mask),
                                   divergence=c.divergence, jsd_beta=c.jsd_beta))


def _projected(c: Chunk) -> KDTerm:
    """The student's KD term against the projector's distribution over [next token, mapped teacher
    ids] (used DETACHED), plus the projector/router's own loss, which reads only
    student-independent targets (the next student token, the mapped teacher distribution)
    through the student's head DETACHED: a projector that copied the student would gain nothing."""
    sel = c.rows["hidden_mask"]
    per_position = c.logp.new_zeros(c.logp.shape[0])
    if not bool(sel.any()):
        return KDTerm(per_position)
    out = c.router(c.rows["hidden"][sel], c.student_hidden[sel], c.router_k)
    head_w = c.lm_head.weight.detach()
    cand = c.rows["needed"][sel]
    mapped_ok = c.rows["topk_mask"][sel] & (cand[:, 1:] != cand[:, :1])  # no twin of the target twice
    cand_mask = torch.cat([torch.ones_like(mapped_ok[:, :1]), mapped_ok], dim=1)
    target_logits = routing.projected_logits(out.projected.detach(), head_w, cand).float()
    kd = losses.kd_topk_renorm(c.picked[sel], target_logits, c.temperature, cand_mask)
    own = routing.projector_targets_loss(out.projected, head_w, cand[:, 0], cand[:, 1:],
                                         c.rows["topk_logprobs"][sel], c.rows["topk_mask"][sel], cand)
    return KDTerm(per_position.masked_scatter(sel, kd), aux_sum=own * int(sel.sum()),
                  gate_input=out.gate_input, gate_counts=out.counts)


def _sampled(c: Chunk) -> KDTerm:
    return KDTerm(losses.kd_sampled(c.at_samples, c.rows["draw_counts"], c.temperature))


def _topk_sampled(c: Chunk) -> KDTerm:
    return KDTerm(losses.kd_topk_sampled(c.at_ids, c.rows["topk_logprobs"], c.rows["topk_ids"], c.at_samples,
                                         c.rows["draw_ids"], c.rows["draw_counts"],
                                         teacher_log_tail=c.rows.get("topk_log_tail")))


def _mapped_sampled(c: Chunk) -> KDTerm:
    r = c.rows
    return KDTerm(cross_losses.kd_mapped_sampled(
        c.at_ids, r["topk_logprobs"], r["topk_twin"], c.at_samples, r["draw_counts"], r["draw_outside"],
        r["draw_twin"], r["topk_log_tail"], cross_losses.student_log_no_twin(c.logp, r["twin_ids"]),
        r["kd_position"]))


def _uld(c: Chunk) -> KDTerm:
    return KDTerm(cross_losses.kd_uld(c.logp, c.rows["topk_logprobs"], c.rows["kd_position"],
                                      c.rows.get("topk_log_tail")))


def _chunk_likelihood(c: Chunk) -> KDTerm:
    return KDTerm(cross_losses.kd_chunk_likelihood(c.picked[:, 0], c.rows["chunk_len"], c.rows["teacher_chunk_logp"],
                                                   c.temperature))


def _plain_head(teacher: dict) -> str | None:
    if teacher.get("final_logit_softcapping"):
        return ("kd.mode=union computes teacher logits as hidden . head, which a soft-capped teacher "
                "does not use; choose kd.mode=topk_tail")
    return None


MODES: dict[str, KDMode] = {m.name: m for m in (
    KDMode("none", "any", summary="cross-entropy only (the baseline)"),
    KDMode("topk_tail", "same", frozenset({"topk"}), _topk_tail, divergences=BUCKET_DIVERGENCES,
           summary="exact KL over the teacher's top-k + one tail bucket; needs no teacher weights"),
    KDMode("topk_renorm", "same", frozenset({"topk"}), _topk_renorm, divergences=BUCKET_DIVERGENCES,
           summary="KL of the top-k renormalised at temperature tau, times tau^2"),
    KDMode("union", "same", frozenset({"topk", "hidden", "head"}), _union, check=_plain_head, student_k=True,
           divergences=BUCKET_DIVERGENCES,
           summary="exact teacher logits on teacher top-k + student top-k ids, from hidden . head"),
    KDMode("sampled", "same", frozenset({"samples"}), _sampled, temperature_one=True,
           why_forward_only="its target is a sample of the teacher, whose counts make only forward KL's gradient "
           "(linear in p) unbiased; reverse KL and JSD need the teacher's probability at ids it never drew",
           summary="unbiased: tokens sampled from the full teacher distribution + counts (RS-KD)"),
    KDMode("topk_sampled", "same", frozenset({"topk", "samples"}), _topk_sampled, temperature_one=True,
           why_forward_only="its tail is a sample of the teacher (see sampled)",
           summary="exact top-k + the tail's mass spread over the sampled ids beyond the top-k (unbiased)"),
    KDMode("mapped", "cross", frozenset({"topk"}), _mapped, divergences=BUCKET_DIVERGENCES,
           summary="another tokenizer: teacher top-k through the byte-identical vocab map, + tail"),
    KDMode("mapped_sampled", "cross", frozenset({"topk", "samples"}), _mapped_sampled, temperature_one=True,
           why_forward_only="its tail is a sample of the teacher (see sampled)",
           summary="another tokenizer: exact mapped top-k + the tail's mass over the mapped draws beyond it "
           "(unbiased for the teacher's full distribution through the vocab map)"),
    KDMode("uld", "cross", frozenset({"topk"}), _uld, temperature_one=True,
           why_temperature_one="ULD compares the sorted probabilities themselves (Boizard et al. 2024)",
           why_forward_only="it is an L1 distance between sorted probabilities, not a divergence of buckets",
           summary="another tokenizer, no vocab map: L1 between sorted teacher and student probabilities (ULD)"),
    KDMode("chunk_likelihood", "cross", frozenset({"next_logprob"}), _chunk_likelihood, whole_sequences=True,
           why_forward_only="it matches chunk likelihoods by a binary KL",
           summary="another tokenizer, no vocab map, no top-k: teacher vs student log-likelihood of the text "
           "between shared token boundaries (ALM-style)"),
    KDMode("projected", "cross", frozenset({"topk", "hidden"}), _projected, modules=("router",),
           why_forward_only="its target is the projector's own reading, fitted by forward KL in the same step",
           summary="another tokenizer: a projector/router's reading of the teacher hidden state"),
)}


def get(name: str) -> KDMode:
    if name not in MODES:
        close = difflib.get_close_matches(name, list(MODES), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        raise ConfigError(f"kd.mode={name!r} is not a KD mode (choose from {', '.join(MODES)}){hint}")
    return MODES[name]


def check(name: str, *, same_tokenizer: bool, cache_has: set[str], teacher: dict, cache_dir: str,
          temperatures: tuple[float, ...] = (1.0,), divergence: str = "forward_kl") -> KDMode:
    """The mode ``name``, after checking it fits this student and this cache (ConfigError if not)."""
    mode = get(name)
    if mode.tokenizer == "same" and not same_tokenizer:
        choices = ", ".join(m.name for m in MODES.values() if m.tokenizer != "same")
        raise ConfigError(f"kd.mode={name} needs the teacher's tokenizer, but student.tokenizer differs from it; "
                          f"use one of {choices}")
    if mode.tokenizer == "cross" and same_tokenizer:
        choices = ", ".join(m.name for m in MODES.values() if m.tokenizer != "cross")
        raise ConfigError(f"kd.mode={name} is for a student with another tokenizer; this student shares the "
                          f"teacher's, so use one of {choices}")
    if "hidden" in mode.needs and "hidden" not in cache_has:
        raise ConfigError(f"kd.mode={name} needs the teacher hidden states, and cache {cache_dir} has none; "
                          "rebuild it with cache.store_hidden=true cache.overwrite=true")
    if "head" in mode.needs and "head" not in cache_has:
        raise ConfigError(f"kd.mode={name} needs the teacher head in the cache; run cache-teacher again with "
                          "cache.store_head=true (it adds the head to a complete cache)")
    if "samples" in mode.needs and "samples" not in cache_has:
        raise ConfigError(f"kd.mode={name} needs tokens sampled from the teacher, and cache {cache_dir} has none; "
                          "rebuild it with cache.samples=48 cache.overwrite=true")
    if mode.temperature_one and any(t != 1.0 for t in temperatures):
        other = "topk_tail" if mode.tokenizer == "same" else "mapped"
        raise ConfigError(f"kd.mode={name} holds at temperature 1 only ({mode.why_temperature_one}); "
                          f"set kd.temperature=1 (and kd.temperature_final=-1), or use kd.mode={other}")
    if mode.loss is not None and divergence not in mode.divergences:
        takes = ", ".join(m.name for m in MODES.values() if divergence in m.divergences)
        raise ConfigError(f"kd.divergence={divergence} does not fit kd.mode={name}: {mode.why_forward_only}; "
                          f"use kd.divergence=forward_kl, or one of {takes}")
    if mode.check is not None and (problem := mode.check(teacher)):
        raise ConfigError(problem)
    return mode


def planned_memory(cfg, teacher, student) -> dict[str, int]:
    """What the run's KD mode (and feature map) add to stage 2's memory, for the planner
    (``pipeline.memplan.plan``, which names no mode; ``doctor`` looks this up by module path):
    ``extra_params`` trained beside the student, counted by building the modules on the meta
    device, and ``device_bytes`` held there (the teacher's fp32 head for modes that need it).
    ``teacher``/``student``: dimensions with ``hidden`` and ``vocab``."""
    mode = get(cfg.kd.mode)
    modules = []
    with torch.device("meta"):
        if cfg.kd.feature_weight > 0:
            modules.append(torch.nn.Linear(student.hidden, teacher.hidden, bias=False))
        if "router" in mode.modules:
            modules.append(routing.ProjectorRouter(teacher.hidden, student.hidden, cfg.router.num_experts))
    extra = sum(p.numel() for m in modules for p in m.parameters())
    return {"extra_params": extra, "device_bytes": teacher.vocab * teacher.hidden * 4 if "head" in mode.needs else 0}
