"""Gradient fidelity: each offline KD mode's gradient w.r.t. the student's logits, on held-out
cached positions, against the exact full-vocabulary ``KL(p || s)`` gradient ``s - p`` (p from the
teacher run on the same tokens). Noise-free where end-to-end perplexities are not: one student,
one batch, every mode's loss through its own registry entry on the cache's own (decoded) arrays.

Reported per (student, mode): ``cosine`` = <g, s - p> / (|g| |s - p|) over all positions and
logits, ``norm_ratio`` = |g| / |s - p|, and ``position_cosine`` = the mean over positions of the
per-position cosine. ``sampled_fresh_N``: RS-KD's estimator with N fresh draws from the exact
teacher (stage 1's sampler), to see what more draws would buy without building a cache.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache import CacheReader
from stage1_teacher_cache import sampling
from stage2_student_train import kd_modes, losses
from stage2_student_train.data import array_names, load_batch
from stage2_student_train.objective import flat_targets

MODES = ("topk_tail", "topk_renorm", "union", "sampled", "topk_sampled")
FRESH_DRAWS = (48, 128, 255)


def teacher_logp(teacher, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's exact full-vocabulary log-probs [B, L-1, V] for the next-token positions."""
    with torch.inference_mode():
        return torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)


def mode_logit_grad(mode: str, logits: torch.Tensor, rows: dict, head: torch.Tensor | None,
                    union_k: int = 8) -> torch.Tensor:
    """d(sum over positions of ``mode``'s KD loss)/d logits [n, V], through the registry's own loss,
    built as the objective builds its chunk (one log_softmax, one gather of target + top-k + draws)."""
    z = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    needed = torch.cat([rows["targets"][:, None], rows["topk_ids"],
                        *([rows["draw_ids"]] if "samples" in kd_modes.get(mode).needs else [])], dim=1)
    chunk = kd_modes.Chunk(logp, logp.gather(1, needed), {**rows, "needed": needed}, 1.0, union_k, head)
    grad, = torch.autograd.grad(kd_modes.get(mode).loss(chunk).per_position.sum(), z)
    return grad


def fresh_sampled_grad(logits: torch.Tensor, t_logp: torch.Tensor, draws: int, seed: int) -> torch.Tensor:
    """RS-KD's gradient with ``draws`` fresh draws per position from the exact teacher ``t_logp`` [n, V]."""
    u = torch.rand(t_logp.shape[0], draws, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    ids, counts = sampling.unique_counts(sampling.draw(t_logp, torch.zeros(t_logp.shape[0]), u))
    z = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    grad, = torch.autograd.grad(losses.kd_sampled(logp.gather(-1, ids), counts).sum(), z)
    return grad


class Agreement:
    """Running cosine / norm ratio of an estimate g against the exact gradient e."""

    def __init__(self):
        self.dot = self.gg = self.ee = 0.0
        self.position_cos: list[np.ndarray] = []

    def add(self, g: torch.Tensor, e: torch.Tensor) -> None:
        g, e = g.double(), e.double()
        self.dot += float((g * e).sum())
        self.gg += float((g * g).sum())
        self.ee += float((e * e).sum())
        cos = (g * e).sum(-1) / ((g * g).sum(-1).sqrt() * (e * e).sum(-1).sqrt()).clamp(min=1e-300)
        self.position_cos.append(cos.numpy())

    def result(self) -> dict:
        return {"cosine": self.dot / max(1e-300, (self.gg * self.ee) ** 0.5),
                "norm_ratio": (self.gg / max(1e-300, self.ee)) ** 0.5,
                "position_cosine": float(np.concatenate(self.position_cos).mean())}


@torch.no_grad()
def _student_logits(student, ids: torch.Tensor) -> torch.Tensor:
    return student(input_ids=ids).logits[:, :-1].float()


def measure(students: dict[str, torch.nn.Module], teacher, reader: CacheReader, sequences: int = 4,
            modes: tuple[str, ...] = MODES, fresh: tuple[int, ...] = FRESH_DRAWS, union_k: int = 8) -> dict:
    """``{student: {mode: {cosine, norm_ratio, position_cosine}}}`` over the first ``sequences``
    held-out sequences, one sequence at a time (a [L, V] gradient per mode at once)."""
    head = torch.from_numpy(reader.head()) if reader.has_head else None
    names = array_names(reader, need_hidden=reader.spec.store_hidden, need_samples=bool(reader.spec.samples))
    usable = [m for m in modes if kd_modes.get(m).needs <= ({"topk", "samples"} if reader.spec.samples else {"topk"})
              | ({"hidden", "head"} if reader.spec.store_hidden and reader.has_head else set())]
    acc = {s: {m: Agreement() for m in [*usable, *(f"sampled_fresh_{n}" for n in fresh)]} for s in students}
    for i in list(reader.split_indices("eval"))[:sequences]:
        batch = load_batch(reader, np.asarray([i]), names)
        rows = flat_targets(batch, torch.device("cpu"))
        t_logp = teacher_logp(teacher, rows["input_ids"])[0]
        for s_name, student in students.items():
            logits = _student_logits(student, rows["input_ids"])[0]
            exact = torch.softmax(logits, -1) - t_logp.exp()
            for m in usable:
                acc[s_name][m].add(mode_logit_grad(m, logits, rows, head, union_k), exact)
            for n in fresh:
                acc[s_name][f"sampled_fresh_{n}"].add(fresh_sampled_grad(logits, t_logp, n, seed=int(i)), exact)
    return {s: {m: a.result() for m, a in per.items()} for s, per in acc.items()}


def worked_example() -> dict[str, list[float]]:
    """The tail bucket's error on four ids: teacher p = [.5, .3, .15, .05], student logits
    [0, .3, 0, 0], union with the teacher's top-1 (id 0) and the student's top-1 (id 1) kept.
    Exact: ``s - p``; union: ``s_v - p_v`` on the kept ids, ``s_v (1 - T/S)`` on the others."""
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    z = torch.tensor([[0.0, 0.3, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    logp = torch.log_softmax(z, -1)
    head = torch.eye(4, dtype=torch.float64)  # teacher logits = hidden . head = log p, logZ = 0
    loss = losses.kd_union(logp, p.log(), head, torch.zeros(1, dtype=torch.float64), torch.tensor([[0]]), 1,
                           exact_student_tail=True)
    union, = torch.autograd.grad(loss.sum(), z)
    exact = torch.softmax(z.detach(), -1) - p
    return {"exact": exact[0].tolist(), "union": union[0].tolist()}
