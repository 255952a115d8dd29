"""Held-out evaluation: CE, perplexity, bits per byte, KL to the teacher's top-k+tail, top-1
agreement. No label smoothing, no gradients."""

from __future__ import annotations

import math

import numpy as np
import torch

from typing import Callable

from pipeline.config import KDConfig
from pipeline.distributed import Dist

from .objective import Weights, batch_objective


@torch.no_grad()
def evaluate(model, load: Callable[[np.ndarray], dict], target_bytes: Callable[[int], int], indices: list[int],
             batch_size: int, chunk: int, autocast, *, net=None, dist: Dist | None = None) -> dict:
    """``load(ids)`` gives a batch (same- or cross-tokenizer); ``target_bytes(i)`` the UTF-8 bytes
    its targets cover, so bits per byte compare across tokenizers. Under torchrun every rank
    evaluates its share of ``indices`` and the sums are all-reduced; every rank runs the same
    number of forwards (FSDP gathers parameters in each), a rank with nothing left re-reads one
    sequence and counts nothing."""
    dist = dist or Dist()
    was_training = model.training
    model.eval()
    sums = {"nll": 0.0, "kl": 0.0, "top1": 0.0, "top1_n": 0.0, "positions": 0.0, "bytes": 0.0}
    for s in range(0, len(indices), batch_size * dist.world):
        group = indices[s:s + batch_size * dist.world]
        ids = np.asarray(group[dist.rank::dist.world] or group[:1])
        weight = 1.0 if group[dist.rank::dist.world] else 0.0
        out = batch_objective(model, load(ids), KDConfig(mode="none"), Weights(1.0, 0.0, 1.0, 0.0, 0.0),
                              chunk=chunk, backward=False, autocast=autocast, net=net)
        for k in ("nll", "kl", "top1"):
            sums[k] += weight * out[k] * out["positions"]
        sums["positions"] += weight * out["positions"]
        sums["top1_n"] += weight * out["top1_n"]
        sums["bytes"] += weight * sum(target_bytes(int(i)) for i in ids)
    model.train(was_training)
    sums = dict(zip(sums, dist.all_sum(list(sums.values()))))
    if not sums["positions"]:
        from pipeline.errors import DataError
        raise DataError(f"the {len(indices)} held-out sequences hold no target token (a chat cache whose held-out "
                        "conversations have no assistant token in its sequences), so there is nothing to evaluate; "
                        "rebuild the cache with held-out conversations that fill a sequence (data.eval_documents)")
    ce = sums["nll"] / sums["positions"]
    return {"ce": ce, "ppl": math.exp(ce), "bpb": sums["nll"] / math.log(2) / sums["bytes"],
            "kl_teacher_topk": sums["kl"] / sums["positions"],
            "teacher_top1_agree": sums["top1"] / sums["top1_n"] if sums["top1_n"] else None,
            "positions": int(sums["positions"])}


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

    cfg = load_config(args.config, args.overrides)
    student_dir = Path(cfg.run.runs_dir) / cfg.run.name / "final" / "student"
    if not (student_dir / "config.json").is_file():
        raise PipelineError(f"{student_dir} holds no exported student; train it first (train-student) or set run.name")
    reader = CacheReader(cfg.cache.dir, views_dir=cfg.cache.views_dir or None)
    reader.require_complete()
    tokenizer, same = exported_tokenizer(student_dir, reader)
    access = data_access(reader, tokenizer, same, need_hidden=False)
    try:
        model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32)
    except Exception as e:  # transformers/safetensors raise many types for a truncated or damaged file
        raise PipelineError(f"the exported student in {student_dir} is damaged or incomplete ({e.__class__.__name__}: "
                            f"{str(e).splitlines()[0][:100] if str(e) else ''}); export it again: resume the run "
                            "from its last checkpoint, or retrain") from None
    ids = list(reader.split_indices("eval"))[: cfg.train.eval_sequences or None]
    result = evaluate(model, access.load, access.target_bytes, ids, cfg.train.batch_size, cfg.train.loss_chunk_size,
                      torch.autocast("cpu", enabled=False))
    counted = {"counted": access.counted} if reader.spec.has_loss_mask else {}
    print(json.dumps({"run": str(student_dir.parent.parent), **result, **counted}, indent=1))
    return 0


def exported_tokenizer(student_dir, reader):
    """(tokenizer, same_as_teacher) of an exported student: the tokenizer saved beside its
    weights, whatever the config at hand says (the run's config may not be the one given)."""
    from transformers import AutoTokenizer

    from pipeline.errors import PipelineError
    from pipeline.fingerprint import tokenizer_hash

    try:
        tok = AutoTokenizer.from_pretrained(student_dir)
    except Exception as e:
        raise PipelineError(f"the tokenizer saved with {student_dir} is unreadable ({e.__class__.__name__}); "
                            "export the run again") from None
    return tok, tokenizer_hash(tok) == reader.fingerprint["tokenizer_hash"]
