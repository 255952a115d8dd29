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

    def forward(self, input_ids: Tensor) -> Tensor:
        # The model's own accessor (Llama/Qwen: .model, GPT-2: .transformer); no KV cache in training.
        return decoder_of(self.student)(input_ids=input_ids, use_cache=False).last_hidden_state

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
                "hidden_mask", "draw_ids", "draw_counts")


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
    net = net or parts
    mode = kd_modes.get(kd.mode)
    device = next(parts.parameters()).device
    flat = flat_targets(batch, device)
    autocast = autocast or torch.autocast(device.type, enabled=False)
    with autocast:
        hidden = net(flat["input_ids"])  # [B, L, Ds]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    valid = flat.get("target_mask")
    n = h.shape[0] if valid is None else max(1, int(valid.sum()))
    scale = loss_scale / (denominator or n)
    lm_head = parts.student.get_output_embeddings()
    router = parts.router if "router" in mode.modules else None
    if router is not None and gate is None and backward:  # a lone batch is a whole step
        gate = GateStats()
        finish = lambda: w.load_balance * step_load_balance(router, gate.inputs, gate.counts, gate.positions)
    side = [p for m in (lm_head, router) if m is not None for p in m.parameters() if p.requires_grad]
    side_grads: list[Tensor | None] = [None] * len(side)
    h_detached = h.detach()
    h_grad = torch.zeros_like(h) if backward else None
    use_kd = mode.loss is not None and (w.kd > 0 or router is not None)
    sums = {"ce": 0.0, "kd": 0.0, "nll": 0.0, "top1": 0.0, "top1_n": 0.0, "kl": 0.0}
    for s in range(0, h.shape[0], chunk):  # every row; n (valid rows) is only the denominator
        rows = slice(s, s + chunk)
        h_rows = h_detached[rows].requires_grad_(backward)
        with autocast:
            logits = lm_head(h_rows)
        logp = torch.log_softmax(logits.float(), dim=-1)
        # One gather for every id the terms need: the target, the teacher's top-k, the sampled ids.
        needed = flat["targets"][rows, None]
        if "topk_ids" in flat:
            needed = torch.cat([needed, flat["topk_ids"][rows]], dim=1)
        if "samples" in mode.needs:
            needed = torch.cat([needed, flat["draw_ids"][rows]], dim=1)
        picked = logp.gather(1, needed)
        smoothing_mean = logp.mean(-1) if w.label_smoothing > 0 else None
        ce_pos = losses.cross_entropy(picked[:, 0], w.label_smoothing, smoothing_mean)
        ce = (ce_pos if valid is None else ce_pos * valid[rows]).sum()
        loss = w.ce * ce
        if use_kd:
            view = {k: v[rows] for k, v in flat.items() if k in PER_POSITION}
            term = mode.loss(kd_modes.Chunk(logp, picked, {**view, "needed": needed}, w.temperature,
                                            kd.union_student_k, head, router, lm_head, h_rows, w.router_k))
            per_position = term.per_position if valid is None else torch.where(valid[rows], term.per_position, 0.0)
            kd_sum = per_position.sum()
            loss = loss + w.kd * kd_sum
            if term.aux_sum is not None:
                loss = loss + w.projector * term.aux_sum
            if gate is not None:
                gate.add(term)
            sums["kd"] += float(kd_sum.detach())
        if backward:
            grads = torch.autograd.grad(loss * scale, [h_rows, *side], allow_unused=True)
            h_grad[rows] += grads[0]
            for i, g in enumerate(grads[1:]):
                if g is not None:
                    side_grads[i] = g if side_grads[i] is None else side_grads[i].add_(g)
        else:
            _eval_extras(sums, flat, rows, logp, picked, valid)
        sums["ce"] += float(ce.detach())
    out = {k: v / n for k, v in sums.items()}
    out["top1_n"] = sums["top1_n"]
    feature_sum = None
    if parts.feature_map is not None and w.feature > 0:
        with autocast:
            mapped = parts.feature_map(h)
        err = ((mapped.float() - flat["hidden"]) ** 2).mean(-1)
        keep = flat.get("hidden_mask", valid)
        feature_sum = err.sum() if keep is None else (err * keep).sum()
        out["feature"] = float(feature_sum.detach()) / (h.shape[0] if keep is None else max(1, int(keep.sum())))
    if backward:
        roots: list[Tensor] = [h] + [p for p, g in zip(side, side_grads) if g is not None]
        grads_in: list[Tensor | None] = [h_grad] + [g for g in side_grads if g is not None]
        last = sum(p.sum() for m in parts.extras().values() if m is not None for p in m.parameters()) * 0.0
        if feature_sum is not None:  # every trainable module gets a gradient (DDP waits for each)
            last = last + w.feature * feature_sum * scale
        if finish is not None:
            last = last + finish() * loss_scale
        if torch.is_tensor(last):
            roots.append(last)
            grads_in.append(None)
        torch.autograd.backward(roots, grads_in)
    out["loss"] = w.ce * out["ce"] + w.kd * out["kd"] + w.feature * out.get("feature", 0.0)
    if gate is not None and gate.counts is not None:
        out["router_counts"] = gate.counts.detach()
    out["positions"] = n
    return out


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
