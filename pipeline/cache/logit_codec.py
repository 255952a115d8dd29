"""The compact top-k encoding ``sqrt8`` of the cache (see ``cache.py`` for where it is stored).

Per position the teacher's top-k (ids, probabilities) plus its tail mass become:

- ``rank gaps``: each id is replaced by its rank in a per-cache frequency table (frequent tokens
  get small ranks), the ranks are sorted ascending and stored as first-rank-then-differences.
  Small, repetitive integers: byte-shuffled zstd packs them far tighter than raw ids.
- ``sqrt codes``: ``round(sqrt(p) * M)`` in uint8, in the same (rank) order. Uniform steps in
  sqrt(p) are near-optimal for KL: KL ~= 2 * sum (d sqrt p)^2, so the error is ~10.8 / M^2 nats
  per position whatever the distribution (docs/loss-math.md).
- ``tail code``: the tail mass ``1 - sum p`` coded the same way, stored explicitly because
  ``1 - sum`` of rounded values amplifies rounding where the tail is small.

Decoding renormalises the K+1 buckets to sum to 1 and re-sorts by probability, so readers see
``topk_ids`` in descending probability order and finite ``topk_logprobs``.

Decoding rule (docs/loss-math.md): code ``c`` stands for ``sqrt(p)`` in
``[(c - 1/2) / M, (c + 1/2) / M)`` intersected with ``[0, 1]``. Code 0 (p in
``[0, (1/2 / M)^2)``, 2.4e-6 wide at M = 160 yet holding values down to 1e-20) decodes to the
expected p over its bin under a uniform density of ``sqrt(p)``: ``(1/2 / M)^2 / 3``. Codes
``c >= 1`` decode to ``(c / M)^2`` (their expected p is larger by ``1 / (12 M^2)``, a second-order
change that measured slightly worse on a real teacher at tau 1, 2 and 4). The density is a model:
a cache can carry its own measured code-0 values (`code0_table`: ``exp(E[log p | code 0])`` over
its entries, the value that minimises the KD loss a perfect student pays at every temperature),
which `decode` then uses instead. The on-disk format is the same either way.
"""

from __future__ import annotations

import numpy as np

SQRT_LEVELS = 160  # M: mean KL ~ 10.8 / 160^2 ~ 4e-4 nats, under the 1e-3 target with margin


def rank_table(token_counts: np.ndarray) -> np.ndarray:
    """rank -> token id, most frequent first (ties by id), as the id dtype's wide type int64."""
    return np.lexsort((np.arange(len(token_counts)), -token_counts)).astype(np.int64)


def encode(ids: np.ndarray, logprobs: np.ndarray, rank_to_id: np.ndarray, levels: int = SQRT_LEVELS,
           log_tail: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [..., K], fp32 log-probs [..., K]) -> (rank gaps [..., K] int64, sqrt codes uint8, tail
    code uint8). ``log_tail``: the exact log tail mass when known (else ``1 - sum p``)."""
    gaps, order = rank_gaps(ids, rank_to_id)
    probs = np.exp(np.take_along_axis(logprobs.astype(np.float64), order, -1))
    codes = _code(probs, levels).astype(np.uint8)
    tail_code = _code(_tail_mass(np.exp(logprobs.astype(np.float64)), log_tail), levels).astype(np.uint8)
    return gaps, codes, tail_code


def id_to_rank(rank_to_id: np.ndarray) -> np.ndarray:
    """The inverse permutation of ``rank_to_id``: id -> rank."""
    inverse = np.empty_like(rank_to_id)
    inverse[rank_to_id] = np.arange(len(rank_to_id))
    return inverse


def rank_gaps(ids: np.ndarray, rank_to_id: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(ids [..., K]) -> (gaps [..., K] int64, order [..., K]): the ranks ``r`` of the ids sorted
    ascending, stored as ``r_0, r_1 - r_0, ...``; ``order`` puts any per-id array in the same
    (rank) order. Shared by every encoding with a rank table (sqrt8, logp16)."""
    ranks = id_to_rank(rank_to_id)[ids]
    order = np.argsort(ranks, axis=-1, kind="stable")
    return np.diff(np.take_along_axis(ranks, order, -1), axis=-1, prepend=0), order


def ids_from_rank_gaps(gaps: np.ndarray, rank_to_id: np.ndarray) -> np.ndarray:
    """Inverse of `rank_gaps`: ``ids = rank_to_id[cumsum(gaps)]`` (int64, rank order)."""
    return rank_to_id[np.cumsum(gaps.astype(np.int64), axis=-1)]


CODE0_CLASSES = ("entry, tail code 0", "entry, tail code > 0", "tail, tail code 0")
"""What `code0_table` holds, in order: the value of a code-0 top-k entry in a position whose tail
code is 0 (a near one-hot position: its small entries lie far below the bin's edge), in a position
whose tail code is > 0, and of a code-0 tail."""


def decode(gaps: np.ndarray, codes: np.ndarray, tail_code: np.ndarray, rank_to_id: np.ndarray,
           levels: int = SQRT_LEVELS, code0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of ``encode``: (ids by descending probability, fp32 log-probs), renormalised with the tail.

    ``code0``: a cache's measured `code0_table` (None: the uniform-density values)."""
    ids, logprobs, _ = decode_with_tail(gaps, codes, tail_code, rank_to_id, levels, code0)
    return ids, logprobs


def decode_with_tail(gaps: np.ndarray, codes: np.ndarray, tail_code: np.ndarray, rank_to_id: np.ndarray,
                     levels: int = SQRT_LEVELS, code0: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`decode` plus the decoded log-tail [...] in float64: the explicit tail bucket, renormalised
    with the top-k (pass it to the KD losses as ``teacher_log_tail``; ``1 - sum`` of the fp32
    log-probs would lose a small tail)."""
    ids = ids_from_rank_gaps(gaps, rank_to_id)
    probs, tail = dequantize(codes, tail_code, levels, code0)
    total = probs.sum(-1) + tail
    probs /= total[..., None]
    order = np.argsort(-probs, axis=-1, kind="stable")
    logprobs = np.log(np.take_along_axis(probs, order, -1)).astype(np.float32)
    return np.take_along_axis(ids, order, -1), logprobs, np.log(tail / total)


def roundtrip(logprobs: np.ndarray, levels: int = SQRT_LEVELS, code0: np.ndarray | None = None) -> np.ndarray:
    """The log-probs a reader gets back for ``logprobs``, in the same order (for fidelity stats)."""
    return roundtrip_with_tail(logprobs, levels, code0)[0].astype(np.float32)


def roundtrip_with_tail(logprobs: np.ndarray, levels: int = SQRT_LEVELS, code0: np.ndarray | None = None,
                        log_tail: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(decoded log-probs in the input order, decoded log-tail), both float64. ``log_tail`` = the
    exact log-tail when known (else ``1 - sum p`` of ``logprobs``, as `encode` computes it)."""
    probs = np.exp(logprobs.astype(np.float64))
    tail = _tail_mass(probs, log_tail)
    q, t = dequantize(_code(probs, levels), _code(tail, levels), levels, code0)
    total = q.sum(-1) + t
    return np.log(q / total[..., None]), np.log(t / total)


def dequantize(codes: np.ndarray, tail_code: np.ndarray, levels: int = SQRT_LEVELS,
               code0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(top-k values, tail value) before renormalisation, float64: each code's expected p (see
    the module docstring), code 0 from ``code0`` (`code0_table`) when given."""
    c = codes.astype(np.float64)
    tc = np.asarray(tail_code).astype(np.float64)
    values, tail = _bin_mean(c, levels), _bin_mean(tc, levels)
    if code0 is not None:
        z = np.exp(np.asarray(code0, dtype=np.float64))
        values = np.where(c == 0, np.where((tc == 0)[..., None], z[0], z[1]), values)
        tail = np.where(tc == 0, z[2], tail)
    return values, tail


def _bin_mean(c: np.ndarray, levels: int) -> np.ndarray:
    """The value of code c: ``(c / M)^2`` for c >= 1; for code 0, ``E[p] = (1/2 / M)^2 / 3`` with
    sqrt(p) uniform on [0, 1/2 / M) (see the module docstring)."""
    return np.where(c == 0, (0.5 / levels) ** 2 / 3.0, (c / levels) ** 2)


def _code(values: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.rint(np.sqrt(values) * levels), 0, levels)


def _tail_mass(probs: np.ndarray, log_tail: np.ndarray | None) -> np.ndarray:
    if log_tail is not None:
        return np.exp(np.asarray(log_tail, dtype=np.float64))
    return np.clip(1.0 - probs.sum(-1), 0.0, 1.0)


def code0_table(logprobs: np.ndarray, levels: int = SQRT_LEVELS, log_tail: np.ndarray | None = None) -> np.ndarray:
    """A cache's measured code-0 values (log p, float64 [3], classes as in `CODE0_CLASSES`), from
    exact top-k log-probs [..., K] (and exact log-tails [...] when known), e.g. stage 1's pilot.

    Each is ``E[log p]`` over the entries of its class that encode to code 0: decoding to
    ``exp(E[log p])`` minimises the expected ``q_hat log(q_hat / q) - q_hat + q`` of each tempered
    bucket (the loss direction: the decoded teacher is the target) at EVERY temperature, because
    tempering only scales log p by 1 / tau. A class with no such entry gets the uniform-density
    value ``log((1/2 / M)^2 / 3)``."""
    p = np.exp(logprobs.astype(np.float64))
    tail = _tail_mass(p, log_tail)
    codes, tcodes = _code(p, levels), _code(tail, levels)
    t0 = np.broadcast_to((tcodes == 0)[..., None], codes.shape)
    default = float(np.log(_bin_mean(np.zeros(()), levels)))
    with np.errstate(divide="ignore"):
        log_p, log_t = np.log(p), np.log(tail)
    out = []
    for sel, vals in (((codes == 0) & t0, log_p), ((codes == 0) & ~t0, log_p), (tcodes == 0, log_t)):
        vals = vals[sel]
        vals = vals[np.isfinite(vals)]
        out.append(float(vals.mean()) if vals.size else default)
    return np.array(out)


def tempered_bucket_kl(exact_logprobs: np.ndarray, decoded_logprobs: np.ndarray, temperature: float = 1.0,
                       exact_log_tail: np.ndarray | None = None, decoded_log_tail: np.ndarray | None = None,
                       direction: str = "loss") -> np.ndarray:
    """The codec's fidelity at temperature tau, per position, over the K+1 buckets (float64).

    ``direction="loss"`` (default): ``tau^2 * KL(decoded_tau || exact_tau)``, the KD loss
    (``kd_topk_tail``) that a student equal to the exact teacher pays when trained on the decoded
    cache: the loss's own direction, with the decoded teacher as the target.
    ``direction="exact"``: ``tau^2 * KL(exact_tau || decoded_tau)`` (the information view; at
    tau = 1 without the tau^2 this is `bucket_kl`). Tempering: ``b^(1/tau)`` renormalised. Tails:
    the given log-tails, else ``1 - sum`` in float64. Same ids in the same order on both sides."""
    def buckets(lp: np.ndarray, lt: np.ndarray | None) -> np.ndarray:
        lp = lp.astype(np.float64)
        if lt is None:
            with np.errstate(divide="ignore"):
                lt = np.log(np.clip(1.0 - np.exp(lp).sum(-1), 0.0, None))
        x = np.concatenate([lp, np.asarray(lt, dtype=np.float64)[..., None]], -1) / temperature
        m = x.max(-1, keepdims=True)
        return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))

    a, b = buckets(decoded_logprobs, decoded_log_tail), buckets(exact_logprobs, exact_log_tail)
    if direction == "exact":
        a, b = b, a
    elif direction != "loss":
        raise ValueError(f"direction must be 'loss' or 'exact', not {direction!r}")
    pa = np.exp(a)
    with np.errstate(invalid="ignore"):
        terms = np.where(pa > 0, pa * (a - b), 0.0)
    return temperature ** 2 * terms.sum(-1)


def bucket_kl(exact_logprobs: np.ndarray, decoded_logprobs: np.ndarray) -> np.ndarray:
    """KL(exact || decoded) per position over the K+1 buckets (top-k + tail), in nats.

    Both inputs must list the same ids in the same order along the last axis."""
    p = np.exp(exact_logprobs.astype(np.float64))
    q = np.exp(decoded_logprobs.astype(np.float64))
    p_tail = np.clip(1 - p.sum(-1), 1e-12, None)
    q_tail = np.clip(1 - q.sum(-1), 1e-12, None)
    kl = (p * (np.log(p) - np.log(q))).sum(-1)
    return kl + p_tail * (np.log(p_tail) - np.log(q_tail))


# ---------------------------------------------------------------- sampled tokens (RS-KD)


def encode_samples(ids: np.ndarray, counts: np.ndarray, rank_to_id: np.ndarray | None
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Distinct sampled ids and their counts [..., S] (count 0 = padding) -> (gaps int64, counts),
    both [..., S] in ascending rank order (``rank_to_id``: sqrt8's frequency table; None: the ids
    themselves), padding last. Gaps: the first rank, then differences; padding has gap 0, so a
    cumulative sum repeats the last rank there. Frequent tokens have small ranks, so the gaps are
    small repetitive integers that byte-shuffled zstd packs tightly."""
    keys = ids.astype(np.int64)
    if rank_to_id is not None:
        keys = id_to_rank(rank_to_id)[keys]
    keys = np.where(counts == 0, np.iinfo(np.int64).max, keys)  # padding sorts last
    order = np.argsort(keys, axis=-1, kind="stable")
    keys, counts = np.take_along_axis(keys, order, -1), np.take_along_axis(counts, order, -1)
    filled = np.maximum(np.maximum.accumulate(np.where(counts == 0, -1, keys), axis=-1), 0)
    return np.diff(filled, axis=-1, prepend=0), counts


def decode_samples(gaps: np.ndarray, rank_to_id: np.ndarray | None) -> np.ndarray:
    """The sampled ids [..., S] (int64) from `encode_samples`'s gaps; padding repeats the last id."""
    keys = np.cumsum(gaps.astype(np.int64), axis=-1)
    return keys if rank_to_id is None else rank_to_id[keys]
