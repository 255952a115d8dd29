"""``doctor``: what this machine has and what the pipeline would do on it; with ``--config``,
also the memory plan of that config (``pipeline.memplan``) against this device or
``--device-memory``."""

from __future__ import annotations

import argparse
import platform

import torch

from .device import check_cuda_build, choose_precision, cpu_threads, resolve_device


def report() -> list[tuple[str, str]]:
    import numpy
    import transformers
    import zarr

    device = resolve_device("auto")
    precision = choose_precision(device)
    rows = [
        ("python", platform.python_version()),
        ("torch", torch.__version__),
        ("transformers", transformers.__version__),
        ("zarr", zarr.__version__),
        ("numpy", numpy.__version__),
        ("device", str(device)),
    ]
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        free, total = torch.cuda.mem_get_info(device)
        rows += [
            ("gpu", torch.cuda.get_device_name(device)),
            ("compute capability", f"{major}.{minor}"),
            ("gpu memory", f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"),
            ("torch cuda archs", " ".join(torch.cuda.get_arch_list())),
            ("kernels for this gpu", check_cuda_build(device) or "yes"),
        ]
    else:
        rows += [("compute capability", "n/a (no CUDA device)"), ("cpu threads", str(cpu_threads()))]
    rows += [("precision", f"{precision.name} ({precision.reason})"),
             ("grad scaler", "yes" if precision.use_grad_scaler else "no")]
    return rows


def mib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def plan_rows(p: dict) -> list[tuple[str, str]]:
    """The memory plan as (key, value) rows; keys are stable (tests and users grep them)."""
    rows = [("memory budget", f"{mib(p['budget_bytes'])} on {p['device']} ({mib(p['usable_bytes'])} usable after "
                              "reserve and slack)")]
    s1, s2 = p["stage1"], p["stage2"]
    rows += [
        ("stage1 peak", f"{mib(s1['peak'])} at teacher.batch_size={s1['batch_size']} "
                        f"({'fits' if s1['fits'] else 'DOES NOT FIT'})"),
        ("stage1 terms", f"weights {mib(s1['weights'])}, fp32 head {mib(s1['fp32_head'])} ({s1['head_mode']}), "
                         f"activations {mib(s1['activations'])}, logits chunk {mib(s1['logits_chunk'])}"),
        ("stage1 largest batch", str(s1["largest_batch"])),
        ("stage2 peak", f"{mib(s2['peak'])} at train.batch_size={s2['batch_size']} "
                        f"({'fits' if s2['fits'] else 'DOES NOT FIT'})"),
        ("stage2 terms", f"weights+grads+adamw+ema {mib(s2['weights'] + s2['grads'] + s2['adamw'] + s2['ema'])}, "
                         f"activations {mib(s2['activations'])}, loss chunk {mib(s2['loss_chunk'])}, "
                         f"autocast copies {mib(s2['autocast_copies'])}, extras {mib(s2['extras'] + s2['union_head'])}"),
        ("stage2 largest batch", str(s2["largest_batch"])),
    ]
    return rows


def main(args: argparse.Namespace | None = None) -> int:
    rows = report()
    plan = None
    if args is not None and getattr(args, "config", None):
        from .config import load_config
        from .errors import ConfigError
        from .memplan import parse_bytes, plan as make_plan

        cfg = load_config(args.config, getattr(args, "overrides", []) or [])
        budget = None
        if getattr(args, "device_memory", None):
            try:
                budget = parse_bytes(args.device_memory)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        # A named budget is for a GPU unless this machine has none and none was implied.
        cuda = True if budget is not None else None
        try:
            plan = make_plan(cfg, budget=budget, cuda=cuda)
        except OSError as e:
            raise ConfigError(f"cannot read the model configs of {args.config} ({e}); "
                              "check teacher.model / student.model") from None
        rows += plan_rows(plan)
    if args is not None and getattr(args, "json", False):
        import json
        print(json.dumps({"doctor": dict(rows), "plan": plan}, indent=1, default=str))
        return 0
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
