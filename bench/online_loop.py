"""The teacher-in-the-loop training the quality runs compare against: the recipe's own student,
optimizer, LR schedule, EMA and data order (``build_state``), with the KD term computed each step
from a teacher run on the batch. The same-tokenizer (full-vocabulary KL) and cross-tokenizer (the
full distribution through the vocabulary map) references differ only in their per-step losses."""

from __future__ import annotations

import copy
import time
from typing import Callable

import torch

from pipeline.config import Config
from pipeline.distributed import Dist
from stage2_student_train.state import build_state, setup_run
from stage2_student_train.step import step_weights

StepLosses = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, int]]
"""(batch, the student's [B, L-1, V] log-probs) -> (CE, KD, target positions counted)."""


def train_teacher_in_loop(cfg: Config, make_losses: Callable[[object], StepLosses]
                          ) -> tuple[torch.nn.Module, list[dict]]:
    """Train ``cfg``'s student (its kd.mode is ignored: ``make_losses(run)`` gives each step's CE
    and KD); returns the EMA student (when enabled) and the per-step records."""
    run = setup_run(cfg, Dist(), show_progress=False)
    state = build_state(run)
    losses = make_losses(run)
    head = state.parts.student.get_output_embeddings()
    records = []
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        w = step_weights(cfg, step)
        batch = state.data.next_batch()
        state.optimizer.zero_grad(set_to_none=True)
        logp = torch.log_softmax(head(state.parts(batch["input_ids"])[:, :-1]).float(), -1)
        ce, kd, n = losses(batch, logp)
        (w.ce * ce + w.kd * kd).backward()
        torch.nn.utils.clip_grad_norm_(state.params, cfg.train.grad_clip)
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.named)
        records.append({"step": step + 1, "ce": float(ce.detach()), "kd": float(kd.detach()),
                        "tokens_per_s": n / (time.perf_counter() - t0)})
    state.data.close()
    with state.ema.applied(state.named) if state.ema is not None else torch.no_grad():
        student = copy.deepcopy(state.parts.student).eval()
    return student, records
