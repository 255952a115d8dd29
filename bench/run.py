"""``make bench`` (= ``python -m pipeline bench``): the performance ratios P1-P9 and P4b,
measured side by side in one run on this machine, with the embedded teacher and a small student.

Each timing is repeated; the table gives the median ratio and its spread (min-max over the
repeats, ratios taken pairwise from interleaved runs so machine noise hits both sides alike).
Writes ``bench/results.json`` and ``bench/results.md``. This package sits above both stages
(like the tests): it may import them; they never import it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench import p1 as p1_row
from bench import p4b, p9
from pipeline.config import Config, load_config
from pipeline.device import resolve_device
from stage1_teacher_cache.teacher import TeacherPass
from pipeline.distributed import Dist
from stage2_student_train.data import TRAIN_ARRAYS, BatchStream, load_batch
from stage2_student_train.state import build_state, setup_run
from stage2_student_train.step import step_weights
from stage2_student_train.step import train_step as recipe_step

OUT = Path(__file__).resolve().parent
TARGETS = {
    "P1": ("stage-1 wall / pure teacher forward, same tokens", "<=", 1.10),
    "P2": ("KD step / CE-only step, same student and batch", "<=", 1.10),
    "P3": ("offline KD step / online KD step (teacher in the loop)", "<=", 0.5),
    "P4": ("logit bytes/token at k=64 (ids + values + logZ)", "<=", 100.0),
    "P4b": ("P4 for a 151936-entry vocabulary (uint32 ids): tiny Qwen3-MoE teacher (bench/p4b.py)", "<=", 100.0),
    "P5": ("cache reader tokens/s / student training tokens/s", ">=", 5.0),
    "P6": ("stage-2 peak memory with KD / without KD", "<=", 1.2),
    "P7": ("stage-1 peak memory for 10N tokens / for N tokens (tiny teacher)", "<=", 1.15),
    "P8": ("stage-2 step with prefetched input / same step with the batch in memory", "<=", 1.05),
    "P9": ("our stage-2 CE step / a bare PyTorch step, same student, batch, precision", "<=", 1.05),
}


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def summarize(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def bench_config(cache_dir: Path, args: argparse.Namespace, overrides: list[str]) -> Config:
    return load_config(args.config, [
        f"cache.dir={json.dumps(str(cache_dir))}", "cache.overwrite=true", "cache.store_head=false",
        f"data.max_train_tokens={args.sequences * 256}", "data.max_eval_tokens=256", "data.seq_len=256",
        "cache.top_k=64", "cache.topk_encoding=\"sqrt8\"", "cache.shard_sequences=8",
        f"train.batch_size={args.batch_size}", *overrides])


# ---------------------------------------------------------------- P1: stage 1 vs pure forward


def p1(cfg: Config, repeats: int) -> tuple[dict, dict]:
    """Stage 1 with the config's sampling and without, against the pure forward (``bench/p1.py``)."""
    return p1_row.measure(cfg, repeats)


# ---------------------------------------------------------------- P2, P3, P5: stage-2 steps


def student_setup(cfg: Config):
    """The recipe's own state (student, optimizer, EMA, prefetching data) on one process."""
    run = setup_run(cfg, Dist(), show_progress=False)
    return run, build_state(run)


def train_step(run, state, batch, mode: str, cfg: Config) -> None:
    """The recipe's ``train_step`` on ``batch`` with KD mode ``mode`` (none: CE only)."""
    mode_cfg = dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, mode=mode))
    recipe_step(state, [batch], mode_cfg, step_weights(mode_cfg, 0), dist=run.dist, kind=run.parallel,
                autocast=run.autocast(), head=run.teacher_head())


def p2_p3_p5_p8(cfg: Config, teacher_model, repeats: int) -> dict:
    run, state = student_setup(cfg)
    reader = run.reader
    batch = state.data.next_batch()
    teacher = TeacherPass(teacher_model, cfg.cache.top_k, cfg.teacher.logits_chunk)
    train_step(run, state, batch, "topk_tail", cfg)  # warm-up
    kd_s, ce_s, online_s = [], [], []
    for _ in range(repeats):  # interleaved so drift hits all of them alike
        kd_s += timed(lambda: train_step(run, state, batch, "topk_tail", cfg), 1)
        ce_s += timed(lambda: train_step(run, state, batch, "none", cfg), 1)

        def online():
            out = teacher(batch["input_ids"])  # the teacher runs inside the step
            live = dict(batch, topk_ids=torch.from_numpy(out["topk_ids"].astype(np.int64)),
                        topk_logprobs=torch.from_numpy(out["topk_logprobs"]), logz=torch.from_numpy(out["logz"]))
            train_step(run, state, live, "topk_tail", cfg)

        online_s += timed(online, 1)
    # P8: the prefetched step paired with the in-memory one, alternating, until the median is pinned.
    fetched = p9.p8_pair(run, state, batch, cfg)
    tokens = batch["input_ids"].numel()
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one reader core
    fresh = BatchStream(reader.split_indices("train"), cfg.train.batch_size, 1,
                        lambda ids: load_batch(reader, ids, TRAIN_ARRAYS))
    reader_s = timed(fresh.next_batch, max(repeats, 8))
    torch.set_num_threads(torch_threads)
    state.data.close()
    return {
        "P2": {"ratio": summarize([k / c for k, c in zip(kd_s, ce_s)]), "kd_step_s": summarize(kd_s),
               "ce_step_s": summarize(ce_s)},
        "P3": {"ratio": summarize([k / o for k, o in zip(kd_s, online_s)]), "online_step_s": summarize(online_s)},
        "P5": {"ratio": summarize([(tokens / r) / (tokens / statistics.median(kd_s)) for r in reader_s]),
               "reader_tokens_per_s": tokens / statistics.median(reader_s),
               "train_tokens_per_s": tokens / statistics.median(kd_s)},
        "P8": {"ratio": {k: fetched[k] for k in ("median", "min", "max", "n")}, "paired": fetched,
               "data_stall_s": round(state.data.stall_s, 4)},
        "student_parameters": sum(p.numel() for p in state.parts.student.parameters()),
        "batch_tokens": tokens,
    }


# ---------------------------------------------------------------- P6: peak memory


def p6(args: argparse.Namespace, cache_dir: Path) -> dict:
    """Peak RSS of a fresh process over 3 training steps, with and without KD: the peak is reset
    once model and batch are built, and the ratio is of the growth above that size (what the
    step itself costs; the process's fixed size would only pull the ratio towards 1)."""
    out = {}
    for mode in ("topk_tail", "none"):
        cmd = [sys.executable, "-m", "bench.memprobe", "--cache", str(cache_dir), "--mode", mode,
               "--batch-size", str(args.batch_size)] + (["--config", args.config] if args.config else [])
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        out[mode] = json.loads(res.stdout.strip().splitlines()[-1])
    growth = out["topk_tail"]["peak_mb"] - out["topk_tail"]["base_mb"], out["none"]["peak_mb"] - out["none"]["base_mb"]
    return {"ratio": {"median": growth[0] / growth[1], "min": growth[0] / growth[1], "max": growth[0] / growth[1], "n": 1},
            "total_peak_ratio": out["topk_tail"]["peak_mb"] / out["none"]["peak_mb"], "probes": out}


# ---------------------------------------------------------------- report


def verdict(pid: str, value: float) -> bool:
    _, op, target = TARGETS[pid]
    return value <= target if op == "<=" else value >= target


def main(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory(prefix="kd-bench-") as tmp:
        cache_dir = Path(tmp) / "cache"
        cfg = bench_config(cache_dir, args, args.overrides)
        print(f"bench: {args.sequences} sequences x 256 tokens, teacher {cfg.teacher.model}, "
              f"student d={cfg.student.hidden_size} x {cfg.student.num_layers} layers, batch {args.batch_size}")
        results: dict = {}
        results["P1"], shared = p1(cfg, args.repeats)
        print(f"P1 done ({time.perf_counter() - t0:.0f} s)")
        steps = p2_p3_p5_p8(cfg, shared["model"], args.repeats)
        results.update({k: steps[k] for k in ("P2", "P3", "P5", "P8")})
        results["P9"] = p9.measure(cfg)
        print(f"P2/P3/P5/P8 done ({time.perf_counter() - t0:.0f} s)")
        info = shared["info"]
        results["P4"] = {"ratio": {"median": info["logit_bytes_per_token"], "min": info["logit_bytes_per_token"],
                                   "max": info["logit_bytes_per_token"], "n": 1},
                         "topk_encoding_kl_mean": info["topk_encoding_kl_mean"], "top_k": info["top_k"],
                         "arrays": info["array_bytes_per_token"]}
        results["P6"] = p6(args, cache_dir)
        from bench import p7; results["P7"] = p7.run()  # noqa: E702  (P7: fresh process per corpus size)
    results["P4b"] = p4b.run(args)
    sizes = {"sequences": args.sequences, "seq_len": 256, "tokens": results["P1"]["tokens"],
             "batch_size": args.batch_size, "student_parameters": steps["student_parameters"],
             "repeats": args.repeats, "torch_threads": torch.get_num_threads(), "device": str(resolve_device("auto")),
             "wall_s": round(time.perf_counter() - t0, 1)}
    table = ["| id | what | target | measured (median) | spread | pass |", "|---|---|---|---|---|---|"]
    for pid in sorted(TARGETS):
        what, op, target = TARGETS[pid]
        r = results[pid]["ratio"]
        extra = ""
        if pid.startswith("P4"):
            extra = f" at mean KL {results[pid]['topk_encoding_kl_mean']:.1e} nats"
        if pid == "P1" and "unsampled" in results[pid]:
            extra = f" ({results[pid]['unsampled']['ratio']['median']:.3f} without samples: target <= 1.05)"
        if pid == "P9":
            extra = f" (KD {results[pid]['kd']['median']:.3f}: target <= 1.10)"
        table.append(f"| {pid} | {what} | {op} {target:g} | {r['median']:.3f}{extra} | {r['min']:.3f}-{r['max']:.3f} "
                     f"(n={r['n']}) | {'pass' if verdict(pid, r['median']) else 'FAIL'} |")
    results["sizes"] = sizes
    (OUT / "results.json").write_text(json.dumps(results, indent=1, default=float) + "\n")
    md = "\n".join([f"Sizes: {json.dumps(sizes)}", "", *table]) + "\n"
    (OUT / "results.md").write_text(md)
    print(md)
    return 0
