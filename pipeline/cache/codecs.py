"""Codecs between the logical arrays (what stages write and read) and the stored ones.

Two kinds, one interface each; the writer encodes, the reader decodes, and no stage sees a
stored form:

- top-k (``cache.topk_encoding``): ``Sqrt8Codec`` (rank gaps + sqrt codes + an explicit tail,
  ``logit_codec.py``), ``LogP16Codec`` (rank gaps + uint16 log-p codes + an explicit tail,
  ``logp_codec.py``; for KD at temperature > 1) or ``FloatCodec`` (ids + float16/float32 log-probs). Logical form:
  ``topk_ids`` by descending probability, ``topk_logprobs`` float32, and the derived
  ``topk_log_tail`` (log of the mass beyond the top-k);
- hidden (``cache.hidden_dtype``): ``Float16Hidden`` or ``Int8Hidden`` (per-token absmax). Logical
  form: ``hidden`` as float (float16 as stored, int8 dequantised to float32);
- sampled tokens (``cache.samples`` > 0, RS-KD): ``SamplesCodec`` (ascending rank gaps + counts,
  ``logit_codec.encode_samples``). Logical form: ``draw_ids`` and ``draw_counts``.

Each codec names its ``stored`` arrays; ``encode`` gives them, ``decode`` takes them back.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np

from . import logit_codec, logp_codec
from .spec import CacheSpec, id_dtype


FIDELITY_TEMPERATURES = (1.0, 1.5, 2.0, 3.0, 4.0)
"""Temperatures at which each shard records the encoding's KD floor (``fidelity_sums``)."""


def fidelity_key(tau: float) -> str:
    return f"kd_floor_tau{tau:g}_sum"


KD_TAIL_FLOOR = 1e-12
"""The KD losses' floor for an empty student tail (stage 2's ``losses.TAIL_FLOOR``): an empty
exact tail (the student's role here) is floored the same way, so the floor stays what the loss
would report instead of +inf."""
FIDELITY_BLOCK = 2048  # positions per block: bounds the float64 temporaries (a shard can hold 16k+)


def fidelity_sums(exact_logprobs: np.ndarray, decoded_logprobs: np.ndarray, decoded_log_tail: np.ndarray,
                  exact_log_tail: np.ndarray | None = None) -> dict[str, float]:
    """What an encoding costs, summed over positions (sums, so shards combine exactly):

    - ``topk_encoding_kl_sum``: KL(exact || decoded) over the K + 1 buckets at temperature 1;
    - ``kd_floor_tau{t}_sum`` for each t of ``FIDELITY_TEMPERATURES``: the KD loss (``topk_tail``,
      ``t^2 KL(decoded_t || exact_t)``, the loss's own direction) that a student equal to the exact
      teacher pays when trained on the decoded cache at temperature t: the floor the encoding
      puts under that loss. The exact tail is ``exact_log_tail`` (the teacher's, summed beyond its
      top-k), else ``1 - sum p`` of the exact log-probs without cancellation
      (``logp_codec.log_tail_of``); an empty one is floored as the loss floors a student's
      (``KD_TAIL_FLOOR``). Ids are in the same order on both sides;
    - ``kd_floor_positions``: the positions measured (caches may mix shards written before)."""
    k = np.shape(exact_logprobs)[-1]
    exact = np.asarray(exact_logprobs).reshape(-1, k)
    decoded = np.asarray(decoded_logprobs).reshape(-1, k)
    decoded_tail = np.asarray(decoded_log_tail).reshape(-1)
    given_tail = None if exact_log_tail is None else np.asarray(exact_log_tail).reshape(-1)
    out = {"topk_encoding_kl_sum": 0.0, "kd_floor_positions": float(len(exact))}
    out.update({fidelity_key(t): 0.0 for t in FIDELITY_TEMPERATURES})
    for a in range(0, len(exact), FIDELITY_BLOCK):
        e = exact[a:a + FIDELITY_BLOCK].astype(np.float64)
        d = decoded[a:a + FIDELITY_BLOCK].astype(np.float64)
        d_tail = decoded_tail[a:a + FIDELITY_BLOCK].astype(np.float64)
        e_tail = logp_codec.log_tail_of(e, None if given_tail is None else given_tail[a:a + FIDELITY_BLOCK])
        out["topk_encoding_kl_sum"] += float(logit_codec.bucket_kl(e, d).sum())
        for tau in FIDELITY_TEMPERATURES:
            floored = np.where(np.isfinite(e_tail), e_tail, tau * math.log(KD_TAIL_FLOOR))
            out[fidelity_key(tau)] += float(logit_codec.tempered_bucket_kl(e, d, tau, floored, d_tail).sum())
    return out


class Sqrt8Codec:
    stored = ("topk_rank_gaps", "topk_sqrt_codes", "topk_tail_code")

    def __init__(self, spec: CacheSpec, rank_to_id: Callable[[], np.ndarray]):
        self.levels, self.vocab = spec.sqrt_levels, spec.vocab_size
        self._rank_to_id = rank_to_id  # called when needed: the reader checks the table on first use

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Stored arrays, and the encoding's fidelity sums over the positions (`fidelity_sums`).
        ``log_tail``: the teacher's exact log tail mass, coded instead of ``1 - sum p`` when given."""
        gaps, codes, tail = logit_codec.encode(ids, logprobs, self._rank_to_id(), self.levels, log_tail)
        decoded = logit_codec.roundtrip_with_tail(logprobs, self.levels, log_tail=log_tail)
        return ({"topk_rank_gaps": gaps, "topk_sqrt_codes": codes, "topk_tail_code": tail},
                fidelity_sums(logprobs, *decoded, log_tail))

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, logprobs, log_tail = logit_codec.decode_with_tail(*(stored[n] for n in self.stored),
                                                               self._rank_to_id(), self.levels)
        return {"topk_ids": ids.astype(id_dtype(self.vocab)), "topk_logprobs": logprobs,
                "topk_log_tail": log_tail.astype(np.float32)}


class LogP16Codec:
    stored = ("topk_rank_gaps", "topk_log_codes", "topk_log_tail_code")

    def __init__(self, spec: CacheSpec, rank_to_id: Callable[[], np.ndarray]):
        self.step, self.vocab = spec.logp_step, spec.vocab_size
        self._rank_to_id = rank_to_id  # called when needed, as for sqrt8

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """Stored arrays, and the encoding's fidelity sums over the positions (`fidelity_sums`).
        ``log_tail``: the teacher's exact log tail mass, coded instead of a derived one when given."""
        gaps, codes, tail = logp_codec.encode(ids, logprobs, self._rank_to_id(), log_tail, step=self.step)
        decoded = logp_codec.roundtrip_with_tail(logprobs, log_tail, step=self.step)
        return ({"topk_rank_gaps": gaps, "topk_log_codes": codes, "topk_log_tail_code": tail},
                fidelity_sums(logprobs, *decoded, log_tail))

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids, logprobs, log_tail = logp_codec.decode_with_tail(*(stored[n] for n in self.stored),
                                                              self._rank_to_id(), self.step)
        return {"topk_ids": ids.astype(id_dtype(self.vocab)), "topk_logprobs": logprobs,
                "topk_log_tail": log_tail.astype(np.float32)}


class FloatCodec:
    stored = ("topk_ids", "topk_logprobs")

    def __init__(self, spec: CacheSpec):
        self.dtype = np.dtype(spec.topk_encoding)

    def encode(self, ids: np.ndarray, logprobs: np.ndarray, log_tail: np.ndarray | None = None
               ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """No tail is stored (the reader derives ``1 - sum p``); ``log_tail``, the teacher's exact
        one, only makes the fidelity sums honest about what that derivation loses."""
        stored = logprobs.astype(self.dtype)
        decoded = self.decode({"topk_ids": ids, "topk_logprobs": stored})
        return ({"topk_ids": ids, "topk_logprobs": stored},
                fidelity_sums(logprobs, stored, decoded["topk_log_tail"], log_tail))

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The tail is 1 - sum p in float64: as exact as the stored values allow."""
        logprobs = stored["topk_logprobs"]
        mass = np.exp(logprobs.astype(np.float64)).sum(-1)
        return {"topk_ids": stored["topk_ids"], "topk_logprobs": logprobs,
                "topk_log_tail": np.log(np.clip(1.0 - mass, 1e-300, None)).astype(np.float32)}


def topk_codec(spec: CacheSpec, rank_to_id: Callable[[], np.ndarray]) -> Sqrt8Codec | LogP16Codec | FloatCodec:
    if spec.topk_encoding == "sqrt8":
        return Sqrt8Codec(spec, rank_to_id)
    if spec.topk_encoding == "logp16":
        return LogP16Codec(spec, rank_to_id)
    return FloatCodec(spec)


def quantize_hidden_int8(hidden: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-token int8: codes = round(h / s), s = max|h| / 127; error <= s / 2 per element."""
    absmax = np.abs(hidden).max(axis=-1)
    scale = (np.maximum(absmax, 1e-12) / 127.0).astype(np.float32)
    codes = np.clip(np.rint(hidden / scale[..., None]), -127, 127).astype(np.int8)
    return codes, scale


class Float16Hidden:
    stored = ("hidden",)

    def encode(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        return {"hidden": hidden.astype(np.float16, copy=False)}

    def decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        return stored["hidden"]


class Int8Hidden:
    stored = ("hidden", "hidden_scale")

    def encode(self, hidden: np.ndarray) -> dict[str, np.ndarray]:
        codes, scale = quantize_hidden_int8(np.asarray(hidden, np.float32))
        return {"hidden": codes, "hidden_scale": scale}

    def decode(self, stored: dict[str, np.ndarray]) -> np.ndarray:
        return stored["hidden"].astype(np.float32) * stored["hidden_scale"][..., None]


def hidden_codec(spec: CacheSpec) -> Float16Hidden | Int8Hidden:
    return Int8Hidden() if spec.hidden_dtype == "int8" else Float16Hidden()


class SamplesCodec:
    """RS-KD draws: distinct ids + counts [..., S] <-> ascending rank gaps + counts (same order)."""
    stored = ("draw_gaps", "draw_counts")

    def __init__(self, spec: CacheSpec, rank_to_id: Callable[[], np.ndarray | None]):
        self.vocab = spec.vocab_size
        self._rank_to_id = rank_to_id  # None (float encodings): the ids themselves are the keys

    def encode(self, ids: np.ndarray, counts: np.ndarray) -> dict[str, np.ndarray]:
        gaps, counts = logit_codec.encode_samples(ids, counts, self._rank_to_id())
        return {"draw_gaps": gaps, "draw_counts": counts}

    def decode(self, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = logit_codec.decode_samples(stored["draw_gaps"], self._rank_to_id())
        return {"draw_ids": ids.astype(id_dtype(self.vocab)), "draw_counts": stored["draw_counts"]}
