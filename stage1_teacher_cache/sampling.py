"""Random-sampling KD (RS-KD) in stage 1: per position, tokens drawn from the teacher's
full-vocabulary distribution, kept as unique ids with their counts (``cache.samples`` > 0).

Why: the cached top-k is a biased picture of the teacher (its tail is one bucket); ``N`` tokens
drawn with replacement from ``p`` give counts ``c`` with ``E[c_v / N] = p_v`` for EVERY token, so
the KD mode ``sampled`` (stage2_student_train/losses.py ``kd_sampled``) has a gradient whose
expectation is exactly that of full-vocabulary KD (docs/loss-math.md). A few dozen draws give
about a dozen unique tokens per position on a real teacher.

How: the teacher pass calls ``ChunkSampler`` once per chunk of positions, where the ``[chunk, V]``
fp32 logits exist (``TeacherPass.chunk_hook``), with the exponentials ``exp(logits - max)`` the
pass computes for logZ anyway; nothing ``[B, L, V]`` is ever kept. Each draw is an inverse-CDF
lookup of a uniform number in the cumulative distribution of ``p`` (temperature 1), done in two
levels (block sums, then a scan of only the blocks where draws land: ``draw_from_weights``), so
the sampler adds one read of the chunk, not a second exp and a full-vocabulary scan.
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
import math

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


def block_size_for(vocab: int, samples: int) -> int:
    """The block width of the two-level inverse CDF: about ``sqrt(V / S)`` rounded to a power of
    two (the block prefix scan costs ``V / B`` per position, the in-block scans ``S * B``), at
    least 16 so the block sums stay vectorised."""
    return max(16, 1 << round(math.log2(max(1.0, math.sqrt(vocab / samples)))))


def block_sums(weights: torch.Tensor, block: int) -> torch.Tensor:
    """[n, ceil(V / block)]: the sums of ``block`` consecutive ids (the last block may be short)."""
    n, vocab = weights.shape
    full = vocab // block
    sums = torch.empty(n, -(-vocab // block), dtype=weights.dtype, device=weights.device)
    if full:
        torch.sum(weights[:, :full * block].view(n, full, block), dim=-1, out=sums[:, :full])
    if full * block < vocab:
        torch.sum(weights[:, full * block:], dim=-1, keepdim=True, out=sums[:, full:])
    return sums


def draw_from_weights(weights: torch.Tensor, u: torch.Tensor, block: int | None = None,
                      sums: torch.Tensor | None = None) -> torch.Tensor:
    """Token ids [n, S] drawn from ``weights / weights.sum(-1)`` ([n, V], non-negative, e.g. the
    teacher's ``exp(logits - max)``) by inverse CDF of the uniforms ``u`` [n, S] in [0, 1).

    The same draws as one cumulative sum over the whole vocabulary (``C_k``, each entry the
    float64 running sum rounded to the weights' dtype, as ``torch.cumsum`` computes it on a CPU;
    target ``t = u * C_V`` rounded likewise and capped below ``C_V``; the draw is the first id with
    ``C_k > t``), without that scan: two levels instead.

    1. Block sums ``b_j`` of ``block`` consecutive ids (one vectorised read of the weights) and
       their float64 prefix ``P_j``; the block of a draw is the first with ``P_j > t`` (rounded
       like ``C``): ``searchsorted`` over ``V / block`` entries.
    2. Only inside the blocks where draws land: the first id whose running sum within its block
       exceeds the residual ``t - P_{j-1}`` (clamped at 0).

    ``P_j`` and ``C`` differ only by the float64 summation order, so a draw differs from the
    full scan's only where ``t`` lies within float rounding of a CDF step. A probability-0 id is
    never drawn: the chosen block has ``P_j > t >= P_{j-1}`` (a positive sum), and inside it the
    chosen id's running sum exceeds its predecessor's (or 0 <= residual), so its weight is
    positive; where rounding leaves the residual at or above the block's own running total, the
    block's last positive id is taken. ``sums``: ``block_sums(weights, block)`` when the caller
    has them already."""
    n, vocab = weights.shape
    samples = u.shape[1]
    block = block or block_size_for(vocab, samples)
    full = vocab // block
    sums = block_sums(weights, block) if sums is None else sums
    prefix = torch.cumsum(sums, dim=1, dtype=torch.float64)  # [n, blocks]: P_j
    prefix_rounded = prefix.to(weights.dtype)
    last = prefix_rounded[:, -1:]
    target = (u.to(weights.device, torch.float64) * last.double()).to(weights.dtype)
    target = torch.minimum(target, torch.nextafter(last, torch.zeros_like(last)))  # never C itself
    where = torch.searchsorted(prefix_rounded, target, right=True).clamp_(max=sums.shape[1] - 1)  # [n, S]
    # In the draw's block: the first id whose running sum exceeds the residual t - P_{j-1} (>= 0).
    before = torch.where(where > 0, prefix.gather(1, (where - 1).clamp(min=0)), 0.0)
    residual = (target.double() - before).clamp_(min=0.0).to(weights.dtype)
    start = where * block
    cols = start[..., None] + torch.arange(block, device=weights.device)  # [n, S, block]
    if full * block < vocab:  # the short last block: columns past V read id V-1 with weight 0
        picked = weights.gather(1, cols.clamp(max=vocab - 1).view(n, -1)).view(n, samples, block)
        picked.masked_fill_(cols >= vocab, 0.0)
    else:
        picked = weights.gather(1, cols.view(n, -1)).view(n, samples, block)
    running = torch.cumsum(picked, dim=-1)
    offset = (running <= residual[..., None]).sum(-1)  # [n, S]: searchsorted(right=True) on rows this short
    overflow = offset >= block
    if overflow.any():  # rounding: the residual at or above the block's running total; its last positive id
        last_positive = block - 1 - torch.flip(picked > 0, dims=[-1]).int().argmax(-1)
        offset = torch.where(overflow, last_positive, offset)
    return start + offset


def draw(logits: torch.Tensor, logz: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token ids [n, S] drawn from ``softmax(logits)`` [n, V] by inverse CDF of the uniforms ``u``
    [n, S]: ``draw_from_weights(exp(logits - logz), u)``."""
    return draw_from_weights(torch.exp(logits - logz[:, None]), u)


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
    calls it with each chunk of flattened positions ``[start, start + n)`` and their unnormalised
    probabilities ``exp(logits - max)`` (fp32)."""

    def __init__(self, samples: int, seed: int):
        if not 0 < samples <= MAX_SAMPLES:
            raise ValueError(f"samples must be in 1..{MAX_SAMPLES}, got {samples}")
        self.samples, self.seed = samples, seed
        self._u: torch.Tensor | None = None
        self._ids: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None
        self._sums: torch.Tensor | None = None
        self._block: int | None = None

    def row_sums(self, weights: torch.Tensor) -> torch.Tensor:
        """The block sums of ``weights`` [n, V] the draw needs: the teacher pass sums them for its
        normaliser (``sum(-1)`` of these), so the vocabulary is read once for both."""
        self._block = block_size_for(weights.shape[1], self.samples)
        self._sums = block_sums(weights, self._block)
        return self._sums

    def __call__(self, start: int, weights: torch.Tensor) -> None:
        """Draw for rows ``[start, start + n)`` from ``weights`` [n, V] = ``exp(logits - max)``,
        the exponentials the teacher pass computes for logZ anyway (read, never modified); with
        the block sums of ``row_sums`` when it was called on these weights."""
        n = weights.shape[0]
        sums, self._sums = self._sums, None
        if sums is not None and sums.shape[0] != n:
            sums = None
        ids, counts = unique_counts(draw_from_weights(weights, self._u[start:start + n], self._block if sums is not None
                                                      else None, sums))
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
