"""The stage-2 objective over one batch, chunked over positions.

The student's last hidden state is computed once; the head, one fp32 ``log_softmax`` (shared
by CE and KD) and the losses then run over chunks of ``chunk`` positions. With ``backward=True``
each chunk's loss is backpropagated into a detached copy of the hidden state right away, so at
most one ``[chunk, V]`` logits tensor (and its graph) exists at a time; the accumulated hidden
gradient then flows through the transformer in a single backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.config import KDConfig

from . import losses
from . import router as routing


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


def kd_per_position(mode: str, logp, at_ids, batch: dict, rows: slice, head, kd: KDConfig, temperature: float):
    """The KD term per position; ``at_ids`` = the student's log-probs at the teacher's top-k ids
    (in cross-tokenizer batches: at their student twins)."""
    if mode == "mapped":
        return losses.kd_mapped(at_ids, batch["topk_logprobs"][rows], batch["topk_mask"][rows], temperature)
    if mode == "topk_tail":
        return losses.kd_topk_tail(at_ids, batch["topk_logprobs"][rows], temperature)
    if mode == "topk_renorm":
        return losses.kd_topk_renorm(at_ids, batch["topk_logprobs"][rows], temperature)
    if mode == "union":
        return losses.kd_union(logp, batch["hidden"][rows], head, batch["logz"][rows], batch["topk_ids"][rows],
                               kd.union_student_k, temperature)
    raise ValueError(mode)


PER_POSITION = ("topk_ids", "topk_logprobs", "logz", "hidden", "target_mask", "topk_mask", "hidden_mask")


def flat_targets(batch: dict, device) -> dict:
    """Positions 0..L-2 of every sequence (position L-1 has no next token), flattened, on device.

    Same-tokenizer batches hold per-token arrays [B, L, ...]; cross-tokenizer batches (they have
    ``target_mask``) hold them for the positions with a target already [B, L-1, ...]."""
    out = {"input_ids": batch["input_ids"].to(device)}
    out["targets"] = out["input_ids"][:, 1:].reshape(-1)
    cross = "target_mask" in batch
    for name in PER_POSITION:
        if name in batch:
            t = batch[name] if cross else batch[name][:, :-1]
            out[name] = t.reshape(-1, *t.shape[2:]).to(device)
    return out


def projected_terms(router, lm_head, flat: dict, rows: slice, needed, picked, w: Weights):
    """kd.mode=projected on the aligned positions of one chunk: the student's KD term against the
    projector's distribution over [next token, mapped teacher ids] (used DETACHED), and the
    projector/router's own loss, which reads only student-independent targets (the next student
    token, the mapped teacher distribution) through the student's head DETACHED."""
    sel = flat["hidden_mask"][rows]
    if not bool(sel.any()):
        zero = picked.sum() * 0.0
        return zero, zero, None
    out = router(flat["hidden"][rows][sel], flat["student_hidden"][rows][sel], w.router_k)
    head_w = lm_head.weight.detach()
    cand = needed[sel]
    mapped_ok = flat["topk_mask"][rows][sel] & (cand[:, 1:] != cand[:, :1])  # no twin of the target twice
    cand_mask = torch.cat([torch.ones_like(mapped_ok[:, :1]), mapped_ok], dim=1)
    target_logits = routing.projected_logits(out.projected.detach(), head_w, cand).float()
    kd_sum = losses.kd_topk_renorm(picked[sel], target_logits, w.temperature, cand_mask).sum()
    own = routing.projector_targets_loss(out.projected, head_w, cand[:, 0], cand[:, 1:],
                                         flat["topk_logprobs"][rows][sel], flat["topk_mask"][rows][sel], cand)
    aux = (w.projector * own + w.load_balance * out.load_balance) * int(sel.sum())  # sums, like the other terms
    return kd_sum, aux, out.utilisation


def batch_objective(model, batch: dict, kd: KDConfig, w: Weights, *, head=None, feature_map=None, router=None,
                    chunk: int = 1024, backward: bool = False, loss_scale: float = 1.0,
                    autocast=None) -> dict[str, float]:
    """Mean per-position CE, KD, feature and total loss; with ``backward`` also their gradients
    (times ``loss_scale``, e.g. 1/grad_accum times a GradScaler's scale)."""
    device = next(model.parameters()).device
    flat = flat_targets(batch, device)
    autocast = autocast or torch.autocast(device.type, enabled=False)
    with autocast:
        hidden = model.model(input_ids=flat["input_ids"]).last_hidden_state  # [B, L, Ds]
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    valid = flat.get("target_mask")
    n = h.shape[0] if valid is None else max(1, int(valid.sum()))
    h_leaf = h.detach().requires_grad_(backward)
    flat["student_hidden"] = h_leaf  # what the router's gate reads (it detaches it again)
    lm_head = model.get_output_embeddings()
    utilisation = None
    sums = {"ce": 0.0, "kd": 0.0, "nll": 0.0, "top1": 0.0, "top1_n": 0.0, "kl": 0.0}
    for s in range(0, h.shape[0], chunk):  # every row; n (valid rows) is only the denominator
        rows = slice(s, s + chunk)
        with autocast:
            logits = lm_head(h_leaf[rows])
        logp = torch.log_softmax(logits.float(), dim=-1)
        # One gather for every id the terms need: the target, then the teacher's top-k.
        needed = flat["targets"][rows, None]
        if "topk_ids" in flat:
            needed = torch.cat([needed, flat["topk_ids"][rows]], dim=1)
        picked = logp.gather(1, needed)
        at_ids = picked[:, 1:]
        smoothing_mean = logp.mean(-1) if w.label_smoothing > 0 else None
        ce_pos = losses.cross_entropy(picked[:, 0], w.label_smoothing, smoothing_mean)
        ce = (ce_pos if valid is None else ce_pos * valid[rows]).sum()
        loss = w.ce * ce
        if kd.mode == "projected" and router is not None:
            kd_sum, aux, util = projected_terms(router, lm_head, flat, rows, needed, picked, w)
            utilisation = util if util is not None else utilisation
            loss = loss + w.kd * kd_sum + aux
            sums["kd"] += float(kd_sum.detach())
        elif kd.mode != "none" and w.kd > 0:
            kd_sum = kd_per_position(kd.mode, logp, at_ids, flat, rows, head, kd, w.temperature).sum()
            loss = loss + w.kd * kd_sum
            sums["kd"] += float(kd_sum.detach())
        if backward:
            (loss * (loss_scale / n)).backward()
        else:  # eval extras: unsmoothed NLL, agreement with the teacher's top-1, KL to its top-k+tail
            with torch.no_grad():
                keep = 1.0 if valid is None else valid[rows]
                sums["nll"] += float((-picked[:, 0] * keep).sum())
                if "topk_mask" in flat:  # cross-tokenizer: over the aligned positions whose top-1 maps
                    top1_ok = flat["topk_mask"][rows, 0]
                    sums["top1"] += float(((logp.argmax(-1) == flat["topk_ids"][rows, 0]) & top1_ok).sum())
                    sums["top1_n"] += float(top1_ok.sum())
                    sums["kl"] += float(losses.kd_mapped(at_ids, flat["topk_logprobs"][rows],
                                                         flat["topk_mask"][rows], 1.0).sum())
                elif "topk_ids" in flat:
                    sums["top1"] += float((logp.argmax(-1) == flat["topk_ids"][rows, 0]).sum())
                    sums["top1_n"] += len(picked)
                    sums["kl"] += float(losses.kd_topk_tail(at_ids, flat["topk_logprobs"][rows], 1.0).sum())
        sums["ce"] += float(ce.detach())
    out = {k: v / n for k, v in sums.items()}
    out["top1_n"] = sums["top1_n"]
    feature = None
    if feature_map is not None and w.feature > 0:
        with autocast:
            mapped = feature_map(h)
        err = ((mapped.float() - flat["hidden"]) ** 2).mean(-1)
        keep = flat.get("hidden_mask")
        feature = err.mean() if keep is None else (err * keep).sum() / keep.sum().clamp(min=1)
        out["feature"] = float(feature.detach())
    if backward:
        grads = [h_leaf.grad] + ([None] if feature is not None else [])
        outputs = [h] + ([feature * (w.feature * loss_scale)] if feature is not None else [])
        torch.autograd.backward(outputs, grads)
    out["loss"] = w.ce * out["ce"] + w.kd * out["kd"] + w.feature * out.get("feature", 0.0)
    if utilisation is not None:
        out["router_utilisation"] = [round(float(u), 4) for u in utilisation]
    out["positions"] = n
    return out
