"""Where stage 1's per-chunk time goes, on a ``[chunk, V]`` logits chunk with random weights:
the head matmul, top-k, the in-place exp + sum (logZ), the tail, and the sampler (two-level,
``sampling.draw_from_weights``, against the full-vocabulary scan it replaced, kept here as
``full_scan_draw``), each timed in turn inside one loop so machine noise hits all alike.

``python -m bench.p1_profile [--vocab 49152 --dim 576 --chunk 512 --samples 48 --repeats 7]``
prints one JSON object: the median seconds per part and per chunk.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from stage1_teacher_cache.sampling import draw_from_weights, unique_counts


def full_scan_draw(logits: torch.Tensor, logz: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """The sampler before the two-level scan: exp, cumsum over the whole vocabulary, searchsorted."""
    cdf = torch.cumsum(torch.exp(logits - logz[:, None]), dim=-1)
    last = cdf[:, -1:]
    target = (u.to(cdf.device, torch.float64) * last.double()).to(cdf.dtype)
    target = torch.minimum(target, torch.nextafter(last, torch.zeros_like(last)))
    return torch.searchsorted(cdf, target, right=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--dim", type=int, default=576)
    ap.add_argument("--chunk", type=int, default=512)
    ap.add_argument("--samples", type=int, default=48)
    ap.add_argument("--top-k", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.dim, generator=g) * 0.08
    hidden = torch.randn(args.chunk, args.dim, generator=g)
    u = torch.rand(args.chunk, args.samples, generator=g, dtype=torch.float64)
    parts: dict[str, list[float]] = {}

    def clock(name, fn):
        t = time.perf_counter()
        out = fn()
        parts.setdefault(name, []).append(time.perf_counter() - t)
        return out

    with torch.inference_mode():
        for _ in range(args.repeats + 1):
            logits = clock("head_matmul", lambda: hidden @ weight.T)
            values, indices = clock("topk", lambda: logits.topk(args.top_k, dim=-1, sorted=True))
            kept = logits.clone()  # for the old sampler only (not timed: it needed the logits)
            peak = values[:, :1]
            scaled = clock("exp_sum_logz", lambda: logits.sub_(peak).exp_())
            total = clock("exp_sum_logz_sum", lambda: scaled.sum(-1))
            lz = total.log() + peak[:, 0]
            clock("sampler_two_level", lambda: unique_counts(draw_from_weights(scaled, u)))
            clock("sampler_full_scan", lambda: unique_counts(full_scan_draw(kept, lz, u)))
            clock("tail", lambda: scaled.scatter_(1, indices, 0.0).sum(-1))
    med = {k: statistics.median(v[1:]) for k, v in parts.items()}  # the first round warms up
    med["exp_sum_logz"] += med.pop("exp_sum_logz_sum")
    base = med["head_matmul"] + med["topk"] + med["exp_sum_logz"] + med["tail"]
    print(json.dumps({"shape": [args.chunk, args.vocab], "dim": args.dim, "samples": args.samples,
                      "threads": torch.get_num_threads(), "median_s": {k: v and round(v, 4) for k, v in med.items()},
                      "stage1_chunk_without_samples_s": round(base, 4),
                      "sampler_share_two_level": round(med["sampler_two_level"] / base, 3),
                      "sampler_share_full_scan": round(med["sampler_full_scan"] / base, 3)}))


if __name__ == "__main__":
    main()
