"""P9: our stage-2 step against a bare PyTorch step on the same student, batch and precision.

The bare step is what a user would write by hand and nothing else: the student's forward to its
last hidden state, the head and cross-entropy over chunks of ``train.loss_chunk_size`` positions
(summed, one backward), gradient clipping at ``train.grad_clip`` and ``AdamW.step``. Ours is the
recipe's ``train_step`` (stage2_student_train/step.py: the per-chunk gradients, the finite check,
the GradScaler, EMA, the scheduler, mode dispatch), once with ``kd.mode=none`` (CE only: target
<= 1.05) and once with the config's KD mode (``topk_sampled`` in the default config: <= 1.10).

Each of ours is paired with the bare step (``bench/paired.py``: alternating order, pairs added
until the median ratio's 95% CI is within ``margin`` or a time bound), on the same batch (already
in memory) and the same parameters, each with its own optimizer. ``python -m bench.p9``: one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from bench.paired import paired_ratio
from pipeline.config import Config


def bare_step_fn(student: torch.nn.Module, batch: dict, cfg: Config, autocast):
    """A hand-written step over ``batch``: forward, chunked CE, backward, clip, AdamW."""
    params = [p for p in student.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.train.weight_decay},
                                   {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}],
                                  lr=cfg.train.lr, betas=(cfg.train.beta1, cfg.train.beta2), foreach=False)
    body, head = student.get_decoder(), student.get_output_embeddings()
    device = next(student.parameters()).device
    ids = batch["input_ids"].to(device)
    targets = ids[:, 1:].reshape(-1)
    chunk = cfg.train.loss_chunk_size

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1].reshape(-1, head.in_features)
        loss = 0.0
        for s in range(0, hidden.shape[0], chunk):
            with autocast:
                logits = head(hidden[s:s + chunk])
            loss = loss + F.cross_entropy(logits.float(), targets[s:s + chunk], reduction="sum")
        loss = loss / targets.numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        optimizer.step()
        return float(loss)

    return step


def p8_pair(run, state, batch, cfg: Config, margin: float = 0.025, max_s: float = 240.0) -> dict:
    """P8: the recipe's KD step on the next prefetched batch / the same step on a batch already in
    memory, paired (``bench/paired.py``)."""
    from bench.run import train_step

    return paired_ratio(lambda: train_step(run, state, state.data.next_batch(), cfg.kd.mode, cfg),
                        lambda: train_step(run, state, batch, cfg.kd.mode, cfg), margin, max_s=max_s)


def measure(cfg: Config, margin: float = 0.025, max_s: float = 240.0, with_p8: bool = False) -> dict:
    from bench.run import student_setup, train_step

    run, state = student_setup(cfg)
    batch = state.data.next_batch()
    bare = bare_step_fn(state.parts.student, batch, cfg, run.autocast())
    kd_mode = cfg.kd.mode
    ours_ce = lambda: train_step(run, state, batch, "none", cfg)  # noqa: E731
    ours_kd = lambda: train_step(run, state, batch, kd_mode, cfg)  # noqa: E731
    for fn in (bare, ours_ce, ours_kd):  # warm-up: allocator, optimizer state
        fn()
    ce = paired_ratio(ours_ce, bare, margin, max_s=max_s)
    kd = paired_ratio(ours_kd, bare, margin, max_s=max_s)
    p8 = p8_pair(run, state, batch, cfg, margin, max_s) if with_p8 else None
    out = {"P8": p8, "ratio": {k: ce[k] for k in ("median", "min", "max", "n")}, "ce": ce, "kd": kd, "kd_mode": kd_mode,
            "batch_tokens": batch["input_ids"].numel(), "precision": str(run.precision.dtype)}
    state.data.close()
    return out


def main() -> None:
    from bench.run import bench_config
    from stage1_teacher_cache.run import cache_teacher

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--margin", type=float, default=0.025)
    ap.add_argument("--max-s", type=float, default=240.0)
    ap.add_argument("--p8", action="store_true", help="also P8 (prefetched / in-memory step) on the same setup")
    ap.add_argument("--sequences", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="kd-p9-") as tmp:
        cfg = bench_config(Path(tmp) / "cache", args, [])
        cache_teacher(cfg, show_progress=False)
        print(json.dumps(measure(cfg, args.margin, args.max_s, args.p8), default=float))


if __name__ == "__main__":
    main()
