"""``python3 -m bench.gpu``: the GPU check, one call, offline, with the seed's shapes and random
weights, inside a time budget (default 360 s: no phase starts after it, so an H200 run ends well
inside 8 minutes).

It runs from an installed bundle (``make gpu-bundle``; ``bench/bundle.py``) on a machine that has
only its own ``python3`` with torch and transformers, and measures, in order:

1. the rate a large bf16 matrix product reaches on this card now (the denominator of MFU);
2. a Qwen3-MoE teacher of the seed's size (hidden 1024, vocabulary 151936, ~1.0B parameters,
   ~0.6B active), built with random weights on the card and saved with Qwen's real tokenizer;
3. stage 1 over the bundle's text: teacher tokens/s, P1 = stage-1 pass / pure forward over the
   same tokens, peak memory beside the planner's estimate; then one teacher pass over a student
   batch (the online step of P3);
4. stage 2 with a SmolLM-135M-shaped student: ``none``, ``topk_tail`` and ``sampled`` with the
   teacher's tokenizer (the student then has the teacher's 151936-entry vocabulary), and ``none``
   and the cross-tokenizer mode (the seed config's ``kd.mode``, else ``mapped``) with the real
   SmolLM2 tokenizer (49152 entries: SmolLM-135M's exact shape). Each: tokens/s, P2, MFU, data
   stall per step, peak memory beside the planner's estimate; P3 for ``topk_tail``;
5. a P100 emulation: the seed config (``--seed-config``) run for a few steps at its own batch with
   fp16 + GradScaler forced and the usable memory capped at 16 GiB
   (``torch.cuda.set_per_process_memory_fraction``): does it fit, by how much, planner beside it.

Results: ``OUT/gpu-results.json`` and ``OUT/gpu-results.md``; each phase's time is printed as it
ends. A phase that fails is recorded with its one-line error and the check carries on (exit 1).
Without CUDA it exits at once with a one-line error (code 2); ``--cpu-rehearsal --tiny`` runs the
same orchestration on the CPU with tiny shapes (the test suite does, from an installed bundle).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from bench import gpu_parts as parts
from pipeline.config import config_overrides, format_override as kv
from pipeline.tomlcompat import tomllib

GIB = 2**30
P100_CAP = 16 * GIB
TARGETS = {"G1_mfu": 0.40, "P1": 1.05, "P2": 1.10, "stall": 0.02, "planner": 0.15}


def parse(argv):
    ap = argparse.ArgumentParser(prog="python3 -m bench.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default="gpu-bundle", help="the folder `make gpu-bundle` built (tokenizers, text)")
    ap.add_argument("--out", default="bench", help="directory for gpu-results.{json,md}")
    ap.add_argument("--seed-config", default="configs/seed-p100.toml", help="the config the P100 emulation runs")
    ap.add_argument("--budget-s", type=float, default=360.0, help="phases not started by then are skipped")
    ap.add_argument("--sequences", type=int, default=128,
                    help="stage-1 train sequences (of 512 tokens; fewer if longer)")
    ap.add_argument("--seq-len", type=int, default=0, help="tokens per sequence (0: the seed config's, else 512)")
    ap.add_argument("--steps", type=int, default=30, help="stage-2 steps per run")
    ap.add_argument("--p100-steps", type=int, default=8, help="steps of the P100 emulation")
    ap.add_argument("--batch-size", type=int, default=32,
                    help="stage-2 batch of 512-token rows (fewer if longer; at most what the planner fits)")
    ap.add_argument("--tiny", action="store_true", help="tiny shapes (the CPU rehearsal)")
    ap.add_argument("--cpu-rehearsal", action="store_true", help="run on the CPU (with --tiny: the test suite)")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides for every run")
    return ap.parse_args(argv)


class Phases:
    """Runs the check's phases in order inside the time budget, timing each one; an error in one
    is recorded (one line) and the next goes on, unless a later phase needs what it made."""

    def __init__(self, budget_s: float):
        self.t0, self.budget_s = time.perf_counter(), budget_s
        self.times: dict[str, float] = {}
        self.errors: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def run(self, name: str, fn, *args, needs: tuple[str, ...] = ()):
        missing = [n for n in needs if n not in self.times or n in self.errors or n in self.skipped]
        if missing or self.elapsed() > self.budget_s:
            why = f"needs {', '.join(missing)}" if missing else f"time budget of {self.budget_s:.0f} s spent"
            self.skipped[name] = why
            print(f"[{self.elapsed():6.1f} s] {name}: skipped ({why})", flush=True)
            return None
        t = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - one phase's failure is a result, not the end of the check
            self.errors[name] = f"{e.__class__.__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            print(f"[{self.elapsed():6.1f} s] {name}: FAILED {self.errors[name]}", flush=True)
            return None
        finally:
            self.times[name] = round(time.perf_counter() - t, 2)
            print(f"[{self.elapsed():6.1f} s] {name}: {self.times[name]} s", flush=True)


def environment(device, bundle: Path) -> dict:
    import torch
    import transformers
    env = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
           "cuda": torch.version.cuda, "device": str(device), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        env.update(gpu=torch.cuda.get_device_name(device), capability=f"{cap[0]}.{cap[1]}",
                   gpu_memory_gib=round(torch.cuda.mem_get_info(device)[1] / GIB, 2))
    manifest = bundle / "MANIFEST.json"
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        env["bundle"] = {k: m.get(k) for k in ("python", "wheels", "total_bytes", "python_built_on")}
    return env


def load_tokenizers(bundle: Path) -> dict:
    from transformers import AutoTokenizer
    found = {}
    for name, size in (("qwen", 151851), ("smollm2", 49152)):
        path = bundle / "tokenizers" / name
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is missing: build the bundle with `make gpu-bundle` and pass --bundle")
        tok = AutoTokenizer.from_pretrained(path)
        if len(tok) != size:
            raise ValueError(f"{path} has {len(tok)} entries, not {size}: rebuild the bundle")
        found[name] = tok
    return found


def seed_seq_len(path: Path) -> int | None:
    try:
        return tomllib.loads(path.read_text()).get("data", {}).get("seq_len")
    except (OSError, tomllib.TOMLDecodeError):
        return None


def base_config(args, tmp: Path, teacher_dir: Path, seq_len: int, sequences: int):
    from pipeline.config import load_config
    texts = sorted((Path(args.bundle) / "text").glob("*.txt"))
    if len(texts) < 2:
        raise FileNotFoundError(f"{args.bundle}/text holds {len(texts)} .txt files (needs 2+): rebuild the bundle")
    tiny = args.tiny
    return load_config(None, [
        kv("teacher.model", str(teacher_dir)), kv("teacher.batch_size", 2 if tiny else 16),
        kv("teacher.logits_chunk", 64 if tiny else 2048), kv("data.source", str(Path(args.bundle) / "text")),
        kv("data.seq_len", seq_len), kv("data.eval_documents", [texts[-1].name]),
        kv("data.max_train_tokens", sequences * seq_len), kv("data.max_eval_tokens", 4 * seq_len),
        kv("cache.dir", str(tmp / "cache")), "cache.overwrite=true", kv("cache.top_k", 8 if tiny else 64),
        kv("cache.samples", 8 if tiny else 48), "cache.store_hidden=true", kv("cache.shard_sequences", 4 if tiny else 32),
        kv("cache.chunk_sequences", 2 if tiny else 4), kv("train.loss_chunk_size", 50 if tiny else 2048),
        *(["teacher.num_threads=1", "train.num_threads=1"] if tiny else []), *args.overrides])


def run_overrides(name: str, runs: Path, steps: int) -> list[str]:
    return [kv("run.name", name), kv("run.runs_dir", str(runs)), kv("train.steps", steps),
            kv("train.warmup_steps", min(2, steps - 1)), kv("train.eval_every", steps), kv("train.save_every", steps),
            "train.overwrite=true", "train.eval_sequences=2", "train.stop_after=0"]


def cross_mode(seed_path: Path) -> str:
    """The seed config's kd.mode when it is a cross-tokenizer one, else mapped."""
    from stage2_student_train.kd_modes import MODES
    try:
        mode = tomllib.loads(seed_path.read_text()).get("kd", {}).get("mode", "")
    except (OSError, tomllib.TOMLDecodeError):
        mode = ""
    return mode if mode in MODES and MODES[mode].tokenizer == "cross" else "mapped"


def stage2_run(ctx: dict, label: str, mode: str, cross: bool) -> dict:
    from pipeline.config import load_config
    from pipeline.memplan import plan
    from stage2_student_train.kd_modes import planned_memory
    cfg = load_config(None, [*ctx["base_args"], kv("kd.mode", mode),
                             kv("student.tokenizer", str(ctx["smollm2"]) if cross else ""),
                             *run_overrides(label, ctx["runs"], ctx["steps"])])
    res = parts.stage2(cfg, ctx["device"])
    dims = parts.student_dims(res.pop("run_dir"))
    flops = parts.student_flops_per_token(dims, cfg.data.seq_len)
    estimate = plan(cfg, cuda=ctx["device"].type == "cuda", teacher=ctx["tdims"], student=dims,
                    mode_memory=planned_memory)["stage2"]["peak"]
    res.update(student_params=dims.params, student_vocab=dims.vocab, flops_per_token=flops,
               mfu=round(flops * res["tokens_per_s"] / (rate * 1e12), 4) if (rate := ctx["matmul"]["tflops"]) else None,
               planner_peak_mb=round(estimate / 2**20, 1))
    print(json.dumps({label: res}), flush=True)
    return res


def p100_run(ctx: dict, seed_path: Path) -> dict:
    """The seed config's own batch, fp16 + GradScaler forced, usable memory capped at 16 GiB."""
    import torch

    from pipeline.config import load_config
    from pipeline.memplan import plan
    from stage2_student_train.kd_modes import planned_memory
    if not seed_path.is_file():
        raise FileNotFoundError(f"no seed config at {seed_path}; pass --seed-config FILE")
    device, cuda = ctx["device"], ctx["device"].type == "cuda"
    cfg = load_config(seed_path, [*config_overrides(ctx["base"], ("teacher", "data", "cache")), 'student.model=""',
                                  *parts.student_args(ctx["shape"]), kv("student.tokenizer", str(ctx["smollm2"])),
                                  *(['train.precision="float16"'] if cuda else []), 'train.parallel="none"',
                                  *ctx["overrides"], *run_overrides("p100", ctx["runs"], ctx["p100_steps"])])
    out = {"config": str(seed_path), "kd_mode": cfg.kd.mode, "batch": cfg.train.batch_size,
           "grad_accum": cfg.train.grad_accum, "seq_len": cfg.data.seq_len, "cap_mb": P100_CAP // 2**20,
           "emulated": cuda, "precision": "float16 + GradScaler" if cuda else "float32 (CPU: no fp16 emulation)"}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(P100_CAP / torch.cuda.get_device_properties(device).total_memory,
                                                   device)
    try:
        res = parts.stage2(cfg, device)
    except Exception as e:  # noqa: BLE001 - an out-of-memory here is the answer, not a crash
        if "out of memory" not in str(e).lower():
            raise
        return {**out, "fits": False, "error": str(e).splitlines()[0][:300]}
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
    dims = parts.student_dims(res.pop("run_dir"))
    p = plan(cfg, budget=P100_CAP, cuda=cuda, capability=(6, 0) if cuda else None, teacher=ctx["tdims"], student=dims,
             mode_memory=planned_memory)
    out.update({k: res[k] for k in ("tokens_per_s", "peak_mb", "peak_reserved_mb", "skipped_steps", "wall_s")},
               fits=True, planner_peak_mb=round(p["stage2"]["peak"] / 2**20, 1),
               planner_largest_batch=p["stage2"]["largest_batch"])
    if res["peak_reserved_mb"] is not None:
        out["headroom_mb"] = round(out["cap_mb"] - res["peak_reserved_mb"], 1)
        out["headroom_fraction"] = round(out["headroom_mb"] / out["cap_mb"], 4)
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    trace = parts.ImportTrace()
    import torch
    if not args.cpu_rehearsal and not torch.cuda.is_available():
        print("error: bench.gpu needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
              "run it on the GPU machine (docs/gpu-check.md), or add --cpu-rehearsal --tiny", file=sys.stderr)
        return 2
    from pipeline.device import check_cuda_build, choose_precision, resolve_device
    device = resolve_device("cpu" if args.cpu_rehearsal else "auto")
    if (problem := check_cuda_build(device)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    phases, bundle = Phases(args.budget_s), Path(args.bundle)
    results: dict = {"environment": environment(device, bundle), "budget_s": args.budget_s}
    with tempfile.TemporaryDirectory(prefix="kd-gpu-check-") as tmp:
        check(args, phases, results, device, choose_precision(device), Path(tmp))
    results.update(phase_s=phases.times, errors=phases.errors, skipped=phases.skipped,
                   wall_s=round(phases.elapsed(), 1),
                   imported=parts.imported_from(os.environ.get("PYTHONPATH", ""), trace))
    results["ratios"] = ratios(results)
    results["targets"] = targets(results)
    from bench.gpu_report import write
    write(results, Path(args.out))
    return 1 if phases.errors else 0


def prepare(args, tmp: Path, device, shape: str, seq_len: int, sequences: int, batch: int) -> dict:
    """The base config, the teacher's dimensions, the stage-2 batch and what every run shares."""
    from pipeline.config import load_config
    from pipeline.memplan import plan, teacher_dims
    from stage2_student_train.kd_modes import planned_memory
    base = base_config(args, tmp, tmp / "teacher", seq_len, sequences)
    tdims, cuda = teacher_dims(base), device.type == "cuda"
    same_args = [*config_overrides(base), *parts.student_args(shape)]
    if cuda:  # the planner's largest batch for the larger (teacher-vocabulary) student, if below the ask
        batch = max(1, min(batch, plan(load_config(None, same_args), teacher=tdims,
                                           mode_memory=planned_memory)["stage2"]["largest_batch"] or 1))
    return {"base": base, "batch": batch, "base_args": [*same_args, kv("train.batch_size", batch)],
            "runs": tmp / "runs", "steps": args.steps, "p100_steps": args.p100_steps, "device": device,
            "tdims": tdims, "shape": shape, "smollm2": Path(args.bundle) / "tokenizers" / "smollm2",
            "overrides": args.overrides,
            "plan_stage1_peak_mb": round(plan(base, cuda=cuda, teacher=tdims)["stage1"]["peak"] / 2**20, 1)}


def check(args, phases: Phases, results: dict, device, precision, tmp: Path) -> None:
    shape = "tiny" if args.tiny else "seed"
    seed_path = Path(args.seed_config)
    seq_len = args.seq_len or (32 if args.tiny else seed_seq_len(seed_path) or 512)
    scale = 1 if args.tiny else max(1, seq_len // 512)  # longer sequences: as many tokens, fewer rows
    sequences, batch = max(8, args.sequences // scale), max(1, args.batch_size // scale)
    results["matmul"] = phases.run("matmul", parts.matmul_tflops, device)
    toks = phases.run("tokenizers", load_tokenizers, Path(args.bundle))
    results["teacher"] = phases.run("teacher_build", parts.build_teacher, shape, (toks or {}).get("qwen"),
                                    tmp / "teacher", device, precision.dtype, needs=("tokenizers",))
    if results["teacher"]:
        print(f"teacher: {results['teacher']['params'] / 1e9:.3f}B parameters, "
              f"{results['teacher']['active_params'] / 1e9:.3f}B active: {json.dumps(results['teacher'])}", flush=True)
    ctx = phases.run("config", prepare, args, tmp, device, shape, seq_len, sequences, batch, needs=("teacher_build",))
    if ctx is None:
        return
    ctx["matmul"] = results["matmul"] or {"tflops": 0}
    base, batch = ctx["base"], ctx["batch"]
    results["plan_stage1_peak_mb"] = ctx["plan_stage1_peak_mb"]
    out = phases.run("stage1", parts.stage1, base, device, precision, needs=("config",))
    results["stage1"], teacher_model = out if out else (None, None)
    if teacher_model is not None:
        results["online_teacher_s"] = phases.run("online_teacher", parts.teacher_step_s, teacher_model, base, device,
                                                 batch)
    del teacher_model, out
    xmode = cross_mode(seed_path)
    results["stage2"] = {}
    for label, mode, cross in (("none", "none", False), ("topk_tail", "topk_tail", False),
                               ("sampled", "sampled", False), ("cross_none", "none", True),
                               (f"cross_{xmode}", xmode, True)):
        res = phases.run(f"stage2_{label}", stage2_run, ctx, label, mode, cross, needs=("stage1",))
        if res:
            results["stage2"][label] = res
    results["cross_mode"] = xmode
    results["p100"] = phases.run("p100", p100_run, ctx, seed_path, needs=("stage1",))


def ratios(r: dict) -> dict:
    s2, out = r.get("stage2") or {}, {"P1": (r.get("stage1") or {}).get("P1")}
    for kd, ce in (("topk_tail", "none"), ("sampled", "none"), (f"cross_{r.get('cross_mode')}", "cross_none")):
        if kd in s2 and ce in s2:
            out[f"P2_{kd}"] = round(s2[kd]["step_s"] / s2[ce]["step_s"], 3)
    if "topk_tail" in s2 and r.get("online_teacher_s"):
        step = s2["topk_tail"]["step_s"]
        out["P3"] = round(step / (step + r["online_teacher_s"]), 3)
        out["online_tokens_per_s"] = round(s2["topk_tail"]["tokens_per_s"] * out["P3"], 1)
    return out


def targets(r: dict) -> dict:
    """G1-G3 and the stall target, each with its figure and whether it holds (None: not measured)."""
    s2, ra, p = r.get("stage2") or {}, r["ratios"], r.get("p100") or {}
    kd = s2.get(f"cross_{r.get('cross_mode')}", {})
    p2 = [v for k, v in ra.items() if k.startswith("P2_")]
    stalls = [v["data_stall_fraction"] for v in s2.values() if v.get("data_stall_fraction") is not None]
    off = (abs(p["peak_mb"] / p["planner_peak_mb"] - 1) if p.get("peak_mb") and p.get("planner_peak_mb") else None)

    def judged(value, ok):
        return {"value": value, "holds": None if value is None else bool(ok(value))}

    return {"G1 stage-2 MFU, SmolLM-135M shape, cross KD >= 0.40": judged(kd.get("mfu"), lambda v: v >= 0.40),
            "G2 P1 <= 1.05": judged(ra.get("P1"), lambda v: v <= TARGETS["P1"]),
            "G2 P2 <= 1.10 (worst mode)": judged(max(p2) if p2 else None, lambda v: v <= TARGETS["P2"]),
            "data stall < 2% of the step (worst run)": judged(max(stalls) if stalls else None, lambda v: v < 0.02),
            "G3 seed batch fits 16 GiB (fp16)": judged(p.get("fits"), lambda v: v),
            "G3 planner within 15% of the measured peak": judged(round(off, 4) if off is not None else None,
                                                                 lambda v: v <= TARGETS["planner"])}


if __name__ == "__main__":
    sys.exit(main())
