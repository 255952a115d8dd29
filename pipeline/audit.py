"""``inspect CACHE --audit``: how much of the teacher a cache keeps, measured against the teacher.

On a sample of cached sequences the teacher (found through the cache's own record of it) runs
again over the cached tokens and gives its full next-token distribution ``p`` over the whole
vocabulary. For each k in ``KS``:

- ``mass``: mean sum of ``p`` over the top-k ids;
- ``kl_topk_tail``: mean KL(p || p_k), where p_k keeps the top-k probabilities and spreads the
  tail mass evenly over the other V - k ids: what a top-k cache with an exact tail loses;

and for the cache's own k, ``kl_stored``: mean KL between the exact (K+1)-bucket distribution
and the one the cache stores (its encoding's error, re-measured against a fresh teacher pass).
An audit, not training: it loads the teacher.
"""

from __future__ import annotations

import numpy as np
import torch

from .cache import CacheReader
from .logit_codec import bucket_kl

KS = (8, 16, 32, 64, 128)


def audit(reader: CacheReader, sequences: int = 4) -> dict:
    from transformers import AutoModelForCausalLM

    facts = reader.spec.teacher
    kwargs = {"gguf_file": facts["gguf_file"]} if facts.get("gguf_file") else {}
    model = AutoModelForCausalLM.from_pretrained(facts["path"], dtype=torch.float32, **kwargs).eval()
    rng = np.random.default_rng(0)
    sample = np.sort(rng.choice(len(reader), size=min(sequences, len(reader)), replace=False))
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
