"""The pieces of ``bench.gpu``: the seed's shapes, a randomly-initialised teacher saved with the
bundle's tokenizer, the card's matmul rate, model FLOPs, one timed stage-1 or stage-2 run, and
where the modules a run imported came from. The orchestration and the report are in ``gpu.py``.

Speed and memory do not depend on the weights, so the models are random: a Qwen3-MoE teacher of
the seed's shape (``configs/hf/huihui-ai--Huihui-MoE-1.2B-A0.6B``: hidden 1024, vocabulary 151936,
28 layers of 3 experts of width 3072 with 1 routed per token, untied head: 1280.2M parameters,
751.7M active) and a student shaped like SmolLM-135M (d=576, 30 layers, 9/3
heads, MLP 1536, tied head).
"""

from __future__ import annotations

import builtins
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

from pipeline.config import format_override as kv

QWEN_VOCAB = 151936
TEACHER = {"seed": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                        head_dim=128, num_experts=3, num_experts_per_tok=1, moe_intermediate_size=3072,
                        intermediate_size=3072),  # the shipped shape of the seed's teacher (tests/test_shapes.py)
           "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
                        intermediate_size=128)}
STUDENT = {"seed": dict(hidden_size=576, num_layers=30, num_heads=9, num_kv_heads=3, intermediate_size=1536),
           "tiny": dict(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=64)}


def student_args(shape: str) -> list[str]:
    return [kv(f"student.{k}", v) for k, v in STUDENT[shape].items()]


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


def peaks_mb(device) -> dict:
    import torch
    if device.type != "cuda":
        return {"peak_mb": None, "peak_reserved_mb": None}
    return {"peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1),
            "peak_reserved_mb": round(torch.cuda.max_memory_reserved(device) / 2**20, 1)}


def matmul_tflops(device) -> dict:
    """The rate a large matrix product reaches on this card now (bf16 8192^3 on CUDA, the mean of
    ten after three warm-ups; fp32 512^3 on the CPU): the denominator of MFU."""
    import torch
    cuda = device.type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (512, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(3):
        a @ b
    sync(device)
    t = time.perf_counter()
    for _ in range(10):
        a @ b
    sync(device)
    dt = time.perf_counter() - t
    del a, b
    return {"tflops": round(2 * n**3 * 10 / dt / 1e12, 2), "n": n, "dtype": str(dtype).removeprefix("torch.")}


def build_teacher(shape: str, tokenizer, out: Path, device, dtype) -> dict:
    """A random Qwen3-MoE of the seed's shape with the bundle's Qwen tokenizer, saved as a local
    Hugging Face directory (stage 1 loads it as it would any checkpoint). Built on ``device``."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    eos = tokenizer.eos_token_id
    config = Qwen3MoeConfig(vocab_size=QWEN_VOCAB, **TEACHER[shape], decoder_sparse_step=1,
                            max_position_embeddings=4096, tie_word_embeddings=False, eos_token_id=eos,
                            bos_token_id=eos)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)
    model.to(dtype)
    counts = teacher_counts(model, config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model
    return counts


def teacher_counts(model, config) -> dict:
    """Total and active parameters (active: the routed experts of a token, not all of them)."""
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - experts * (1 - config.num_experts_per_tok / config.num_experts)
    return {"arch": "Qwen3MoeForCausalLM", "params": total, "active_params": int(active),
            "embedding_params": config.vocab_size * config.hidden_size, **teacher_facts(config)}


def teacher_facts(config) -> dict:
    """The dimensions a reader checks the shape by."""
    return {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "num_experts", "num_experts_per_tok",
                                            "moe_intermediate_size", "num_attention_heads", "num_key_value_heads",
                                            "head_dim", "vocab_size")}


def student_flops_per_token(dims, seq_len: int) -> int:
    """Training FLOPs per token, nanoGPT/PaLM convention: 6 N (N: parameters with the tied head
    counted once, the head being a matmul) + 12 L d S for attention scores and values."""
    return 6 * dims.params + 12 * dims.layers * dims.heads * dims.head_dim * seq_len


def stage1(cfg, device, precision) -> tuple[dict, object]:
    """cache_teacher, then the pure forward (``model(ids)``, logits included) over the cached tokens."""
    import numpy as np
    import torch

    from pipeline.cache import CacheReader
    from stage1_teacher_cache.run import cache_teacher
    from stage1_teacher_cache.teacher import load_model, resolve_teacher

    reset_peak(device)
    info = cache_teacher(cfg, show_progress=False)
    peaks = peaks_mb(device)
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
    return {"sequences": info["sequences"], "tokens": info["tokens"],
            "teacher_tokens_per_s": summary.get("teacher_tokens_per_s"), "stage1_pass_s": pass_s,
            "pure_forward_s": round(fwd, 3), "P1": round(pass_s / fwd, 3) if pass_s else None,
            "pure_forward_tokens_per_s": round(info["tokens"] / fwd, 1), "writer_stall_s": summary.get("writer_stall_s"),
            **peaks, "precision": precision.name, "bytes_per_token": info.get("bytes_per_token")}, model


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
        teacher(ids)  # returns host arrays: includes the copy back, as an online step needs the values
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def stage2(cfg, device) -> dict:
    """One stage-2 run; tokens/s from the steady steps of metrics.jsonl, stall per step, peaks."""
    from stage2_student_train.train import train

    run_dir = Path(cfg.run.runs_dir) / cfg.run.name
    reset_peak(device)
    t = time.perf_counter()
    train(cfg, show_progress=False)
    wall = time.perf_counter() - t
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    trains = [r for r in records if "tokens_per_s" in r]
    skip = min(3, len(trains) - 1)  # the first steps compile kernels and warm the allocator
    steady = trains[skip:]
    tps = statistics.median(r["tokens_per_s"] for r in steady)
    step_s = cfg.train.batch_size * cfg.train.grad_accum * (cfg.data.seq_len - 1) / tps
    stall = None
    if skip and "data_stall_s" in steady[-1]:  # a running total: the steady steps' share of it
        stall = (steady[-1]["data_stall_s"] - trains[skip - 1]["data_stall_s"]) / len(steady)
    return {"kd_mode": cfg.kd.mode, "tokenizer": "teacher's" if not cfg.student.tokenizer else "student's own",
            "batch": cfg.train.batch_size, "grad_accum": cfg.train.grad_accum, "seq_len": cfg.data.seq_len,
            "tokens_per_s": round(tps, 1), "step_s": round(step_s, 4), **peaks_mb(device),
            "data_stall_s_per_step": round(stall, 5) if stall is not None else None,
            "data_stall_fraction": round(stall / step_s, 4) if stall is not None else None,
            "skipped_steps": trains[-1].get("skipped_steps"), "steps": len(trains), "wall_s": round(wall, 1),
            "run_dir": str(run_dir)}


def student_dims(run_dir: Path):
    """The dimensions of the student a run trained (its exported config), for the planner."""
    from transformers import AutoConfig

    from pipeline.memplan import dims_from_hf_config
    return dims_from_hf_config(AutoConfig.from_pretrained(Path(run_dir) / "final" / "student"))


PROJECT = ("pipeline", "stage1_teacher_cache", "stage2_student_train", "bench")


class ImportTrace:
    """Records the top-level packages the project's own modules import (``import x`` statements run
    by a module of PROJECT), so a run can say which of them came from outside the bundle."""

    def __init__(self):
        self.names: set[str] = set()
        self._import = builtins.__import__
        builtins.__import__ = self

    def __call__(self, name, globals=None, locals=None, fromlist=(), level=0):
        if level == 0 and globals and str(globals.get("__name__", "")).split(".")[0] in PROJECT:
            self.names.add(name.split(".")[0])
        return self._import(name, globals, locals, fromlist, level)


def imported_from(pythonpath: str, trace: ImportTrace) -> dict:
    """``bundle``: the distributions this process loaded from PYTHONPATH (the bundle's install);
    ``interpreter``: those the project's own code imported from the interpreter's site-packages,
    which on the GPU box must be what its python3 has (``bench.bundle.BOX_HAS``)."""
    import importlib.metadata

    roots = [os.path.realpath(p) + os.sep for p in pythonpath.split(os.pathsep) if p]
    owners = importlib.metadata.packages_distributions()
    found: dict[str, set[str]] = {"bundle": set(), "interpreter": set()}
    for name, module in list(sys.modules.items()):
        path = getattr(module, "__file__", None)
        if "." in name or name.startswith("__") or not path or name in sys.stdlib_module_names:
            continue
        if any(os.path.realpath(path).startswith(r) for r in roots):
            found["bundle"].update(owners.get(name) or [name])
        elif name in trace.names and name not in PROJECT:
            found["interpreter"].update(owners.get(name) or [name])
    return {k: sorted({d.lower().replace("_", "-") for d in v}) for k, v in found.items()}
