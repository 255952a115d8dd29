"""Gradient fidelity: each offline KD mode's gradient w.r.t. the student's logits, on held-out
cached positions, against the exact full-vocabulary ``KL(p || s)`` gradient ``s - p`` (p from the
teacher run on the same tokens). Noise-free where end-to-end perplexities are not: one student,
one batch, every mode's loss through its own registry entry on the cache's own (decoded) arrays.

Reported per (student, mode), at two levels:

- the logits: ``cosine`` = <g, s - p> / (|g| |s - p|) over all positions and logits,
  ``norm_ratio`` = |g| / |s - p|, ``position_cosine`` = the mean over positions of the
  per-position cosine;
- the parameters (what the optimizer sees): ``param_cosine`` / ``param_norm_ratio`` of the
  student's parameter gradient summed over the measured sequences (each mode's logit gradient
  back-propagated through the student), against the exact loss's. Per-position noise averages
  out here, a systematic error (the tail bucket's) does not.

``sampled_fresh_N``: RS-KD's estimator with N fresh draws from the exact teacher (stage 1's
sampler), to see what more draws would buy without building a cache. ``union_reverse_kl`` /
``union_jsd``: the other divergences through ``union``, against the same forward-KL gradient:
their norm ratio says how strong a signal they give a student at that point (from a near-uniform
student it is tiny: their logit gradient is proportional to the student's own probability).
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
DIVERGENCES = ("reverse_kl", "jsd")  # through union, against the forward-KL gradient


def teacher_logp(teacher, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's exact full-vocabulary log-probs [B, L-1, V] for the next-token positions."""
    with torch.inference_mode():
        return torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)


def mode_logit_grad(mode: str, logits: torch.Tensor, rows: dict, head: torch.Tensor | None,
                    union_k: int = 8, divergence: str = "forward_kl") -> torch.Tensor:
    """d(sum over positions of ``mode``'s KD loss)/d logits [n, V], through the registry's own loss,
    built as the objective builds its chunk (one log_softmax, one gather of target + top-k + draws)."""
    z = logits.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1)
    needed = torch.cat([rows["targets"][:, None], rows["topk_ids"],
                        *([rows["draw_ids"]] if "samples" in kd_modes.get(mode).needs else [])], dim=1)
    chunk = kd_modes.Chunk(logp, logp.gather(1, needed), {**rows, "needed": needed}, 1.0, union_k, head,
                           divergence=divergence)
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


class ParamAgreement:
    """Cosine / norm ratio of a summed parameter gradient against the exact loss's."""

    def __init__(self):
        self.g: torch.Tensor | None = None
        self.e: torch.Tensor | None = None

    def add(self, g: torch.Tensor, e: torch.Tensor) -> None:
        self.g = g.double() if self.g is None else self.g + g.double()
        self.e = e.double() if self.e is None else self.e + e.double()

    def result(self) -> dict:
        gg, ee = float(self.g @ self.g), float(self.e @ self.e)
        return {"param_cosine": float(self.g @ self.e) / max(1e-300, (gg * ee) ** 0.5),
                "param_norm_ratio": (gg / max(1e-300, ee)) ** 0.5}


def param_grad(logits: torch.Tensor, params: list[torch.Tensor], logit_grad: torch.Tensor) -> torch.Tensor:
    """The student's parameter gradient (flattened) for a loss whose logit gradient is ``logit_grad``."""
    grads = torch.autograd.grad(logits, params, grad_outputs=logit_grad.to(logits.dtype), retain_graph=True,
                                allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])


def measure(students: dict[str, torch.nn.Module], teacher, reader: CacheReader, sequences: int = 4,
            modes: tuple[str, ...] = MODES, fresh: tuple[int, ...] = FRESH_DRAWS, union_k: int = 8,
            divergences: tuple[str, ...] = DIVERGENCES) -> dict:
    """``{student: {mode: {cosine, norm_ratio, position_cosine, param_cosine, param_norm_ratio}}}``
    over the first ``sequences`` held-out sequences, one sequence at a time (a [L, V] gradient per
    mode at once; parameter gradients summed over the sequences)."""
    head = torch.from_numpy(reader.head()) if reader.has_head else None
    names = array_names(reader, need_hidden=reader.spec.store_hidden, need_samples=bool(reader.spec.samples))
    usable = [m for m in modes if kd_modes.get(m).needs <= ({"topk", "samples"} if reader.spec.samples else {"topk"})
              | ({"hidden", "head"} if reader.spec.store_hidden and reader.has_head else set())]
    estimates = {m: (m, "forward_kl") for m in usable}
    if "union" in usable:
        estimates.update({f"union_{d}": ("union", d) for d in divergences})
    labels = [*estimates, *(f"sampled_fresh_{n}" for n in fresh)]
    acc = {s: {m: Agreement() for m in labels} for s in students}
    acc_params = {s: {m: ParamAgreement() for m in labels} for s in students}
    for i in list(reader.split_indices("eval"))[:sequences]:
        batch = load_batch(reader, np.asarray([i]), names)
        rows = flat_targets(batch, torch.device("cpu"))
        t_logp = teacher_logp(teacher, rows["input_ids"])[0]
        for s_name, student in students.items():
            params = [p for p in student.parameters()]
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                logits = student(input_ids=rows["input_ids"]).logits[0, :-1].float()
                exact = torch.softmax(logits.detach(), -1) - t_logp.exp()
                exact_params = param_grad(logits, params, exact)
                for label, (mode, divergence) in estimates.items():
                    g = mode_logit_grad(mode, logits, rows, head, union_k, divergence)
                    acc[s_name][label].add(g, exact)
                    acc_params[s_name][label].add(param_grad(logits, params, g), exact_params)
                for n in fresh:
                    g = fresh_sampled_grad(logits, t_logp, n, seed=int(i))
                    acc[s_name][f"sampled_fresh_{n}"].add(g, exact)
                    acc_params[s_name][f"sampled_fresh_{n}"].add(param_grad(logits, params, g), exact_params)
            del logits
    return {s: {m: {**acc[s][m].result(), **acc_params[s][m].result()} for m in labels} for s in students}


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
