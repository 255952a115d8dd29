"""Held-out evaluation: CE, perplexity, bits per byte, KL to the teacher's top-k+tail, top-1
agreement. No label smoothing, no gradients."""

from __future__ import annotations

import math

import numpy as np
import torch

from typing import Callable

from pipeline.config import KDConfig

from .objective import Weights, batch_objective


@torch.no_grad()
def evaluate(model, load: Callable[[np.ndarray], dict], target_bytes: Callable[[int], int], indices: list[int],
             batch_size: int, chunk: int, autocast) -> dict:
    """``load(ids)`` gives a batch (same- or cross-tokenizer); ``target_bytes(i)`` the UTF-8 bytes
    its targets cover, so bits per byte compare across tokenizers."""
    was_training = model.training
    model.eval()
    sums = {"nll": 0.0, "kl": 0.0, "top1": 0.0}
    positions, top1_n, n_bytes = 0, 0.0, 0
    for s in range(0, len(indices), batch_size):
        ids = np.asarray(indices[s:s + batch_size])
        out = batch_objective(model, load(ids), KDConfig(mode="none"), Weights(1.0, 0.0, 1.0, 0.0, 0.0),
                              chunk=chunk, backward=False, autocast=autocast)
        for k in sums:
            sums[k] += out[k] * out["positions"]
        positions += out["positions"]
        top1_n += out["top1_n"]
        n_bytes += sum(target_bytes(int(i)) for i in ids)
    model.train(was_training)
    ce = sums["nll"] / positions
    return {"ce": ce, "ppl": math.exp(ce), "bpb": sums["nll"] / math.log(2) / n_bytes,
            "kl_teacher_topk": sums["kl"] / positions,
            "teacher_top1_agree": sums["top1"] / top1_n if top1_n else None, "positions": positions}
