"""``python -m pipeline prune-teacher``: a student initialised from the teacher's own weights.

Loads the teacher the way stage 1 does (``teacher.model``), runs it on the first
``--calibration`` training sequences of the config's plan (the ones stage 1 caches), drops the
layers of lowest Block Influence, optionally narrows the residual stream, the MLPs and the
attention heads by activation importance (``prune_ops``), and writes a Hugging Face model
directory with the teacher's tokenizer and a ``prune.json`` saying what was kept and why.
Stage 2 then trains it from the cache with ``student.model=DIR``; it never loads the teacher.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import torch

from pipeline.config import Config, config_overrides, format_override, load_config
from pipeline.device import cpu_threads
from pipeline.errors import ConfigError
from pipeline.paths import require_directory_path, resolve_work

from . import prune_ops as ops
from .teacher import load_model, load_model_config, load_tokenizer, resolve_teacher

SUPPORTED = ("llama", "mistral", "qwen2")  # q/k/v/o + gate/up/down + two RMSNorms per layer


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    info = prune_teacher(cfg, Path(resolve_work(args.out)), layers=args.layers, hidden=args.hidden_size,
                         intermediate=args.intermediate_size, calibration=args.calibration)
    s = info["shape"]
    print(f"wrote {args.out}: {s['layers']} of {info['teacher_shape']['layers']} layers "
          f"(kept {info['kept_layers']}), hidden {s['hidden']}, intermediate {s['intermediate']}, "
          f"{s['heads']} heads; {info['parameters'] / 1e6:.1f}M parameters in {info['wall_s']:.0f} s")
    return 0


def target_shape(config, layers: int | None, hidden: int | None, intermediate: int | None) -> ops.Shape:
    """The requested shape, checked against the teacher's (defaults: the teacher's own)."""
    if config.model_type not in SUPPORTED:
        raise ConfigError(f"prune-teacher supports {', '.join(SUPPORTED)} teachers, not {config.model_type!r}")
    n, d, inter = config.num_hidden_layers, config.hidden_size, config.intermediate_size
    heads, kv, hd = config.num_attention_heads, config.num_key_value_heads, ops.head_dim_of(config)
    for flag, value in (("--layers", layers), ("--hidden-size", hidden), ("--intermediate-size", intermediate)):
        if value is not None and value < 1:  # 0 is a size, not "the teacher's" (that is: leave the flag out)
            raise ConfigError(f"{flag} {value}: a size must be at least 1; leave {flag} out to keep the teacher's")
    layers, hidden, intermediate = (n if layers is None else layers, d if hidden is None else hidden,
                                    inter if intermediate is None else intermediate)
    if not 1 <= layers <= n:
        raise ConfigError(f"--layers {layers}: the teacher has {n} layers; keep between 1 and {n}")
    if not 1 <= intermediate <= inter:
        raise ConfigError(f"--intermediate-size {intermediate}: the teacher's is {inter}; choose 1 to {inter}")
    if hidden == d:
        return ops.Shape(layers, d, intermediate, heads)
    if heads * hd != d:
        raise ConfigError(f"--hidden-size: this teacher's width ({d}) is not heads x head_dim ({heads} x {hd}); "
                          "prune depth and --intermediate-size only")
    if not (hd <= hidden < d and hidden % hd == 0):
        raise ConfigError(f"--hidden-size {hidden}: must be a multiple of the head dim {hd} below the teacher's {d} "
                          f"(it keeps hidden/{hd} attention heads)")
    if (hidden // hd) % kv:
        raise ConfigError(f"--hidden-size {hidden} keeps {hidden // hd} heads, not a multiple of the {kv} key/value "
                          f"heads; choose a multiple of {hd * kv}")
    return ops.Shape(layers, hidden, intermediate, hidden // hd)


def check_out_dir(out: Path) -> None:
    """Refuse anything but a new or empty directory: prune-teacher never overwrites (checked
    before the teacher loads, as is a parent that is a file)."""
    require_directory_path(out, "--out")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"--out {out} already exists and is not an empty directory; "
                          "choose a new directory (prune-teacher never overwrites)")


def calibration_batches(cfg: Config, tokenizer, count: int) -> list[torch.Tensor]:
    """The first ``count`` training sequences of the plan, as stage 1 packs them. Planned in a
    private temp folder, only as far as ``count`` sequences: the cache's own plan folder belongs
    to ``cache-teacher`` (which may be running on it now) and is neither read nor written here."""
    import tempfile

    from .plan import ensure_plan

    d = cfg.data
    cap = count * d.seq_len if not d.max_train_tokens else min(d.max_train_tokens, count * d.seq_len)
    with tempfile.TemporaryDirectory(prefix="kd-prune-plan-") as tmp:
        private = load_config(None, [*config_overrides(cfg, ("teacher", "data", "cache")),
                                     format_override("cache.plan_dir", str(Path(tmp) / "plan")),
                                     format_override("data.max_train_tokens", cap)])
        plan = ensure_plan(private, tokenizer, show_progress=False)
        n = min(count, plan.count["train"])
        if n < 1:
            raise ConfigError("the plan has no training sequences to measure importance on; check data.source")
        ids = torch.from_numpy(plan.rows_of(0, n).input_ids.copy())
    return list(ids.split(cfg.teacher.batch_size))


def prune(model, shape: ops.Shape, batches: list[torch.Tensor]) -> tuple:
    """(student, selection, layer scores): depth by Block Influence on the teacher, then width by
    activation importance on the depth-pruned model."""
    scores = ops.block_influence(model, batches)
    layers = ops.choose_layers(scores, shape.layers)
    config = model.config
    depth_shape = ops.Shape(shape.layers, config.hidden_size, config.intermediate_size, config.num_attention_heads)
    shallow = ops.build_pruned(model, ops.full_selection(config, layers), depth_shape)
    if (shape.hidden, shape.intermediate, shape.heads) == (depth_shape.hidden, depth_shape.intermediate,
                                                           depth_shape.heads):
        return shallow, ops.full_selection(config, layers), scores
    importance = ops.width_importance(shallow, batches)
    sel = ops.select_width(importance, shape, config.num_key_value_heads, list(range(shape.layers)))
    return ops.build_pruned(shallow, sel, shape), ops.Selection(layers, sel.hidden, sel.intermediate, sel.heads), scores


def prune_teacher(cfg: Config, out: Path, layers: int | None = None, hidden: int | None = None,
                  intermediate: int | None = None, calibration: int = 8) -> dict:
    """Write the pruned student to ``out`` and return what ``prune.json`` records."""
    t0 = time.perf_counter()
    if calibration < 1:
        raise ConfigError(f"--calibration {calibration}: measure importance on at least 1 sequence")
    check_out_dir(out)
    source = resolve_teacher(cfg.teacher)
    shape = target_shape(load_model_config(source), layers, hidden, intermediate)
    torch.set_num_threads(cpu_threads(1, cfg.teacher.num_threads))
    tokenizer = load_tokenizer(source)
    batches = calibration_batches(cfg, tokenizer, calibration)
    teacher = load_model(source, torch.float32, torch.device("cpu"))
    student, sel, scores = prune(teacher, shape, batches)
    c = teacher.config
    info = {"teacher": cfg.teacher.model, "method": "block influence (depth), activation magnitude (width)",
            "teacher_shape": {"layers": c.num_hidden_layers, "hidden": c.hidden_size,
                              "intermediate": c.intermediate_size, "heads": c.num_attention_heads},
            "shape": vars(shape), "kept_layers": sel.layers,
            "block_influence": [round(float(s), 6) for s in scores],
            "calibration_tokens": sum(b.numel() for b in batches),
            "parameters": sum(p.numel() for p in student.parameters()),
            "wall_s": round(time.perf_counter() - t0, 2)}
    save(student, tokenizer, out, info)
    return info


def save(student, tokenizer, out: Path, info: dict) -> None:
    """Write into a temporary sibling, then rename: ``out`` is whole or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        student.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "prune.json").write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        check_out_dir(out)  # still new or empty
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
