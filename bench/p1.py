"""P1: stage-1 wall time / the pure teacher forward over the same tokens, with the configured
sampling (``cache.samples``, 48 in the default config) and without it (``cache.samples=0``).

The three arms (stage 1 sampled, stage 1 unsampled, pure forward) run in turn within each repeat,
in a rotating order, so drift on a shared machine hits all three alike; the ratios are taken
within a repeat. Stage-1 time = its teacher pass (forward + top-k + logZ + samples + encoding,
compression and writes in the background thread) plus the sqrt8 pilot; model load and
tokenization excluded on both sides. Pure forward = ``model(input_ids)`` over the same sequences.

``python -m bench.p1 [--vocab151936] [--repeats 5]``: one JSON object. ``--vocab151936`` runs the
same three arms with a tiny random Qwen3-MoE teacher (2 layers, d = 64) and Qwen's real
151936-entry vocabulary (``bench/p4b.py``): a head-dominated shape, where the per-token work over
the vocabulary weighs most against the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.config import Config
from pipeline.device import choose_precision, resolve_device
from stage1_teacher_cache.run import cache_teacher
from stage1_teacher_cache.teacher import load_model, resolve_teacher


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def measure(cfg: Config, repeats: int) -> tuple[dict, dict]:
    """The P1 row (ratio with ``cfg``'s sampling) and its unsampled twin, arms interleaved."""
    samples = cfg.cache.samples
    # In a cache directory of its own, so the sampled cache at cfg.cache.dir is what stays there.
    unsampled = dataclasses.replace(cfg, cache=dataclasses.replace(cfg.cache, samples=0,
                                                                   dir=str(cfg.cache.dir).rstrip("/") + "-unsampled"))
    device = resolve_device(cfg.teacher.device)
    model = load_model(resolve_teacher(cfg.teacher), choose_precision(device, cfg.teacher.dtype).dtype, device)
    ids = None

    def forward():
        with torch.inference_mode():
            for b in range(0, len(ids), cfg.teacher.batch_size):
                model(input_ids=ids[b:b + cfg.teacher.batch_size].to(device), use_cache=False)

    times: dict[str, list[float]] = {"sampled": [], "unsampled": [], "forward": []}
    info = {}
    arms = ["sampled", "unsampled", "forward"] if samples else ["unsampled", "forward"]
    for r in range(repeats):
        for arm in arms[r % len(arms):] + arms[:r % len(arms)]:  # rotate the order
            if arm == "forward":
                if ids is None:  # the same sequences stage 1 cached
                    reader = CacheReader(cfg.cache.dir, verify=False)
                    ids = torch.from_numpy(reader.read_range(0, len(reader), ("input_ids",))["input_ids"].astype(np.int64))
                t = time.perf_counter()
                forward()
                times["forward"].append(time.perf_counter() - t)
            else:
                out = cache_teacher(cfg if arm == "sampled" else unsampled, show_progress=False)
                times[arm].append(out["stage1_pass_s"])
                info = out if arm == "sampled" or not samples else info
    fwd = times["forward"]
    row = {"samples": samples, "tokens": info["tokens"], "forward_s": summarize(fwd)}
    for arm in arms[:-1]:
        row[arm] = {"ratio": summarize([s / f for s, f in zip(times[arm], fwd)]), "stage1_s": summarize(times[arm])}
    main = row["sampled" if samples else "unsampled"]
    return {"ratio": main["ratio"], **row}, {"model": model, "info": info}


def vocab151936(repeats: int, sequences: int = 16) -> dict:
    """P1 with and without 48 samples for the tiny random Qwen3-MoE at 151936 entries."""
    from bench import p4b

    texts = Path(__file__).resolve().parents[1] / "data" / "shakespeare"
    tok = p4b.qwen_tokenizer()
    with tempfile.TemporaryDirectory(prefix="kd-p1v-") as tmp:
        cfg = p4b.moe_cache_config(Path(tmp), p4b.tiny_qwen3_moe(tok.eos_token_id), tok, texts, sequences,
                                   "teacher.logits_chunk=512", "data.max_eval_tokens=256", "cache.overwrite=true",
                                   "cache.samples=48")
        row, _ = measure(cfg, repeats)
    return {**row, "vocab": p4b.QWEN_VOCAB, "teacher": "tiny random Qwen3-MoE, 2 layers, d=64"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab151936", action="store_true")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sequences", type=int, default=16)
    args = ap.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if args.vocab151936:
        row = vocab151936(args.repeats, args.sequences)
    else:
        from bench.run import bench_config

        with tempfile.TemporaryDirectory(prefix="kd-p1-") as tmp:
            ns = argparse.Namespace(config="configs/default.toml", sequences=args.sequences, batch_size=8)
            row, _ = measure(bench_config(Path(tmp) / "cache", ns, []), args.repeats)
    print(json.dumps(row, default=float))


if __name__ == "__main__":
    main()
