"""The cross-tokenizer setting of ``make quality`` (``--setting cross``): the embedded teacher into a
student with the real GPT-2 BPE, from the same cache as the default setting.

- ``online_cross``: the reference the cross-tokenizer modes approximate. The teacher runs inside
  every step on the batch's cached teacher tokens; at every aligned student position its FULL
  distribution is pushed through the same vocabulary map (``cross_losses.kd_mapped_full``: twins
  summed, the unmapped mass as one bucket against the student's no-twin ids). CE + that KD, with
  the recipe's own student, optimizer, schedule, EMA and data order (``build_state``).
- ``evaluate_cross``: every student on the held-out sequences in its OWN tokenization: bits per
  byte (the student's summed NLL over the UTF-8 bytes its targets cover, comparable with the
  teacher's), ECE of its top-1 over its own positions, student-token perplexity (comparable
  between the variants, which share the tokenizer), and at aligned positions the mapped KL to the
  teacher's full distribution and agreement with the twin of the teacher's top-1.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.config import Config
from pipeline.distributed import Dist
from stage2_student_train.cross import load_or_build_view, twin_ids
from stage2_student_train.cross_losses import kd_mapped_full
from stage2_student_train.state import setup_run
from stage2_student_train.student import load_teacher_tokenizer

from .online_loop import train_teacher_in_loop

CROSS_VARIANTS = ["none", "mapped", "mapped_sampled", "projected", "uld", "chunk_likelihood", "online_cross"]
KD_ROWS = 256
"""Aligned positions per call of the exact mapped loss (its float64 [rows, V] buffers)."""


def teacher_full_logp(teacher, reader: CacheReader, indices: np.ndarray) -> torch.Tensor:
    """The teacher's log-probs [B, Lt, V] at every cached position of ``indices``."""
    ids = torch.from_numpy(reader.read_indices(indices, ("input_ids",))["input_ids"].astype(np.int64))
    with torch.inference_mode():
        return torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)


def mapped_kd_sum(logp: torch.Tensor, t_logp: torch.Tensor, batch: dict, vmap: torch.Tensor,
                  twins: torch.Tensor, with_constant: bool = True) -> torch.Tensor:
    """Sum over the batch's aligned target positions of the exact mapped KL (student ``logp``
    [B, Ls-1, Vs], teacher ``t_logp`` [B, Lt, Vt]), in float32 (``with_constant=False``: without the
    student-independent ``sum q log q``, for training)."""
    b, j = batch["kd_position"].nonzero(as_tuple=True)
    t = batch["aligned"][b, j]
    total = logp.new_zeros(())
    for s in range(0, len(b), KD_ROWS):
        rows = slice(s, s + KD_ROWS)
        total = total + kd_mapped_full(logp[b[rows], j[rows]], t_logp[b[rows], t[rows]], vmap, twins,
                                       torch.float32, with_constant).sum()
    return total


def _view(run):
    view = load_or_build_view(run.reader, load_teacher_tokenizer(run.reader), run.tokenizer, show_progress=False)
    return torch.from_numpy(view.vmap), torch.from_numpy(twin_ids(view.vmap))


def train_online_cross(cfg: Config, teacher) -> tuple[torch.nn.Module, list[dict]]:
    """CE + the exact mapped KL of the teacher's full distribution, the teacher run every step
    (cfg: kd.mode=none, the variant's seed)."""
    def make_losses(run):
        vmap, twins = _view(run)

        def losses(batch, logp):
            ids, mask = batch["input_ids"], batch["target_mask"]
            t_logp = teacher_full_logp(teacher, run.reader, batch["sample_ids"].numpy())
            n = max(1, int(mask.sum()))
            ce = -(logp.gather(-1, ids[:, 1:, None])[..., 0] * mask).sum() / n
            kd = mapped_kd_sum(logp, t_logp, batch, vmap, twins, with_constant=False) / n
            return ce, kd, n
        return losses

    return train_teacher_in_loop(cfg, make_losses)


@torch.no_grad()
def evaluate_cross(students: dict[str, torch.nn.Module], teacher, cfg: Config, batch_size: int) -> dict:
    """Every student (its own tokenization) and the teacher on the held-out sequences (see the
    module docstring); ``cfg`` = any variant's config of the setting (for the data access)."""
    from bench.quality import ece
    from stage2_student_train.data import target_bytes

    run = setup_run(cfg, Dist(), show_progress=False)
    vmap, twins = _view(run)
    reader, access = run.reader, run.access
    names = [*students, "teacher"]
    acc = {v: {"nll": 0.0, "n": 0, "bytes": 0, "kl": 0.0, "agree": 0.0, "aligned": 0, "conf": [], "correct": []}
           for v in names}
    indices = np.asarray(reader.split_indices("eval"))
    for s in range(0, len(indices), batch_size):
        rows = indices[s:s + batch_size]
        batch = access.load(rows)
        t_logp = teacher_full_logp(teacher, reader, rows)
        mask, kd_pos = batch["target_mask"], batch["kd_position"]
        b, j = kd_pos.nonzero(as_tuple=True)
        t_top1 = vmap[t_logp[b, batch["aligned"][b, j]].argmax(-1)]
        for name, model in students.items():
            a = acc[name]
            logp = torch.log_softmax(model(input_ids=batch["input_ids"]).logits[:, :-1].float(), -1)
            targets = batch["input_ids"][:, 1:]
            a["nll"] += float(-(logp.gather(-1, targets[..., None])[..., 0] * mask).sum())
            a["n"] += int(mask.sum())
            a["bytes"] += sum(access.target_bytes(int(i)) for i in rows)
            conf, top1 = logp.max(-1)
            a["conf"].append(conf.exp()[mask].numpy())
            a["correct"].append((top1 == targets)[mask].numpy())
            a["kl"] += float(mapped_kd_sum(logp, t_logp, batch, vmap, twins))
            a["agree"] += float((top1[b, j] == t_top1).sum())
            a["aligned"] += len(b)
        a = acc["teacher"]  # the teacher on its own tokens (its bits/byte compare with the students')
        t_ids = torch.from_numpy(reader.read_indices(rows, ("input_ids",))["input_ids"].astype(np.int64))
        lp = t_logp[:, :-1]
        a["nll"] += float(-lp.gather(-1, t_ids[:, 1:, None]).sum())
        a["n"] += t_ids[:, 1:].numel()
        a["bytes"] += sum(target_bytes(reader, int(i)) for i in rows)
        conf, top1 = lp.max(-1)
        a["conf"].append(conf.exp().reshape(-1).numpy())
        a["correct"].append((top1 == t_ids[:, 1:]).reshape(-1).numpy())
        a["agree"] += len(b)
        a["aligned"] += len(b)
    run.access = None
    out = {}
    for name, a in acc.items():
        out[name] = {"ppl": math.exp(a["nll"] / a["n"]), "bpb": a["nll"] / math.log(2) / a["bytes"],
                     "ece": ece(np.concatenate(a["conf"]), np.concatenate(a["correct"])),
                     "top1_agree": a["agree"] / max(1, a["aligned"]), "kl_full": a["kl"] / max(1, a["aligned"])}
    out["positions"] = acc[names[0]]["n"]
    return out
