"""``make bench-gpu`` (= ``python -m bench.gpu``): one prepared GPU check, offline, a few minutes.

1. ``doctor`` and the memory plan of the bench config;
2. stage 1 on the embedded teacher at seq 512 in the precision the policy picks (fp16 below
   compute capability 8.0, bf16 at or above): teacher tokens/s, peak CUDA memory, and P1 =
   stage-1 pass / pure forward (``model(ids).logits``) over the same tokens, same precision;
3. stage 2 (``train``) with the same policy (fp16 + GradScaler below 8.0) on a student shaped
   like SmolLM2-135M (d=576, 30 layers, 9/3 heads, I=1536, fresh weights: no network) for
   ``none`` (CE only), ``topk_tail`` and ``union``: tokens/s and peak CUDA memory from
   ``metrics.jsonl``, P2 = KD step / CE step, data-path stall (the time per step the loop waited
   for its prefetched batch: ``data_stall_s`` in ``metrics.jsonl``), and P3 = offline KD
   step / online step, where online = the teacher pass over the same batch (timed on the GPU)
   plus the offline step (the teacher runs inside the step, before the student's forward);
4. the planner's estimates beside the measured peaks;
5. ``bench/gpu-results.json`` and ``bench/gpu-results.md`` naming the card, torch and CUDA.

Without CUDA it exits at once with a one-line message and code 2. ``--cpu-smoke`` (hidden: for
the test suite) runs the same orchestration on the CPU with whatever tiny config it is given.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent
SEQ_LEN = 512
STUDENT_135M = ["student.hidden_size=576", "student.num_layers=30", "student.num_heads=9", "student.num_kv_heads=3",
                "student.intermediate_size=1536"]
MODES = ("none", "topk_tail", "union")


def parse(argv):
    ap = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/default.toml")
    ap.add_argument("--sequences", type=int, default=64, help=f"train sequences of {SEQ_LEN} tokens for stage 1")
    ap.add_argument("--steps", type=int, default=30, help="stage-2 steps per KD mode")
    ap.add_argument("--batch-size", type=int, default=8, help="stage-2 batch (lowered to what the planner says fits)")
    ap.add_argument("--out", default=str(OUT), help="directory for gpu-results.{json,md}")
    ap.add_argument("--cpu-smoke", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", metavar="key=value")
    return ap.parse_args(argv)


def sync(device) -> None:
    import torch
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device) -> None:
    import torch
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device) -> float | None:
    import torch
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def environment(device) -> dict:
    import torch
    env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "device": str(device)}
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        env.update(gpu=torch.cuda.get_device_name(device), capability=f"{cap[0]}.{cap[1]}",
                   gpu_memory_gib=round(torch.cuda.mem_get_info(device)[1] / 2**30, 2),
                   cudnn=torch.backends.cudnn.version())
    return env


def stage1(cfg, device, precision) -> tuple[dict, object]:
    """cache_teacher, then the pure forward over the cached tokens with the same weights dtype."""
    import numpy as np
    import torch

    from pipeline.cache import CacheReader
    from stage1_teacher_cache.run import cache_teacher
    from stage1_teacher_cache.teacher import load_model, resolve_teacher

    reset_peak(device)
    info = cache_teacher(cfg, show_progress=False)
    stage1_peak = peak_mb(device)
    model = load_model(resolve_teacher(cfg.teacher), precision.dtype, device)
    ids = torch.from_numpy(CacheReader(cfg.cache.dir, verify=False).read_range(0, info["sequences"], ("input_ids",))
                           ["input_ids"].astype(np.int64))
    b = cfg.teacher.batch_size

    def forward():
        with torch.inference_mode():
            for s in range(0, len(ids), b):
                model(input_ids=ids[s:s + b].to(device), use_cache=False)
        sync(device)

    forward()  # warm-up (kernels, allocator)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        forward()
        times.append(time.perf_counter() - t)
    fwd = statistics.median(times)
    summary = CacheReader(cfg.cache.dir, verify=False).manifest.get("summary", {})
    pass_s = summary.get("stage1_pass_s") or info.get("stage1_pass_s")
    return {"tokens": info["tokens"], "teacher_tokens_per_s": summary.get("teacher_tokens_per_s"),
            "stage1_pass_s": pass_s, "pure_forward_s": round(fwd, 3), "P1": round(pass_s / fwd, 3) if pass_s else None,
            "pure_forward_tokens_per_s": round(info["tokens"] / fwd, 1), "writer_stall_s": summary.get("writer_stall_s"),
            "peak_cuda_mb": stage1_peak, "precision": precision.name,
            "teacher_eval_ppl": info.get("teacher_eval_ppl")}, model


def teacher_step_s(model, cfg, device, batch_size: int) -> float:
    """The teacher pass (forward + fp32 head + top-k/logZ) over one student batch, on the device."""
    import numpy as np
    import torch

    from pipeline.cache import CacheReader
    from stage1_teacher_cache.teacher import TeacherPass

    teacher = TeacherPass(model, cfg.cache.top_k, cfg.teacher.logits_chunk)
    reader = CacheReader(cfg.cache.dir, verify=False)
    ids = torch.from_numpy(reader.read_range(0, min(batch_size, len(reader)), ("input_ids",))["input_ids"]
                           .astype(np.int64))
    teacher(ids)
    sync(device)
    times = []
    for _ in range(3):
        t = time.perf_counter()
        teacher(ids)  # returns host arrays: includes the copy back, as an online step would need the values
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stage2(cfg_args: list[str], mode: str, runs: Path, steps: int, device) -> dict:
    from pipeline.config import load_config
    from stage2_student_train.train import train

    cfg = load_config(None, [*cfg_args, f"kd.mode={json.dumps(mode)}", f"run.runs_dir={json.dumps(str(runs))}",
                             f"run.name={json.dumps(mode)}", f"train.steps={steps}",
                             f"train.warmup_steps={min(2, steps - 1)}", f"train.eval_every={steps}",
                             f"train.save_every={steps}", "train.overwrite=true", "train.eval_sequences=2"])
    reset_peak(device)
    t = time.perf_counter()
    train(cfg, show_progress=False)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (runs / mode / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trains = [r for r in records if "tokens_per_s" in r]
    steady = trains[min(3, len(trains) - 1):]  # the first steps compile kernels and warm the allocator
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    tokens_per_step = cfg.train.batch_size * cfg.train.grad_accum * (cfg.data.seq_len - 1)
    # data_stall_s: the recipe's running total of the time the loop waited for its prefetched batch.
    stall = ((steady[-1]["data_stall_s"] - trains[len(trains) - len(steady) - 1]["data_stall_s"]) / len(steady)
             if len(steady) < len(trains) and "data_stall_s" in steady[-1] else None)
    return {"mode": mode, "tokens_per_s": round(tps, 1), "step_s": round(tokens_per_step / tps, 4),
            "peak_cuda_mb": peak_mb(device), "metrics_mem_mb": max((r.get("mem_mb") or 0) for r in trains),
            "data_stall_s_per_step": round(stall, 5) if stall is not None else None,
            "data_stall_fraction": round(stall / (tokens_per_step / tps), 4) if stall is not None else None,
            "skipped_steps": trains[-1].get("skipped_steps"), "wall_s": round(wall, 1),
            "eval": next((r for r in reversed(records) if r.get("split") == "eval"), None)}


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    import torch
    if not args.cpu_smoke and not torch.cuda.is_available():
        print("error: bench-gpu needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "run it where `python -m pipeline doctor` shows a cuda device", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    from pipeline.config import config_overrides, load_config
    from pipeline.device import check_cuda_build, choose_precision, resolve_device
    from pipeline.doctor import plan_rows, report
    from pipeline.memplan import plan, teacher_dims

    device = resolve_device("cpu" if args.cpu_smoke else "auto")
    if (problem := check_cuda_build(device)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    precision = choose_precision(device)
    results: dict = {"environment": environment(device), "doctor": dict(report())}
    print("\n".join(f"{k:<22} {v}" for k, v in results["doctor"].items()), flush=True)

    with tempfile.TemporaryDirectory(prefix="kd-bench-gpu-") as tmp:
        base = load_config(args.config, [
            f"cache.dir={json.dumps(str(Path(tmp) / 'cache'))}", "cache.overwrite=true", "cache.store_head=true",
            f"data.seq_len={SEQ_LEN}", f"data.max_train_tokens={args.sequences * SEQ_LEN}",
            f"data.max_eval_tokens={4 * SEQ_LEN}", "cache.shard_sequences=16", "teacher.batch_size=8",
            *([] if args.cpu_smoke else STUDENT_135M), *args.overrides])
        tdims = teacher_dims(base)  # read once (a GGUF header parse): every plan below reuses it

        def plan_of(c) -> dict:
            return plan(c, cuda=device.type == "cuda", teacher=tdims)

        batch = args.batch_size
        if device.type == "cuda":  # the planner's largest batch that fits this card, if below the ask
            batch = max(1, min(batch, plan_of(base)["stage2"]["largest_batch"] or 1))
        cfg_args = [*config_overrides(base), f"train.batch_size={batch}"]
        cfg = load_config(None, cfg_args)
        mplan = plan_of(cfg)
        results["plan"] = {"stage1_peak_mb": round(mplan["stage1"]["peak"] / 2**20, 1),
                           "stage2_peak_mb": round(mplan["stage2"]["peak"] / 2**20, 1),
                           "stage2_largest_batch": mplan["stage2"]["largest_batch"], "rows": dict(plan_rows(mplan))}
        print(f"stage 1: {args.sequences} x {cfg.data.seq_len} tokens, precision {precision.name}", flush=True)
        results["stage1"], teacher_model = stage1(cfg, device, precision)
        print(json.dumps(results["stage1"]), flush=True)
        online_teacher_s = teacher_step_s(teacher_model, cfg, device, batch)
        del teacher_model
        runs = Path(tmp) / "runs"
        results["stage2"] = {}
        for mode in MODES:
            print(f"stage 2: kd.mode={mode}, batch {batch} x {cfg.data.seq_len}, {args.steps} steps", flush=True)
            results["stage2"][mode] = stage2(cfg_args, mode, runs, args.steps, device)
            print(json.dumps(results["stage2"][mode]), flush=True)
    s2 = results["stage2"]
    kd = s2["topk_tail"]["step_s"]
    results["ratios"] = {
        "P1": results["stage1"]["P1"],
        "P2_topk_tail": round(kd / s2["none"]["step_s"], 3),
        "P2_union": round(s2["union"]["step_s"] / s2["none"]["step_s"], 3),
        "P3": round(kd / (kd + online_teacher_s), 3),
        "online_teacher_s_per_step": round(online_teacher_s, 4),
        "online_tokens_per_s": round(s2["topk_tail"]["tokens_per_s"] * kd / (kd + online_teacher_s), 1),
    }
    results["planner_vs_measured"] = {
        "stage1": {"estimate_mb": results["plan"]["stage1_peak_mb"], "measured_mb": results["stage1"]["peak_cuda_mb"]},
        **{f"stage2_{m}": {"estimate_mb": round(plan_of(load_config(None, [*cfg_args, f"kd.mode={json.dumps(m)}"]))
                                                ["stage2"]["peak"] / 2**20, 1),
                           "measured_mb": s2[m]["peak_cuda_mb"]} for m in MODES}}
    results["wall_s"] = round(time.perf_counter() - t0, 1)
    write(results, Path(args.out), batch, cfg)
    return 0


def write(results: dict, out: Path, batch: int, cfg) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu-results.json").write_text(json.dumps(results, indent=1, default=str) + "\n")
    env, r, s1, s2 = results["environment"], results["ratios"], results["stage1"], results["stage2"]
    lines = [
        f"# bench-gpu: {env.get('gpu', env['device'])} (capability {env.get('capability', 'n/a')}), "
        f"torch {env['torch']}, CUDA {env['cuda']}",
        "",
        f"Stage 1: teacher {cfg.teacher.model}, {s1['tokens']} tokens at seq {cfg.data.seq_len}, {s1['precision']}. "
        f"Stage 2: student d={cfg.student.hidden_size} x {cfg.student.num_layers} layers, batch {batch}. "
        f"Wall {results['wall_s']} s.",
        "",
        "| what | value | target |",
        "|---|---|---|",
        f"| stage-1 teacher tokens/s | {s1['teacher_tokens_per_s']} | |",
        f"| P1 stage-1 pass / pure forward | {r['P1']} | <= 1.10 |",
        *[f"| stage-2 tokens/s, {m} | {s2[m]['tokens_per_s']} | |" for m in MODES],
        f"| P2 KD step / CE step, topk_tail | {r['P2_topk_tail']} | <= 1.10 |",
        f"| P2 KD step / CE step, union | {r['P2_union']} | <= 1.10 |",
        f"| P3 offline / online KD step | {r['P3']} | <= 0.5 |",
        f"| training tokens/s with the teacher online | {r['online_tokens_per_s']} | seed: ~400 on a P100 |",
        *[f"| data-path stall per step, {m} | {s2[m]['data_stall_s_per_step']} s "
          f"({s2[m]['data_stall_fraction']} of the step) | |" for m in MODES],
        f"| peak CUDA memory stage 1 (MB) | {s1['peak_cuda_mb']} (planner {results['plan']['stage1_peak_mb']}) | |",
        *[f"| peak CUDA memory stage 2, {m} (MB) | {s2[m]['peak_cuda_mb']} (planner "
          f"{results['planner_vs_measured'][f'stage2_{m}']['estimate_mb']}) | |" for m in MODES],
    ]
    (out / "gpu-results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
