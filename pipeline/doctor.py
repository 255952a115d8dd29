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
    cap = f" (compute capability {p['capability']})" if p.get("capability") else ""
    rows = [("memory budget", f"{mib(p['budget_bytes'])} on {p['device']}{cap} ({mib(p['usable_bytes'])} usable "
                              "after reserve and slack)")]
    s1, s2 = p["stage1"], p["stage2"]
    rows += [
        ("stage1 peak", f"{mib(s1['peak'])} at teacher.batch_size={s1['batch_size']} "
                        f"({'fits' if s1['fits'] else 'DOES NOT FIT'})"),
        ("stage1 terms", f"weights {mib(s1['weights'])}, fp32 head {mib(s1['fp32_head'])} ({s1['head_mode']}), "
                         f"activations {mib(s1['activations'])}, logits chunk {mib(s1['logits_chunk'])}"),
        ("stage1 largest batch", str(s1["largest_batch"])),
        ("planned precision", f"teacher {s1['dtype_bytes']} B/element, student autocast {s2['autocast_bytes']} B/element"),
        ("stage2 peak", f"{mib(s2['peak'])} at train.batch_size={s2['batch_size']} "
                        f"({'fits' if s2['fits'] else 'DOES NOT FIT'})"),
        ("stage2 terms", f"weights+grads+adamw+ema {mib(s2['weights'] + s2['grads'] + s2['adamw'] + s2['ema'])}, "
                         f"activations {mib(s2['activations'])}, loss chunk {mib(s2['loss_chunk'])}, "
                         f"autocast copies {mib(s2['autocast_copies'])}, extras {mib(s2['extras'] + s2['union_head'])}"),
        ("stage2 largest batch", str(s2["largest_batch"])),
        ("stage2 gradient checkpointing", f"{'on' if s2['gradient_checkpointing'] else 'off'}; without: peak "
                                          f"{mib(s2['peak_no_checkpointing'])}, largest batch "
                                          f"{s2['largest_batch_no_checkpointing']}; with: peak "
                                          f"{mib(s2['peak_checkpointing'])}, largest batch "
                                          f"{s2['largest_batch_checkpointing']}"),
    ]
    return rows


MODE_MEMORY = "stage2_student_train.kd_modes:planned_memory"
"""What a KD mode adds to stage 2's memory: looked up by module path, as the CLI does for
commands (``pipeline`` imports no stage)."""


def target(args: argparse.Namespace) -> tuple[int | None, bool | None, tuple[int, int] | None]:
    """(budget, cuda, capability) to plan for from --device-memory, --card, --compute-capability."""
    from .errors import ConfigError
    from .memplan import CARDS, parse_bytes

    budget, capability = None, None
    if getattr(args, "card", None):
        name = args.card.strip().lower()
        if name not in CARDS:
            raise ConfigError(f"unknown card {args.card!r}; choose from {', '.join(CARDS)} or give "
                              "--device-memory and --compute-capability")
        capability, budget = CARDS[name]
    if getattr(args, "compute_capability", None):
        try:
            major, minor = (int(x) for x in args.compute_capability.strip().split("."))
        except ValueError:
            raise ConfigError(f"cannot read a compute capability from {args.compute_capability!r}; "
                              "write e.g. 6.0 (P100) or 7.5 (T4)") from None
        capability = (major, minor)
    if getattr(args, "device_memory", None):
        try:
            budget = parse_bytes(args.device_memory)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    # A named budget or card is a GPU, whatever this machine has.
    return budget, (True if budget is not None or capability is not None else None), capability


def model_shapes(cfg, args: argparse.Namespace) -> dict[str, tuple[str | None, str]]:
    """Where the plan reads each model's shape: ``--teacher-config``/``--student-config`` when
    given, else the shipped ``config.json`` of a hub id (``pipeline.shapes``: no network), else the
    model's own source (the hub, a local folder). who -> (local config path or None, a phrase)."""
    from .shapes import display_path, shipped_shape

    out = {}
    for who, given, model in (("teacher", getattr(args, "teacher_config", None), cfg.teacher.model),
                              ("student", getattr(args, "student_config", None), cfg.student.model)):
        if given:
            out[who] = (given, f"{given} (--{who}-config)")
        elif (shape := shipped_shape(model, args.config)) is not None:
            out[who] = (str(shape), f"{display_path(shape)}, shipped for {model} (the hub is not asked; "
                                    f"--{who}-config FILE plans from another config.json)")
        else:
            out[who] = (None, f"from {model}" if model else "built from [student] (a fresh model)")
    return out


def main(args: argparse.Namespace | None = None) -> int:
    rows = report()
    plan = None
    if args is not None and getattr(args, "config", None):
        from .cli import resolve
        from .config import load_config
        from .errors import ConfigError
        from .memplan import plan as make_plan

        cfg = load_config(args.config, getattr(args, "overrides", []) or [])
        budget, cuda, capability = target(args)
        shapes = model_shapes(cfg, args)
        try:
            plan = make_plan(cfg, budget=budget, cuda=cuda, capability=capability, mode_memory=resolve(MODE_MEMORY),
                             teacher_config=shapes["teacher"][0], student_config=shapes["student"][0])
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot read the model configs of {args.config} ({str(e)[:300]}); check "
                              "teacher.model / student.model, or plan offline from a local config.json with "
                              "--teacher-config / --student-config") from None
        rows += [(f"{who} shape", why) for who, (_, why) in shapes.items()] + plan_rows(plan)
    if args is not None and getattr(args, "json", False):
        import json
        print(json.dumps({"doctor": dict(rows), "plan": plan}, indent=1, default=str))
        return 0
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0
