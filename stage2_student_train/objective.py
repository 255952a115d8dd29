"""The stage-2 objective over one micro-batch, chunked over positions.

The student's last hidden state ``h`` is computed once (through the DDP/FSDP wrapper when there
is one); the head, ONE fp32 ``log_softmax`` (shared by CE and KD) and the losses then run over
chunks of ``chunk`` positions. With ``backward=True`` each chunk's loss is differentiated right
away (``autograd.grad``) with respect to its slice of a detached ``h`` and to the modules it
uses directly (the head, the router), so at most one ``[chunk, V]`` logits tensor and its graph
exist at a time. Then ONE backward runs from ``h`` (and those modules' accumulated gradients,
and the terms computed over the whole batch) through the transformer: under DDP/FSDP that is
the single backward the engine hooks into, reducing gradients bucket by bucket while it runs.

Normalisation: every term is a sum over positions divided by ``denominator``, the number of
valid targets of the whole optimizer step (all micro-batches, all ranks), so how a step is cut
into micro-batches, ranks or chunks does not change the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor, nn

from pipeline import document_mask
from pipeline.config import KDConfig

from . import kd_modes, losses
from .router import step_load_balance
from .student import decoder_of


@dataclass
class Weights:
    ce: float
    kd: float
    temperature: float
    label_smoothing: float
    feature: float
    router_k: int = 1
    projector: float = 0.0
    load_balance: float = 0.0


class Trainable(nn.Module):
    """The student and the modules trained beside it, as one module: DDP and FSDP wrap (and
    synchronise) everything that is optimised in one place. ``forward`` = the student's last
    hidden state [B, L, Ds] (the head runs chunked, outside)."""

    def __init__(self, student: nn.Module, feature_map: nn.Module | None = None, router: nn.Module | None = None):
        super().__init__()
        self.student, self.feature_map, self.router = student, feature_map, router

    def forward(self, input_ids: Tensor, doc_ids: Tensor | None = None) -> Tensor:
        # The model's own accessor (Llama/Qwen: .model, GPT-2: .transformer); no KV cache in training.
        # ``doc_ids``: a document-masked cache; each packed document attends only to itself.
        masking = document_mask.forward_kwargs(self.student, doc_ids)
        return decoder_of(self.student)(input_ids=input_ids, use_cache=False, **masking).last_hidden_state

    def extras(self) -> dict[str, nn.Module | None]:
        return {"feature_map": self.feature_map, "router": self.router}


def as_trainable(model: nn.Module) -> Trainable:
    return model if isinstance(model, Trainable) else Trainable(model)


@dataclass
class GateStats:
    """Routing statistics gathered over an optimizer step, for its one load-balance term."""

    inputs: list[Tensor] = field(default_factory=list)
    counts: Tensor | None = None

    def add(self, term: kd_modes.KDTerm) -> None:
        if term.gate_input is None:
            return
        self.inputs.append(term.gate_input)
        self.counts = term.gate_counts if self.counts is None else self.counts + term.gate_counts

    @property
    def positions(self) -> int:
        return sum(len(x) for x in self.inputs)


PER_POSITION = ("topk_ids", "topk_logprobs", "topk_log_tail", "logz", "hidden", "target_mask", "topk_mask",
                "hidden_mask", "draw_ids", "draw_counts", "topk_twin", "kd_position", "draw_outside", "draw_twin",
                "chunk_len", "teacher_chunk_logp")
PER_BATCH = ("twin_ids",)
"""Arrays that are one per batch, not per position (passed to every chunk whole)."""


def flat_targets(batch: dict, device) -> dict:
    """Positions 0..L-2 of every sequence (position L-1 has no next token), flattened, on device.

    Same-tokenizer batches hold per-token arrays [B, L, ...]; cross-tokenizer batches (they have
    ``target_mask``) hold them for the positions with a target already [B, L-1, ...]."""
    out = {"input_ids": batch["input_ids"].to(device, non_blocking=True)}
    out["targets"] = out["input_ids"][:, 1:].reshape(-1)
    cross = "target_mask" in batch
    for name in PER_POSITION:
        if name in batch:
            t = batch[name] if cross else batch[name][:, :-1]
            out[name] = t.reshape(-1, *t.shape[2:]).to(device, non_blocking=True)
    for name in PER_BATCH:
        if name in batch:
            out[name] = batch[name].to(device, non_blocking=True)
    if "doc_ids" in batch:  # a document-masked cache: per token, [B, L] (the forward's mask)
        out["doc_ids"] = batch["doc_ids"].to(device, non_blocking=True)
    if "loss_mask" in batch:  # chat data: position t counts when token t+1 is a target
        out["target_mask"] = batch["loss_mask"][:, 1:].reshape(-1).to(device, non_blocking=True)
    return out


def valid_targets(batch: dict) -> int:
    """Positions of a batch that have a next token to predict (what every loss is averaged over)."""
    if "target_mask" in batch:
        return int(batch["target_mask"].sum())
    if "loss_mask" in batch:
        return int(batch["loss_mask"][:, 1:].sum())
    ids = batch["input_ids"]
    return ids.shape[0] * (ids.shape[1] - 1)


def batch_objective(model: nn.Module, batch: dict, kd: KDConfig, w: Weights, *, head: Tensor | None = None,
                    chunk: int = 1024, backward: bool = False, loss_scale: float = 1.0,
                    denominator: int | None = None, autocast=None, net: Callable | None = None,
                    gate: GateStats | None = None, finish: Callable[[], Tensor] | None = None) -> dict:
    """One micro-batch: mean per-position CE, KD, feature and total loss over its own valid
    targets (for logging), and with ``backward`` their gradients, each term summed over positions
    and times ``loss_scale / denominator`` (``denominator``: the step's global count of valid
    targets; default this batch's).

    ``model``: a ``Trainable`` (or a bare HF causal LM); ``net``: what runs its forward (the
    DDP/FSDP wrapper; default ``model``). ``gate`` collects the router's statistics over a step;
    ``finish()`` gives a last scalar term (the step's load balance) for the one backward. Without
    ``gate``, a projected batch is its own step."""
    parts = as_trainable(model)
    mode = kd_modes.get(kd.mode)
    flat = flat_targets(batch, next(parts.parameters()).device)
    autocast = autocast or torch.autocast(flat["input_ids"].device.type, enabled=False)
    with autocast:
        hidden = (net or parts)(flat["input_ids"], flat.get("doc_ids"))  # [B, L, Ds]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    valid = flat.get("target_mask")
    n = h.shape[0] if valid is None else max(1, int(valid.sum()))
    router = parts.router if "router" in mode.modules else None
    if router is not None and gate is None and backward:  # a lone batch is a whole step
        gate = GateStats()
        finish = lambda: w.load_balance * step_load_balance(router, gate.inputs, gate.counts, gate.positions)
    if mode.whole_sequences:  # its loss spans several positions of one sequence: chunk by whole rows
        row = hidden.shape[1] - 1
        chunk = max(1, chunk // row) * row
    b = _Batch(flat, valid, mode, kd, w, parts.student.get_output_embeddings(), router, head, autocast, gate)
    grads = _ChunkGrads(h, (b.lm_head, router)) if backward else None
    scale = loss_scale / (denominator or n)
    sums = {"ce": 0.0, "kd": 0.0, "nll": 0.0, "top1": 0.0, "top1_n": 0.0, "kl": 0.0}
    h_detached = h.detach()
    for s in range(0, h.shape[0], chunk):  # every row; n (valid rows) is only the denominator
        rows = slice(s, s + chunk)
        h_rows = h_detached[rows].requires_grad_(backward)
        loss, logp, picked = _chunk_loss(b, rows, h_rows, sums)
        if backward:
            grads.add(loss * scale, rows, h_rows)
        else:
            _eval_extras(sums, flat, rows, logp, picked, valid)
    out = {k: v / n for k, v in sums.items()}
    out["top1_n"] = sums["top1_n"]
    feature_sum = _feature_term(parts, h, flat, valid, w, autocast, out)
    if backward:  # every trainable module gets a gradient (DDP waits for each)
        last = [] if feature_sum is None else [w.feature * feature_sum * scale]
        if finish is not None:
            last.append(finish() * loss_scale)
        grads.backward(parts.extras().values(), last)
    out["loss"] = w.ce * out["ce"] + w.kd * out["kd"] + w.feature * out.get("feature", 0.0)
    if gate is not None and gate.counts is not None:
        out["router_counts"] = gate.counts.detach()
    out["positions"] = n if valid is None else int(valid.sum())  # 0 when nothing is a target: it weighs nothing
    return out


@dataclass
class _Batch:
    """What every chunk of one micro-batch reads: its flat targets and mask, the KD mode and
    weights, and the modules the losses use."""

    flat: dict
    valid: Tensor | None
    mode: kd_modes.KDMode
    kd: KDConfig
    w: Weights
    lm_head: nn.Module
    router: nn.Module | None
    head: Tensor | None
    autocast: object
    gate: GateStats | None

    @property
    def use_kd(self) -> bool:
        return self.mode.loss is not None and (self.w.kd > 0 or self.router is not None)


def _chunk_loss(b: _Batch, rows: slice, h_rows: Tensor, sums: dict) -> tuple[Tensor, Tensor, Tensor]:
    """CE (and KD) over one chunk of positions, summed and weighted; their values go to ``sums``.
    Returns the loss, the student's log-probs, and those at the ids the terms need."""
    with b.autocast:
        logits = b.lm_head(h_rows)
    logp = torch.log_softmax(logits.float(), dim=-1)
    needed = _needed_ids(b.flat, b.mode, rows)
    picked = logp.gather(1, needed)
    smoothing_mean = logp.mean(-1) if b.w.label_smoothing > 0 else None
    ce_pos = losses.cross_entropy(picked[:, 0], b.w.label_smoothing, smoothing_mean)
    ce = (ce_pos if b.valid is None else ce_pos * b.valid[rows]).sum()
    sums["ce"] += float(ce.detach())
    loss = b.w.ce * ce
    if b.use_kd:
        kd_sum, aux_sum = _kd_term(b, rows, h_rows, logp, picked, needed)
        sums["kd"] += float(kd_sum.detach())
        loss = loss + b.w.kd * kd_sum
        if aux_sum is not None:
            loss = loss + b.w.projector * aux_sum
    return loss, logp, picked


def _needed_ids(flat: dict, mode: kd_modes.KDMode, rows: slice) -> Tensor:
    """Every id the terms need, for one gather: the target, the teacher's top-k, the sampled ids."""
    needed = flat["targets"][rows, None]
    if "topk_ids" in flat:
        needed = torch.cat([needed, flat["topk_ids"][rows]], dim=1)
    if "samples" in mode.needs:
        needed = torch.cat([needed, flat["draw_ids"][rows]], dim=1)
    return needed


def _kd_term(b: _Batch, rows: slice, h_rows: Tensor, logp: Tensor, picked: Tensor,
             needed: Tensor) -> tuple[Tensor, Tensor | None]:
    """The KD mode's loss summed over one chunk (a masked position contributes exactly zero), and
    the projector's own term; the router's statistics go to the step's gate."""
    view = {k: v[rows] for k, v in b.flat.items() if k in PER_POSITION}
    view.update({k: v for k, v in b.flat.items() if k in PER_BATCH})
    term = b.mode.loss(kd_modes.Chunk(logp, picked, {**view, "needed": needed}, b.w.temperature,
                                      b.kd.union_student_k, b.head, b.router, b.lm_head, h_rows, b.w.router_k,
                                      b.kd.divergence, b.kd.jsd_beta))
    per_position = term.per_position if b.valid is None else torch.where(b.valid[rows], term.per_position, 0.0)
    if b.gate is not None:
        b.gate.add(term)
    return per_position.sum(), term.aux_sum


def _feature_term(parts: Trainable, h: Tensor, flat: dict, valid: Tensor | None, w: Weights, autocast,
                  out: dict) -> Tensor | None:
    """MSE of the feature map of ``h`` to the cached teacher hidden state, summed over the kept
    positions (None without a feature map); its mean goes to ``out["feature"]``."""
    if parts.feature_map is None or not w.feature > 0:
        return None
    with autocast:
        mapped = parts.feature_map(h)
    err = ((mapped.float() - flat["hidden"]) ** 2).mean(-1)
    keep = flat.get("hidden_mask", valid)
    feature_sum = err.sum() if keep is None else (err * keep).sum()
    out["feature"] = float(feature_sum.detach()) / (h.shape[0] if keep is None else max(1, int(keep.sum())))
    return feature_sum


class _ChunkGrads:
    """Each chunk's gradient with respect to its slice of the detached ``h`` and to the modules it
    uses directly (the head, the router), gathered for the ONE backward through the transformer."""

    def __init__(self, h: Tensor, modules: tuple[nn.Module | None, ...]):
        self.h, self.h_grad = h, torch.zeros_like(h)
        self.side = [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]
        self.side_grads: list[Tensor | None] = [None] * len(self.side)

    def add(self, loss: Tensor, rows: slice, h_rows: Tensor) -> None:
        grads = torch.autograd.grad(loss, [h_rows, *self.side], allow_unused=True)
        self.h_grad[rows] += grads[0]
        for i, g in enumerate(grads[1:]):
            if g is not None:
                self.side_grads[i] = g if self.side_grads[i] is None else self.side_grads[i].add_(g)

    def backward(self, extras, last_terms: list[Tensor]) -> None:
        """From ``h`` with the gathered gradient, the side modules with theirs, and one scalar: the
        ``last_terms`` plus a zero over every parameter of ``extras`` (so each gets a gradient)."""
        roots: list[Tensor] = [self.h] + [p for p, g in zip(self.side, self.side_grads) if g is not None]
        grads_in: list[Tensor | None] = [self.h_grad] + [g for g in self.side_grads if g is not None]
        last = sum(p.sum() for m in extras if m is not None for p in m.parameters()) * 0.0
        for term in last_terms:
            last = last + term
        if torch.is_tensor(last):
            roots.append(last)
            grads_in.append(None)
        torch.autograd.backward(roots, grads_in)


@torch.no_grad()
def _eval_extras(sums: dict, flat: dict, rows: slice, logp: Tensor, picked: Tensor, valid: Tensor | None) -> None:
    """Unsmoothed NLL, agreement with the teacher's top-1, KL to its top-k + tail."""
    keep = 1.0 if valid is None else valid[rows]
    sums["nll"] += float((-picked[:, 0] * keep).sum())
    at_ids = picked[:, 1:1 + flat["topk_ids"].shape[1]] if "topk_ids" in flat else picked[:, 1:]
    if "topk_mask" in flat:  # cross-tokenizer: over the aligned positions whose top-1 maps
        top1_ok = flat["topk_mask"][rows, 0]
        sums["top1"] += float(((logp.argmax(-1) == flat["topk_ids"][rows, 0]) & top1_ok).sum())
        sums["top1_n"] += float(top1_ok.sum())
        sums["kl"] += float(losses.kd_mapped(at_ids, flat["topk_logprobs"][rows], flat["topk_mask"][rows], 1.0,
                                             teacher_log_tail=_rows(flat, "topk_log_tail", rows)).sum())
    elif "topk_ids" in flat:
        sums["top1"] += float(((logp.argmax(-1) == flat["topk_ids"][rows, 0]) * keep).sum())
        sums["top1_n"] += len(picked) if valid is None else float(valid[rows].sum())
        sums["kl"] += float((losses.kd_topk_tail(at_ids, flat["topk_logprobs"][rows], 1.0,
                                                 teacher_log_tail=_rows(flat, "topk_log_tail", rows)) * keep).sum())


def _rows(flat: dict, name: str, rows: slice) -> Tensor | None:
    return flat[name][rows] if name in flat else None
