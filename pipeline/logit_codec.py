"""The compact top-k encoding ``sqrt8`` of the cache (see ``cache.py`` for where it is stored).

Per position the teacher's top-k (ids, probabilities) plus its tail mass become:

- ``rank gaps``: each id is replaced by its rank in a per-cache frequency table (frequent tokens
  get small ranks), the ranks are sorted ascending and stored as first-rank-then-differences.
  Small, repetitive integers: byte-shuffled zstd packs them far tighter than raw ids.
- ``sqrt codes``: ``round(sqrt(p) * M)`` in uint8, in the same (rank) order. Uniform steps in
  sqrt(p) are near-optimal for KL: KL ~= 2 * sum (d sqrt p)^2, so the error is ~10.8 / M^2 nats
  per position whatever the distribution (shared/notes/logit-encoding.md).
- ``tail code``: the tail mass ``1 - sum p`` coded the same way, stored explicitly because
  ``1 - sum`` of rounded values amplifies rounding where the tail is small.

Decoding renormalises the K+1 buckets to sum to 1 and re-sorts by probability, so readers see
``topk_ids`` in descending probability order and finite ``topk_logprobs`` (a code of 0 decodes to
a quarter step, never to p = 0).
"""

from __future__ import annotations

import numpy as np

SQRT_LEVELS = 160  # M: mean KL ~ 10.8 / 160^2 ~ 4e-4 nats, under the 1e-3 target with margin


def rank_table(token_counts: np.ndarray) -> np.ndarray:
    """rank -> token id, most frequent first (ties by id), as the id dtype's wide type int64."""
    return np.lexsort((np.arange(len(token_counts)), -token_counts)).astype(np.int64)


def encode(ids: np.ndarray, logprobs: np.ndarray, rank_to_id: np.ndarray,
           levels: int = SQRT_LEVELS) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [..., K], fp32 log-probs [..., K]) -> (rank gaps [..., K] int64, sqrt codes uint8, tail code uint8)."""
    id_to_rank = np.empty_like(rank_to_id)
    id_to_rank[rank_to_id] = np.arange(len(rank_to_id))
    ranks = id_to_rank[ids]
    order = np.argsort(ranks, axis=-1, kind="stable")
    ranks = np.take_along_axis(ranks, order, -1)
    probs = np.exp(np.take_along_axis(logprobs.astype(np.float64), order, -1))
    gaps = np.diff(ranks, axis=-1, prepend=0)
    codes = np.clip(np.rint(np.sqrt(probs) * levels), 0, levels).astype(np.uint8)
    tail = np.clip(1.0 - np.exp(logprobs.astype(np.float64)).sum(-1), 0.0, 1.0)
    tail_code = np.clip(np.rint(np.sqrt(tail) * levels), 0, levels).astype(np.uint8)
    return gaps, codes, tail_code


def decode(gaps: np.ndarray, codes: np.ndarray, tail_code: np.ndarray, rank_to_id: np.ndarray,
           levels: int = SQRT_LEVELS) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``encode``: (ids by descending probability, fp32 log-probs), renormalised with the tail."""
    ids = rank_to_id[np.cumsum(gaps.astype(np.int64), axis=-1)]
    probs = _dequantize(codes, levels)
    total = probs.sum(-1) + _dequantize(tail_code, levels)
    probs /= total[..., None]
    order = np.argsort(-probs, axis=-1, kind="stable")
    return np.take_along_axis(ids, order, -1), np.log(np.take_along_axis(probs, order, -1)).astype(np.float32)


def roundtrip(logprobs: np.ndarray, levels: int = SQRT_LEVELS) -> np.ndarray:
    """The log-probs a reader gets back for ``logprobs``, in the same order (for fidelity stats)."""
    probs = np.exp(logprobs.astype(np.float64))
    tail = np.clip(1.0 - probs.sum(-1), 0.0, 1.0)
    q = _dequantize(np.rint(np.sqrt(probs) * levels), levels)
    total = q.sum(-1) + _dequantize(np.rint(np.sqrt(tail) * levels), levels)
    return np.log(q / total[..., None]).astype(np.float32)


def _dequantize(codes: np.ndarray, levels: int) -> np.ndarray:
    c = codes.astype(np.float64)
    return (np.where(c == 0, 0.25, c) / levels) ** 2


def bucket_kl(exact_logprobs: np.ndarray, decoded_logprobs: np.ndarray) -> np.ndarray:
    """KL(exact || decoded) per position over the K+1 buckets (top-k + tail), in nats.

    Both inputs must list the same ids in the same order along the last axis."""
    p = np.exp(exact_logprobs.astype(np.float64))
    q = np.exp(decoded_logprobs.astype(np.float64))
    p_tail = np.clip(1 - p.sum(-1), 1e-12, None)
    q_tail = np.clip(1 - q.sum(-1), 1e-12, None)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    return kl + p_tail * (np.log(p_tail) - np.log(q_tail))
