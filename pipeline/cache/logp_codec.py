"""The top-k encoding ``logp16``: log-probabilities on a uniform grid, for KD at temperature > 1.

Per position the teacher's top-k (ids, log-probs) plus its tail mass become:

- ``rank gaps``: the ids as ascending ranks in the cache's frequency table, first rank then
  differences, exactly as sqrt8 stores them (``logit_codec.rank_gaps``);
- ``log codes``: ``c = round(-log p / STEP)`` in uint16, in the same (rank) order;
- ``tail code``: the tail mass ``T = 1 - sum p`` coded the same way, stored explicitly (``1 - sum``
  of decoded values would amplify the rounding where the tail is small). `encode` takes the exact
  log-tail when the caller has it; else it derives T from the log-probs (`log_tail_of`), which is
  what the cache writer does: T is then as exact as the log-probs' common error (stage 1's fp32
  logZ: ~1e-7 absolute), enough for a real teacher's tails (docs/loss-math.md).

Why log p on a uniform grid: tempering divides every log p by tau and the loss multiplies by
tau^2, so an error ``e`` in log p costs ``~ 1/2 Var_{q_tau}(e)`` nats whatever tau is. With
``e`` uniform on ``[-STEP/2, STEP/2]`` that is at most ``STEP^2 / 24`` (docs/loss-math.md); sqrt8's
error instead grows with tau because its small codes are coarse in log p.

Decoding rule (also docs/cache-format.md). Every code ``c`` in ``0..65535`` stands for
``log p = -c * STEP`` (float64, STEP = ``LOGP_STEP`` = 1/24 nat):

- ``c`` in ``1..65534`` covers ``log p`` in ``[-(c + 1/2) STEP, -(c - 1/2) STEP)`` and decodes to
  its centre, which is ``exp(E[log p])`` for a locally uniform density of log p: the value that
  minimises the KD loss a perfect student pays, at every temperature at once;
- code 0 covers ``[-STEP/2, 0]`` and decodes to 0 (p = 1): it holds the top-1 of confident
  positions, whose true log p is ``log(1 - rest) ~ -rest``, and renormalisation restores that
  from the other buckets, where a centre ``-STEP/4`` would skew every ratio to the top-1;
- code 65535, the floor, covers everything below ``-65534.5 * STEP`` (-2730.6 nats) including
  p = 0 (a tail of a top-k as wide as the vocabulary) and decodes by the same formula to
  ``-65535 * STEP`` = -2730.625 nats: finite, and a mass no float64 can hold (below 1e-1185), so
  its place in the bin does not matter at any temperature.

Then the K + 1 values are renormalised in log space, ``l_i - logsumexp(l_0..l_K)`` (float64, so
a floor value stays finite), the ids are re-sorted by descending log-prob (stable) and the
log-probs cast to float32; the log-tail stays float64 (``logit_codec.decode_with_tail`` does the
same for sqrt8).
"""

from __future__ import annotations

import numpy as np

from ..errors import CacheError, NonFiniteError
from .logit_codec import ids_from_rank_gaps, rank_gaps

LOGP_STEP = 1.0 / 24.0
"""Nats per code. Measured (docs/loss-math.md, bench/topk_fidelity.py): the coarsest of 1/12,
1/16, 1/20, 1/24 and 1/32 whose perfect-student loss stays under 1e-4 at tau 1, 2 and 4 on the
real and the synthetic teachers (7.1e-5 at most; ~STEP^2 / 24 = 7.2e-5 predicted); 1/20 misses
on the real teacher at tau 4. Each halving of the step costs one more bit per value."""
FLOOR_CODE = np.iinfo(np.uint16).max
"""65535: log p below the grid (or p = 0); decodes by the same rule as every code."""


def log_codes(log_p: np.ndarray, step: float = LOGP_STEP) -> np.ndarray:
    """``clip(round(-log p / step), 0, FLOOR_CODE)`` as uint16: -inf (p = 0) -> the floor, a
    log p rounded slightly above 0 by float32 -> 0. NaN raises ``NonFiniteError``."""
    log_p = np.asarray(log_p, dtype=np.float64)
    if np.isnan(log_p).any():
        raise NonFiniteError("logp16: NaN log-probability given to the encoder; the teacher's outputs are not finite")
    with np.errstate(invalid="ignore"):  # -(-inf) / step is +inf, clipped to the floor
        return np.clip(np.rint(-log_p / step), 0, FLOOR_CODE).astype(np.uint16)


def code_log_values(codes: np.ndarray, step: float = LOGP_STEP) -> np.ndarray:
    """What code ``c`` decodes to before renormalisation: ``log p = -c * step`` (float64)."""
    return -np.asarray(codes, dtype=np.float64) * step


def log_tail_of(logprobs: np.ndarray, log_tail: np.ndarray | None = None) -> np.ndarray:
    """The log of the mass beyond the top-k (float64): ``log_tail`` when the caller knows it
    exactly, else ``T = -expm1(logsumexp(logprobs))`` in float64, clipped at 0 (-inf: an empty
    tail, or a sum rounded above 1).

    ``-expm1(logsumexp)`` rather than ``1 - sum exp``: a near one-hot position keeps its tail in
    the top-1 log-prob (log p_1 ~ -T), which exp() would round to 1 below T ~ 1e-16; this way a
    tail of 1e-25 survives whenever the log-probs handed in resolve it."""
    if log_tail is not None:
        return np.asarray(log_tail, dtype=np.float64)
    mass = np.logaddexp.reduce(np.asarray(logprobs, dtype=np.float64), axis=-1)
    with np.errstate(divide="ignore"):
        return np.log(np.clip(-np.expm1(mass), 0.0, 1.0))


def encode(ids: np.ndarray, logprobs: np.ndarray, rank_to_id: np.ndarray, log_tail: np.ndarray | None = None,
           step: float = LOGP_STEP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [..., K], log-probs [..., K]) -> (rank gaps [..., K] int64, log codes [..., K] uint16,
    tail code [...] uint16). ``log_tail``: the exact log tail mass when known (else 1 - sum p)."""
    ids, logprobs = np.asarray(ids), np.asarray(logprobs)
    if ids.shape != logprobs.shape:
        raise CacheError(f"logp16: ids {ids.shape} and log-probs {logprobs.shape} differ in shape")
    if ids.size and (ids.min() < 0 or ids.max() >= len(rank_to_id)):
        raise CacheError(f"logp16: token ids outside the vocabulary of {len(rank_to_id)}")
    gaps, order = rank_gaps(ids, rank_to_id)
    codes = log_codes(np.take_along_axis(logprobs.astype(np.float64), order, -1), step)
    return gaps, codes, log_codes(log_tail_of(logprobs, log_tail), step)


def normalised_log_values(codes: np.ndarray, tail_code: np.ndarray, step: float = LOGP_STEP
                          ) -> tuple[np.ndarray, np.ndarray]:
    """(log q [..., K], log tail [...]) float64, in the codes' order: ``l = -c * step`` for the K
    codes and the tail code, then ``l - logsumexp(l_0..l_K)`` so the K + 1 buckets sum to 1."""
    values, tail = code_log_values(codes, step), code_log_values(tail_code, step)
    total = np.logaddexp(np.logaddexp.reduce(values, axis=-1), tail)
    return values - total[..., None], tail - total


def decode_with_tail(gaps: np.ndarray, codes: np.ndarray, tail_code: np.ndarray, rank_to_id: np.ndarray,
                     step: float = LOGP_STEP) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode`: (ids int64 by descending probability, float32 log-probs, float64
    log-tail), renormalised over the K + 1 buckets (module docstring). Ties keep rank order."""
    ids = ids_from_rank_gaps(gaps, rank_to_id)
    logq, log_tail = normalised_log_values(codes, tail_code, step)
    order = np.argsort(-logq, axis=-1, kind="stable")
    return (np.take_along_axis(ids, order, -1), np.take_along_axis(logq, order, -1).astype(np.float32),
            log_tail)


def roundtrip_with_tail(logprobs: np.ndarray, log_tail: np.ndarray | None = None, step: float = LOGP_STEP
                        ) -> tuple[np.ndarray, np.ndarray]:
    """(decoded log-probs in the input order, decoded log-tail), both float64: what a reader gets
    back for ``logprobs`` (for the writer's fidelity statistic and for measurements)."""
    codes = log_codes(logprobs, step)
    return normalised_log_values(codes, log_codes(log_tail_of(logprobs, log_tail), step), step)
