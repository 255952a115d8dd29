"""``inspect CACHE --audit``: how much of the teacher a cache keeps, measured against the teacher.

On a sample of cached sequences the teacher (found through the cache's own record of it) runs
again over the cached tokens and gives its full next-token distribution ``p`` over the whole
vocabulary. For each k in ``KS``:

- ``mass``: mean sum of ``p`` over the top-k ids;
- ``kl_topk_tail``: mean KL(p || p_k), where p_k keeps the top-k probabilities and spreads the
  tail mass evenly over the other V - k ids: what a top-k cache with an exact tail loses;

and for the cache's own k, ``kl_stored``: mean KL between the exact (K+1)-bucket distribution
and the one the cache stores (its encoding's error, re-measured against a fresh teacher pass).
An audit, not training: it loads the teacher (stage 1's loader), which is why it lives here;
``inspect`` reaches it by module path (``pipeline/cli.py``'s ``AUDITS``).

``precision_check`` (``inspect CACHE --precision-check``) measures a cache's low-precision error
instead: a few cached sequences are recomputed by the teacher in fp32 on the CPU and compared
with what the cache holds (``precision_stats``): logZ max/mean absolute difference, top-1
agreement, and the KL between the fp32 teacher and the cache over the cache's top-k + tail
buckets. For an fp32 cache this is ~0 (plus the top-k encoding's own error, stated beside it);
for a cache built in fp16/bf16 on a GPU it is what the low-precision teacher body cost.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.cache.logit_codec import bucket_kl

from .teacher import TeacherSource, load_model

KS = (8, 16, 32, 64, 128)


def load_reference_teacher(reader: CacheReader):
    """The cache's teacher (from the cache's own record of it) in fp32, on the CPU."""
    facts = reader.spec.teacher
    source = TeacherSource(facts.get("name") or facts["path"], facts["path"], facts.get("gguf_file") or None)
    return load_model(source, torch.float32, torch.device("cpu"))


def sample_sequences(reader: CacheReader, sequences: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.sort(rng.choice(len(reader), size=min(sequences, len(reader)), replace=False))


def audit(reader: CacheReader, sequences: int = 4) -> dict:
    model = load_reference_teacher(reader)
    sample = sample_sequences(reader, sequences)
    sums = {k: {"mass": 0.0, "kl": 0.0} for k in KS}
    kl_stored, positions = 0.0, 0
    vocab = reader.spec.vocab_size
    for i in sample:
        cached = reader.read_range(int(i), int(i) + 1, ("input_ids", "topk_ids", "topk_logprobs"))
        ids = torch.from_numpy(cached["input_ids"].astype(np.int64))
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[0].double(), -1)
        p = logp.exp()
        top = logp.topk(max(KS), dim=-1)
        for k in KS:
            mass = top.values[:, :k].exp().sum(-1)
            tail = (1 - mass).clamp(min=1e-300)
            spread = torch.log(tail / (vocab - k))  # log p_k of every id outside the top-k
            outside = (p * (logp - spread[:, None])).sum(-1) - (top.values[:, :k].exp() * (
                top.values[:, :k] - spread[:, None])).sum(-1)
            sums[k]["mass"] += float(mass.sum())
            sums[k]["kl"] += float(outside.clamp(min=0).sum())
        # The stored top-k against the exact probabilities of the same ids, now.
        stored_ids = torch.from_numpy(cached["topk_ids"][0].astype(np.int64))
        exact = logp.gather(1, stored_ids).numpy()
        kl_stored += float(bucket_kl(exact, cached["topk_logprobs"][0].astype(np.float64)).sum())
        positions += ids.shape[1]
    return {"sequences": [int(i) for i in sample], "positions": positions,
            "per_k": {k: {"mass": v["mass"] / positions, "kl_topk_tail": v["kl"] / positions} for k, v in sums.items()},
            "stored_k": reader.spec.top_k, "kl_stored": kl_stored / positions}


# ---------------------------------------------------------------- low-precision error of a cache


def precision_stats(ref_logits: torch.Tensor, logz: np.ndarray, topk_ids: np.ndarray,
                    topk_logprobs: np.ndarray) -> dict:
    """Sums over positions comparing a cache's (or a low-precision pass's) values with reference
    logits ``[L, V]`` (fp32 or better; computed here in float64):

    - ``logz_abs_sum`` / ``logz_abs_max``: |logZ - logsumexp(ref)|;
    - ``top1_agree``: positions where the reference argmax is among the given ids with the
      highest given log-prob (a tie of equal stored values counts as agreement);
    - ``kl_sum``: KL(ref || given) over the given top-k ids + one tail bucket, the reference
      folded onto the same K+1 buckets (``bucket_kl``).
    """
    ref = ref_logits.double()
    ref_logz = torch.logsumexp(ref, -1)
    ref_logp = ref - ref_logz[:, None]
    ids = torch.from_numpy(np.asarray(topk_ids, np.int64))
    lp = np.asarray(topk_logprobs, np.float64)
    diff = np.abs(np.asarray(logz, np.float64) - ref_logz.numpy())
    best = ref.argmax(-1)
    hit = ids == best[:, None]
    in_topk = hit.any(-1).numpy()
    at_best = np.where(hit.numpy(), lp, -np.inf).max(-1)
    top1 = in_topk & (at_best >= lp.max(-1) - 1e-7)
    kl = bucket_kl(ref_logp.gather(1, ids).numpy(), lp)
    return {"positions": len(diff), "logz_abs_sum": float(diff.sum()), "logz_abs_max": float(diff.max()),
            "top1_agree": int(top1.sum()), "kl_sum": float(kl.sum()), "kl_max": float(kl.max())}


def merge_precision_stats(parts: list[dict]) -> dict:
    """Per-sequence sums -> the report: means and maxima over every position."""
    n = sum(p["positions"] for p in parts)
    return {"positions": n,
            "logz_abs_diff_max": max(p["logz_abs_max"] for p in parts),
            "logz_abs_diff_mean": sum(p["logz_abs_sum"] for p in parts) / n,
            "top1_agreement": sum(p["top1_agree"] for p in parts) / n,
            "kl_topk_tail_mean": sum(p["kl_sum"] for p in parts) / n,
            "kl_topk_tail_max": max(p["kl_max"] for p in parts)}


def precision_check(reader: CacheReader, sequences: int = 4, model=None) -> dict:
    """A cache's low-precision error: ``sequences`` cached sequences recomputed in fp32 on the CPU
    (the teacher the cache records, loaded in fp32) and compared with the cache (see
    ``precision_stats``). The KL includes the top-k encoding's own error
    (``topk_encoding_kl_mean``, reported beside it), which an fp32 cache shows alone."""
    model = model if model is not None else load_reference_teacher(reader)
    sample = sample_sequences(reader, sequences)
    parts = []
    for i in sample:
        cached = reader.read_range(int(i), int(i) + 1, ("input_ids", "topk_ids", "topk_logprobs", "logz"))
        ids = torch.from_numpy(cached["input_ids"].astype(np.int64))
        with torch.inference_mode():
            ref = model(input_ids=ids, use_cache=False).logits[0].float()
        parts.append(precision_stats(ref, cached["logz"][0], cached["topk_ids"][0], cached["topk_logprobs"][0]))
    out = merge_precision_stats(parts)
    summary = reader.manifest.get("summary", {})
    return {"cache_precision": summary.get("precision", reader.fingerprint.get("teacher_dtype")),
            "reference": "float32, cpu", "sequences": [int(i) for i in sample], **out,
            "topk_encoding_kl_mean": summary.get("topk_encoding_kl_mean")}
