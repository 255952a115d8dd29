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
import torch.nn.functional as F

from pipeline.config import KDConfig

from . import losses


@dataclass
class Weights:
    ce: float
    kd: float
    temperature: float
    label_smoothing: float
    feature: float


def kd_per_position(mode: str, logp, batch: dict, rows: slice, head, kd: KDConfig, temperature: float):
    ids = batch["topk_ids"][rows]
    if mode == "topk_tail":
        return losses.kd_topk_tail(logp, ids, batch["topk_logprobs"][rows], temperature)
    if mode == "topk_renorm":
        return losses.kd_topk_renorm(logp, ids, batch["topk_logprobs"][rows], temperature)
    if mode == "union":
        return losses.kd_union(logp, batch["hidden"][rows], head, batch["logz"][rows], ids,
                               kd.union_student_k, temperature)
    raise ValueError(mode)


def flat_targets(batch: dict, device) -> dict:
    """Positions 0..L-2 of every sequence (position L-1 has no next token), flattened, on device."""
    out = {"input_ids": batch["input_ids"].to(device)}
    out["targets"] = out["input_ids"][:, 1:].reshape(-1)
    for name in ("topk_ids", "topk_logprobs", "logz", "hidden"):
        if name in batch:
            t = batch[name][:, :-1]
            out[name] = t.reshape(-1, *t.shape[2:]).to(device)
    return out


def batch_objective(model, batch: dict, kd: KDConfig, w: Weights, *, head=None, feature_map=None,
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
    n = h.shape[0]
    h_leaf = h.detach().requires_grad_(backward)
    lm_head = model.get_output_embeddings()
    sums = {"ce": 0.0, "kd": 0.0, "nll": 0.0, "top1": 0.0, "kl": 0.0}
    for s in range(0, n, chunk):
        rows = slice(s, s + chunk)
        with autocast:
            logits = lm_head(h_leaf[rows])
        logp = torch.log_softmax(logits.float(), dim=-1)
        ce = losses.cross_entropy(logp, flat["targets"][rows], w.label_smoothing).sum()
        loss = w.ce * ce
        if kd.mode != "none" and w.kd > 0:
            kd_sum = kd_per_position(kd.mode, logp, flat, rows, head, kd, w.temperature).sum()
            loss = loss + w.kd * kd_sum
            sums["kd"] += float(kd_sum.detach())
        if backward:
            (loss * (loss_scale / n)).backward()
        else:  # eval extras: unsmoothed NLL, agreement with the teacher's top-1, KL to its top-k+tail
            sums["nll"] += float(-logp.gather(1, flat["targets"][rows, None]).sum())
            if "topk_ids" in flat:
                sums["top1"] += float((logp.argmax(-1) == flat["topk_ids"][rows, 0]).sum())
                sums["kl"] += float(losses.kd_topk_tail(logp, flat["topk_ids"][rows],
                                                        flat["topk_logprobs"][rows], 1.0).sum())
        sums["ce"] += float(ce.detach())
    out = {k: v / n for k, v in sums.items()}
    feature = None
    if feature_map is not None and w.feature > 0:
        with autocast:
            mapped = feature_map(h)
        feature = F.mse_loss(mapped.float(), flat["hidden"], reduction="mean")
        out["feature"] = float(feature.detach())
    if backward:
        grads = [h_leaf.grad] + ([None] if feature is not None else [])
        outputs = [h] + ([feature * (w.feature * loss_scale)] if feature is not None else [])
        torch.autograd.backward(outputs, grads)
    out["loss"] = w.ce * out["ce"] + w.kd * out["kd"] + w.feature * out.get("feature", 0.0)
    out["positions"] = n
    return out
