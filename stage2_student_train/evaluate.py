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


def main(args) -> int:
    """``python -m pipeline eval --config FILE [key=value ...]``: the run's exported student
    (``runs/<name>/final/student``, EMA weights) on the cache's held-out sequences, as JSON."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from pipeline.cache import CacheReader
    from pipeline.config import load_config
    from pipeline.errors import PipelineError

    from .data import data_access
    from .student import load_student_tokenizer

    cfg = load_config(args.config, args.overrides)
    student_dir = Path(cfg.run.runs_dir) / cfg.run.name / "final" / "student"
    if not (student_dir / "config.json").is_file():
        raise PipelineError(f"{student_dir} holds no exported student; train it first (train-student) or set run.name")
    reader = CacheReader(cfg.cache.dir, views_dir=cfg.cache.views_dir or None)
    reader.require_complete()
    tokenizer, same = load_student_tokenizer(cfg, reader)
    access = data_access(reader, tokenizer, same, need_hidden=False)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    ids = list(reader.split_indices("eval"))[: cfg.train.eval_sequences or None]
    result = evaluate(model, access.load, access.target_bytes, ids, cfg.train.batch_size, cfg.train.loss_chunk_size,
                      torch.autocast("cpu", enabled=False))
    print(json.dumps({"run": str(student_dir.parent.parent), **result}, indent=1))
    return 0
