"""Random-sampling KD (RS-KD) in stage 1: per position, tokens drawn from the teacher's
full-vocabulary distribution, kept as unique ids with their counts (``cache.samples`` > 0).

Why: the cached top-k is a biased picture of the teacher (its tail is one bucket); ``N`` tokens
drawn with replacement from ``p`` give counts ``c`` with ``E[c_v / N] = p_v`` for EVERY token, so
the KD mode ``sampled`` (stage2_student_train/losses.py ``kd_sampled``) has a gradient whose
expectation is exactly that of full-vocabulary KD (docs/loss-math.md). A few dozen draws give
about a dozen unique tokens per position on a real teacher.

How: the teacher pass calls ``ChunkSampler`` once per chunk of positions, where the ``[chunk, V]``
fp32 logits exist (``TeacherPass.chunk_hook``); nothing ``[B, L, V]`` is ever kept. Each draw is an
inverse-CDF lookup of a uniform number in the cumulative distribution of ``p`` (temperature 1).
The uniforms of sequence ``i`` come from a ``torch.Generator`` seeded with ``(seed, i)`` and are
drawn for the whole sequence at once, so the samples depend only on ``(seed, i)`` and the teacher's
probabilities: not on the batch size, the logits chunk, the rank or a crash and rerun.

Output per position (padded to a fixed width ``samples``): ``draw_ids`` the distinct drawn ids
in ascending order, ``draw_counts`` (uint8) how often each was drawn; entries past the distinct
ones have count 0 (padding, their id is meaningless). The cache stores the ids as gaps
(``pipeline/cache/logit_codec.py`` ``encode_samples``).
"""

from __future__ import annotations

import contextlib
import hashlib

import numpy as np
import torch

MAX_SAMPLES = 255
"""Counts are stored as uint8."""


def sequence_seed(seed: int, seq_index: int) -> int:
    """A 63-bit seed for sequence ``seq_index`` of a run seeded ``seed`` (stable across platforms)."""
    digest = hashlib.sha256(f"rs-kd:{seed}:{seq_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def uniforms(seed: int, seq_indices, length: int, samples: int) -> torch.Tensor:
    """[B, length, samples] float64 uniforms in [0, 1), sequence i's from its own generator (CPU)."""
    out = torch.empty(len(seq_indices), length, samples, dtype=torch.float64)
    for row, index in enumerate(seq_indices):
        gen = torch.Generator().manual_seed(sequence_seed(seed, int(index)))
        out[row] = torch.rand(length, samples, generator=gen, dtype=torch.float64)
    return out


def draw(logits: torch.Tensor, logz: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [n, S] drawn from ``softmax(logits)`` [n, V] by inverse CDF of the uniforms ``u`` [n, S].

    The CDF is accumulated in fp32 and the uniforms scaled by its last value ``C``; the scaled
    target is then capped at the largest fp32 value below ``C`` (a ``u`` within ~1e-8 of 1 rounds
    ``u * C`` up to ``C`` itself in fp32, which ``searchsorted`` places past the vocabulary). So
    every target ``t`` satisfies ``0 <= t < C``, and ``searchsorted(right=True)`` returns the first
    id whose CDF exceeds ``t``: an id where the CDF rises, i.e. of positive probability. A token of
    probability 0 (a flat step of the CDF, at either end or inside) is never drawn."""
    cdf = torch.cumsum(torch.exp(logits - logz[:, None]), dim=-1)  # [n, V] fp32
    last = cdf[:, -1:]
    target = (u.to(cdf.device, torch.float64) * last.double()).to(cdf.dtype)
    target = torch.minimum(target, torch.nextafter(last, torch.zeros_like(last)))  # never C itself
    return torch.searchsorted(cdf, target, right=True)


def unique_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws [n, S] -> (distinct ids ascending, counts), both [n, S], left-packed; padding: id 0,
    count 0."""
    s, _ = torch.sort(ids, dim=-1)
    first = torch.ones_like(s, dtype=torch.bool)
    first[:, 1:] = s[:, 1:] != s[:, :-1]
    slot = torch.cumsum(first, dim=-1) - 1  # each draw's position among the distinct ids
    counts = torch.zeros_like(s).scatter_add_(1, slot, torch.ones_like(s))
    out = torch.zeros_like(s).scatter_(1, slot, s)  # every draw of a group writes the same id
    return out, counts


class ChunkSampler:
    """The teacher pass's per-chunk hook: ``attach`` it for one batch of sequences, and the pass
    calls it with each chunk of flattened positions ``[start, start + n)`` and their fp32 logits."""

    def __init__(self, samples: int, seed: int):
        if not 0 < samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be in 1..{MAX_SAMPLES}, got {samples}")
        self.samples, self.seed = samples, seed
        self._u: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def __call__(self, start: int, logits: torch.Tensor, logz: torch.Tensor) -> None:
        n = logits.shape[0]
        ids, counts = unique_counts(draw(logits, logz, self._u[start:start + n]))
        self._ids[start:start + n] = ids.cpu()
        self._counts[start:start + n] = counts.cpu()

    @contextlib.contextmanager
    def attach(self, teacher, seq_indices, length: int):
        """Set ``teacher.chunk_hook`` to this sampler for one call over ``seq_indices``."""
        b = len(seq_indices)
        self._u = uniforms(self.seed, seq_indices, length, self.samples).view(b * length, self.samples)
        self._ids = torch.zeros(b * length, self.samples, dtype=torch.int64)
        self._counts = torch.zeros(b * length, self.samples, dtype=torch.int64)
        teacher.chunk_hook = self
        try:
            yield self
        finally:
            teacher.chunk_hook = None

    def result(self, b: int, length: int) -> dict[str, np.ndarray]:
        return {"draw_ids": self._ids.view(b, length, -1).numpy(),
                "draw_counts": self._counts.view(b, length, -1).numpy().astype(np.uint8)}


def teacher_outputs(teacher, input_ids: torch.Tensor, seq_indices, samples: int, seed: int) -> dict[str, np.ndarray]:
    """``teacher(input_ids)``, plus ``draw_ids``/``draw_counts`` when ``samples`` > 0."""
    if samples <= 0:
        return teacher(input_ids)
    sampler = ChunkSampler(samples, seed)
    b, length = input_ids.shape
    with sampler.attach(teacher, seq_indices, length):
        out = teacher(input_ids)
    return {**out, **sampler.result(b, length)}
