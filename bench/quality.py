"""``make quality`` (= ``python -m pipeline quality``): what the cache costs in quality.

One command, on CPU, with the embedded teacher: build ONE cache holding the top-k (sqrt8, k=64),
the teacher head (for ``union``) and sampled tokens (RS-KD, ``cache.samples``), then train the same
student, on the same data order, for the same steps, with:

- ``none`` (cross-entropy only), ``topk_tail``, ``topk_renorm``, ``union``, ``sampled``: stage 2's own
  recipe (``train``) from the cache;
- ``online``: the reference the cache replaces: the teacher loaded IN the loop, exact
  full-vocabulary ``KL(p || s)`` + CE per step (a small trainer here, built from the recipe's own
  state: student, optimizer, schedule, EMA, data order; the teacher never enters stage 2).

Then every student (EMA weights) is evaluated on the held-out sequences against the teacher's
exact full-vocabulary distribution: perplexity, bits/byte, expected calibration error (ECE of the
top-1 probability vs correctness, 15 equal-width bins), top-1 agreement with the teacher, KL(p || s)
over the full vocabulary; plus the cache bytes/token each mode reads and its step time relative
to CE. Writes ``quality/results.json``, ``quality/results.md`` and ``quality/curves.png``.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.cache import CacheReader
from pipeline.config import Config, load_config
from pipeline.distributed import Dist
from pipeline.errors import PipelineError
from stage1_teacher_cache.run import cache_teacher
from stage1_teacher_cache.teacher import load_model, resolve_teacher
from stage2_student_train.data import target_bytes
from stage2_student_train.state import build_state, setup_run
from stage2_student_train.step import step_weights
from stage2_student_train.train import train

OUT = Path(__file__).resolve().parents[1] / "quality"
OFFLINE = ("none", "topk_tail", "topk_renorm", "union", "sampled")
READS = {  # what each mode's loss reads from the cache, by stored array prefix
    "none": ("input_ids",), "topk_tail": ("input_ids", "topk_"), "topk_renorm": ("input_ids", "topk_"),
    "union": ("input_ids", "topk_", "logz", "hidden"), "sampled": ("input_ids", "draw_"), "online": (),
}
ECE_BINS = 15


SIZES = ["cache.dir=\"caches/quality\"", "cache.top_k=64", "cache.topk_encoding=\"sqrt8\"", "cache.store_head=true",
         "cache.samples=48", "cache.store_hidden=true", "data.max_train_tokens=24576", "data.max_eval_tokens=4096",
         "data.seq_len=256", "train.steps=100", "train.batch_size=4", "train.eval_every=100",
         "train.save_every=100", "train.overwrite=true", "run.runs_dir=\"runs/quality\"", "kd.temperature=1.0"]
"""The sizes of a run (~25 min on 2 free CPU cores); any of them can be overridden (key=value)."""


def quality_config(args: argparse.Namespace) -> Config:
    cfg = load_config(args.config, [*SIZES, "train.warmup_steps=0", *args.overrides])
    steps = cfg.train.steps
    return load_config(args.config, [*SIZES, f"train.eval_every={steps}", f"train.save_every={steps}",
                                     f"train.warmup_steps={max(1, steps // 10)}", *args.overrides])


def with_mode(cfg: Config, mode: str) -> Config:
    return dataclasses.replace(cfg, kd=dataclasses.replace(cfg.kd, mode=mode),
                               run=dataclasses.replace(cfg.run, name=f"quality-{mode}"))


# ---------------------------------------------------------------- online full-vocabulary KD


def teacher_logp(teacher, ids: torch.Tensor) -> torch.Tensor:
    """The teacher's exact full-vocabulary log-probs [B, L-1, V] for the next-token positions."""
    with torch.inference_mode():
        return torch.log_softmax(teacher(input_ids=ids, use_cache=False).logits[:, :-1].float(), -1)


def train_online(cfg: Config, teacher) -> tuple[torch.nn.Module, list[dict]]:
    """The recipe's student, optimizer, LR schedule, EMA and data order (``build_state``), trained
    with CE + exact ``KL(p || s)`` over the full vocabulary, the teacher run inside every step."""
    run = setup_run(with_mode(cfg, "none"), Dist(), show_progress=False)
    state = build_state(run)
    head = state.parts.student.get_output_embeddings()
    records = []
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        w = step_weights(cfg, step)
        ids = state.data.next_batch()["input_ids"]
        p_logp = teacher_logp(teacher, ids)
        state.optimizer.zero_grad(set_to_none=True)
        logp = torch.log_softmax(head(state.parts(ids)[:, :-1]).float(), -1)
        ce = -logp.gather(-1, ids[:, 1:, None]).mean()
        kd = (p_logp.exp() * (p_logp - logp)).sum(-1).mean()
        (w.ce * ce + w.kd * kd).backward()
        torch.nn.utils.clip_grad_norm_(state.params, cfg.train.grad_clip)
        state.optimizer.step()
        state.scheduler.step()
        if state.ema is not None:
            state.ema.update(state.named)
        records.append({"step": step + 1, "ce": float(ce.detach()), "kd": float(kd.detach()),
                        "tokens_per_s": ids[:, 1:].numel() / (time.perf_counter() - t0)})
    state.data.close()
    with state.ema.applied(state.named) if state.ema is not None else torch.no_grad():
        student = copy.deepcopy(state.parts.student).eval()
    return student, records


# ---------------------------------------------------------------- evaluation against the full teacher


def ece(conf: np.ndarray, correct: np.ndarray, bins: int = ECE_BINS) -> float:
    """Expected calibration error: ``sum_b (n_b / N) |accuracy_b - mean confidence_b|`` over
    ``bins`` equal-width bins of the top-1 probability."""
    which = np.minimum((conf * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        sel = which == b
        if sel.any():
            total += sel.sum() / len(conf) * abs(correct[sel].mean() - conf[sel].mean())
    return float(total)


@torch.no_grad()
def evaluate_full(students: dict[str, torch.nn.Module], teacher, reader: CacheReader, batch_size: int) -> dict:
    """Every student and the teacher itself on the cache's held-out sequences, against the exact
    teacher distribution (computed once per batch, shared by all students)."""
    acc = {name: {"nll": 0.0, "kl": 0.0, "agree": 0.0, "conf": [], "correct": []} for name in [*students, "teacher"]}
    n, nbytes = 0, 0
    indices = list(reader.split_indices("eval"))
    for s in range(0, len(indices), batch_size):
        rows = indices[s:s + batch_size]
        ids = torch.from_numpy(np.concatenate([reader.read_range(i, i + 1, ("input_ids",))["input_ids"]
                                               for i in rows]).astype(np.int64))
        targets = ids[:, 1:]
        p_logp = teacher_logp(teacher, ids)
        p_top1 = p_logp.argmax(-1)
        for name, model in [*students.items(), ("teacher", None)]:
            logp = p_logp if model is None else torch.log_softmax(model(input_ids=ids).logits[:, :-1].float(), -1)
            a = acc[name]
            a["nll"] += float(-logp.gather(-1, targets[..., None]).sum())
            a["kl"] += float((p_logp.exp() * (p_logp - logp)).sum())
            conf, top1 = logp.max(-1)
            a["agree"] += float((top1 == p_top1).sum())
            a["conf"].append(conf.exp().reshape(-1).numpy())
            a["correct"].append((top1 == targets).reshape(-1).numpy())
        n += targets.numel()
        nbytes += sum(target_bytes(reader, i) for i in rows)
    out = {}
    for name, a in acc.items():
        out[name] = {"ppl": math.exp(a["nll"] / n), "bpb": a["nll"] / math.log(2) / nbytes,
                     "ece": ece(np.concatenate(a["conf"]), np.concatenate(a["correct"])),
                     "top1_agree": a["agree"] / n, "kl_full": a["kl"] / n}
    out["positions"] = n
    return out


# ---------------------------------------------------------------- report


def bytes_read(reader: CacheReader) -> dict[str, float]:
    per = reader.array_bytes_per_token()
    return {mode: round(sum(v for k, v in per.items() if any(k.startswith(p) for p in prefixes)), 1)
            for mode, prefixes in READS.items()}


def step_seconds(records: list[dict], tokens: int) -> float:
    """Median seconds per step (the first step, with its warm-up, left out)."""
    rates = [r["tokens_per_s"] for r in records[1:] or records]
    return tokens / statistics.median(rates)


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


def write_report(results: dict, curves: dict[str, list[dict]]) -> str:
    rows = results["modes"]
    ce_ece = rows["none"]["ece"]
    lines = ["| mode | held-out ppl | bits/byte | ECE | top-1 agree | KL to teacher (full) | cache B/token read "
             "| step time / CE |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        step = "-" if r.get("step_vs_ce") is None else f"{r['step_vs_ce']:.2f}"
        bpt = "-" if r.get("bytes_per_token") is None else f"{r['bytes_per_token']:.1f}"
        lines.append(f"| {name} | {r['ppl']:.2f} | {r['bpb']:.3f} | {r['ece']:.4f} | {r['top1_agree']:.3f} "
                     f"| {r['kl_full']:.3f} | {bpt} | {step} |")
    t = results["targets"]
    lines += ["", f"Q1: best offline mode `{t['best_offline']}` ppl / online ppl = {t['q1_ratio']:.4f} "
              f"(target <= 1.02: {'pass' if t['q1_ratio'] <= 1.02 else 'MISS'}).",
              f"Calibration: KD modes with ECE above CE's ({ce_ece:.4f}): "
              f"{', '.join(t['ece_worse_than_ce']) or 'none'}.",
              f"Sizes: {json.dumps(results['sizes'])}"]
    md = "\n".join(lines) + "\n"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(8, 4.5))
        for name, recs in curves.items():
            ax.plot([r["step"] for r in recs], [r["ce"] for r in recs], label=name, lw=1)
        ax.set(xlabel="step", ylabel="train CE (nats)", title="make quality: same student, data and steps")
        ax.legend()
        fig.tight_layout()
        fig.savefig(OUT / "curves.png", dpi=90)
        plt.close(fig)
    except ImportError:
        pass
    return md


def main(args: argparse.Namespace) -> int:
    t_start = time.perf_counter()
    OUT.mkdir(exist_ok=True)
    cfg = quality_config(args)
    if not Path(cfg.data.source).exists():
        raise PipelineError(f"data.source {cfg.data.source} does not exist; run `make setup` or pass data.source=DIR")
    torch.manual_seed(cfg.run.seed)
    info = cache_teacher(cfg, show_progress=True)
    times = {"stage1_s": round(time.perf_counter() - t_start, 1)}
    curves, step_s, students = {}, {}, {}
    tokens = cfg.train.batch_size * (cfg.data.seq_len - 1)
    for mode in OFFLINE:
        t0 = time.perf_counter()
        summary = train(with_mode(cfg, mode), show_progress=True)
        run_dir = Path(summary["run_dir"])
        curves[mode] = train_records(run_dir)
        step_s[mode] = step_seconds(curves[mode], tokens)
        from transformers import AutoModelForCausalLM
        students[mode] = AutoModelForCausalLM.from_pretrained(run_dir / "final" / "student", dtype=torch.float32).eval()
        times[f"{mode}_s"] = round(time.perf_counter() - t0, 1)
        print(f"quality: {mode} trained ({times[f'{mode}_s']} s)", flush=True)
    torch.set_num_threads(torch.get_num_threads())
    t0 = time.perf_counter()
    teacher = load_model(resolve_teacher(cfg.teacher), torch.float32, torch.device("cpu"))
    students["online"], curves["online"] = train_online(cfg, teacher)
    step_s["online"] = step_seconds(curves["online"], tokens)
    times["online_s"] = round(time.perf_counter() - t0, 1)
    print(f"quality: online trained ({times['online_s']} s)", flush=True)
    reader = CacheReader(cfg.cache.dir)
    t0 = time.perf_counter()
    evals = evaluate_full(students, teacher, reader, cfg.train.batch_size)
    times["eval_s"] = round(time.perf_counter() - t0, 1)
    reads = bytes_read(reader)
    modes = {}
    for name in [*OFFLINE, "online", "teacher"]:
        modes[name] = {**evals[name], "bytes_per_token": reads.get(name),
                       "step_vs_ce": step_s[name] / step_s["none"] if name in step_s else None,
                       "step_s": step_s.get(name)}
    offline_kd = [m for m in OFFLINE if m != "none"]
    best = min(offline_kd, key=lambda m: modes[m]["ppl"])
    results = {
        "modes": modes,
        "targets": {"best_offline": best, "q1_ratio": modes[best]["ppl"] / modes["online"]["ppl"],
                    "ece_worse_than_ce": [m for m in [*offline_kd, "online"] if modes[m]["ece"] > modes["none"]["ece"]]},
        "sizes": {"train_tokens": info["splits"].get("train", 0) * cfg.data.seq_len, "eval_positions": evals["positions"],
                  "steps": cfg.train.steps, "batch": f"{cfg.train.batch_size}x{cfg.data.seq_len}",
                  "student": f"d={cfg.student.hidden_size} x {cfg.student.num_layers} layers", "top_k": cfg.cache.top_k,
                  "samples": cfg.cache.samples, "samples_unique_mean": info.get("samples_unique_mean"),
                  "torch_threads": torch.get_num_threads(), "wall_s": round(time.perf_counter() - t_start, 1),
                  **times},
        "cache_arrays_bytes_per_token": reader.array_bytes_per_token(),
    }
    (OUT / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = write_report(results, curves)
    (OUT / "results.md").write_text(md)
    print(md)
    return 0
