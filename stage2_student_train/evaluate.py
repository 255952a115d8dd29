"""Held-out evaluation: CE, perplexity, bits per byte, KL to the teacher's top-k+tail, top-1
agreement. No label smoothing, no gradients."""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.config import KDConfig

from .data import TRAIN_ARRAYS, load_batch, target_bytes
from .objective import Weights, batch_objective


@torch.no_grad()
def evaluate(model, reader: CacheReader, indices: list[int], batch_size: int, chunk: int, autocast) -> dict:
    was_training = model.training
    model.eval()
    sums = {"nll": 0.0, "kl": 0.0, "top1": 0.0}
    positions, n_bytes = 0, 0
    for s in range(0, len(indices), batch_size):
        ids = np.asarray(indices[s:s + batch_size])
        batch = load_batch(reader, ids, TRAIN_ARRAYS)
        out = batch_objective(model, batch, KDConfig(mode="none"), Weights(1.0, 0.0, 1.0, 0.0, 0.0),
                              chunk=chunk, backward=False, autocast=autocast)
        for k in sums:
            sums[k] += out[k] * out["positions"]
        positions += out["positions"]
        n_bytes += sum(target_bytes(reader, int(i)) for i in ids)
    model.train(was_training)
    ce = sums["nll"] / positions
    return {"ce": ce, "ppl": math.exp(ce), "bpb": sums["nll"] / math.log(2) / n_bytes,
            "kl_teacher_topk": sums["kl"] / positions, "teacher_top1_agree": sums["top1"] / positions,
            "positions": positions}
