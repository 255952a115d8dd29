"""Prune the teacher, then distil: is a student cut from the teacher worth more than a fresh one?

    python -m bench.prune_distil --layers 10 --steps 150 --seeds 0 [key=value ...]

On ``make quality``'s cache and setting (the cache is built if missing): ``prune-teacher`` cuts
a student from the embedded teacher (``--layers`` / ``--hidden-size`` / ``--intermediate-size``),
then, per seed, stage 2 trains it and a fresh student of the same shape with the same KD mode,
data order and steps (only the learning rate differs: a student that starts from trained weights
takes a smaller one). Every student, the pruned one before training, and the teacher are
evaluated like ``make quality``'s (held-out perplexity, bits/byte, top-1 agreement, KL to the
exact teacher), each writes greedy continuations of the report's prompts, and the first seed's
students get ``make quality``'s gradient-fidelity measure (students near the teacher are where
the tail bucket's bias shows). Writes
``quality/prune.json`` and ``quality/prune.md``; wall times are in both.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from pipeline.cache import CacheReader
from pipeline.errors import PipelineError
from pipeline.report import PROMPTS, greedy
from stage1_teacher_cache.prune import prune_teacher
from stage1_teacher_cache.run import cache_teacher
from stage1_teacher_cache.teacher import load_model, load_tokenizer, resolve_teacher

from . import grad_fidelity
from .quality import OUT, config_for, evaluate_full, train_offline
from .quality_report import fidelity_table


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.prune_distil", description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/default.toml")
    p.add_argument("--setting", default="default", choices=("default", "dev"), help="make quality's setting")
    p.add_argument("--layers", type=int, default=10)
    p.add_argument("--hidden-size", type=int)
    p.add_argument("--intermediate-size", type=int)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--seeds", default="0")
    p.add_argument("--mode", default="topk_sampled", help="kd.mode of both arms")
    p.add_argument("--lr-pruned", type=float, default=1e-3)
    p.add_argument("--lr-fresh", type=float, default=3e-3)
    p.add_argument("--new-tokens", type=int, default=40)
    p.add_argument("--fidelity-sequences", type=int, default=2, help="held-out sequences for gradient fidelity")
    p.add_argument("--out", default=str(OUT))
    p.add_argument("overrides", nargs="*", metavar="key=value")
    return p.parse_args(argv)


def shape_overrides(model_dir: Path) -> list[str]:
    """student.* keys that build a fresh student of the pruned one's shape."""
    c = json.loads((model_dir / "config.json").read_text())
    return [f"student.hidden_size={c['hidden_size']}", f"student.num_layers={c['num_hidden_layers']}",
            f"student.num_heads={c['num_attention_heads']}", f"student.num_kv_heads={c['num_key_value_heads']}",
            f"student.intermediate_size={c['intermediate_size']}"]


def main(argv: list[str] | None = None) -> int:
    from transformers import AutoModelForCausalLM

    args = parse(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config_for(args)
    times = {}
    t0 = time.perf_counter()
    cache_teacher(cfg, show_progress=True)
    times["stage1_s"] = round(time.perf_counter() - t0, 1)
    shape = f"l{args.layers}" + (f"w{args.hidden_size}" if args.hidden_size else "") + (
        f"i{args.intermediate_size}" if args.intermediate_size else "")
    pruned_dir = Path(cfg.cache.dir).parent / f"pruned-{shape}"
    t0 = time.perf_counter()
    if not (pruned_dir / "prune.json").is_file():
        prune_teacher(cfg, pruned_dir, args.layers, args.hidden_size, args.intermediate_size)
    times["prune_s"] = round(time.perf_counter() - t0, 1)
    prune_info = json.loads((pruned_dir / "prune.json").read_text())

    seeds = [int(s) for s in args.seeds.split(",")]
    students = {}
    for seed in seeds:
        arms = {"pruned": [f"student.model={pruned_dir}", f"train.lr={args.lr_pruned}"],
                "fresh": [*shape_overrides(pruned_dir), f"train.lr={args.lr_fresh}"]}
        for arm, extra in arms.items():
            t0 = time.perf_counter()
            name = f"{arm}-s{seed}"
            students[name], _ = train_offline(config_for(args, (f"kd.mode={args.mode}", *extra, f"run.seed={seed}",
                                                                 f"run.name=prune-{name}"), args.steps))
            times[f"{name}_s"] = round(time.perf_counter() - t0, 1)
            print(f"prune_distil: {name} trained ({times[f'{name}_s']} s)", flush=True)
    students["pruned-init"] = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    source = resolve_teacher(cfg.teacher)
    teacher = load_model(source, torch.float32, torch.device("cpu"))
    t0 = time.perf_counter()
    reader = CacheReader(cfg.cache.dir)
    evals = evaluate_full(students, teacher, reader, cfg.train.batch_size)
    times["eval_s"] = round(time.perf_counter() - t0, 1)
    tokenizer = load_tokenizer(source)
    first = {name: m for name, m in students.items() if name.endswith(f"-s{seeds[0]}")}
    t0 = time.perf_counter()  # a student near the teacher is where the tail bucket's bias shows
    fidelity = grad_fidelity.measure(first, teacher, reader, sequences=args.fidelity_sequences)
    times["fidelity_s"] = round(time.perf_counter() - t0, 1)
    gens = {name: [greedy(m, tokenizer, p, args.new_tokens) for p in PROMPTS]
            for name, m in {"teacher": teacher, **first, "pruned-init": students["pruned-init"]}.items()}
    results = {"command": "python -m bench.prune_distil " + " ".join(sys.argv[1:] if argv is None else argv),
               "setting": args.setting, "steps": args.steps, "batch": f"{cfg.train.batch_size}x{cfg.data.seq_len}",
               "mode": args.mode, "lr": {"pruned": args.lr_pruned, "fresh": args.lr_fresh},
               "prune": prune_info, "evals": evals, "generations": gens, "gradient_fidelity": fidelity, "times": times,
               "torch_threads": torch.get_num_threads()}
    (out / "prune.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "prune.md").write_text(markdown(results))
    print((out / "prune.md").read_text())
    return 0


def markdown(r: dict) -> str:
    ev = r["evals"]
    arms = sorted({n.rsplit("-s", 1)[0] for n in ev if "-s" in n and n != "positions"})
    lines = [f"`{r['command']}`: kept layers {r['prune']['kept_layers']} of {r['prune']['teacher_shape']['layers']}, "
             f"{r['prune']['parameters'] / 1e6:.1f}M parameters; {r['steps']} steps of {r['batch']} tokens, "
             f"kd.mode={r['mode']}, lr {r['lr']}; {ev['positions']} held-out positions; "
             f"{r['torch_threads']} threads.", "",
             "| student | held-out ppl (per seed) | mean | bits/byte | top-1 agree | KL to teacher |",
             "|---|---|---|---|---|---|"]
    for arm in [*arms, "pruned-init", "teacher"]:
        runs = [v for n, v in ev.items() if n == arm or n.rsplit("-s", 1)[0] == arm and "-s" in n]
        mean = {k: statistics.fmean(x[k] for x in runs) for k in ("ppl", "bpb", "top1_agree", "kl_full")}
        per_seed = ", ".join(format(x["ppl"], ".1f") for x in runs)
        lines.append(f"| {arm} | {per_seed} | {mean['ppl']:.1f} | {mean['bpb']:.3f} | {mean['top1_agree']:.3f} "
                     f"| {mean['kl_full']:.3f} |")
    lines += ["", "Greedy continuations (first seed):", ""]
    for name, texts in r["generations"].items():
        for prompt, text in zip(PROMPTS, texts):
            lines.append(f"- **{name}**, `{prompt!r}` -> `{text!r}`")
    lines += ["", "Gradient fidelity at these students (first seed; cosine / norm ratio against the exact "
              "full-vocabulary KL gradient, at the logits, then at the parameters):", "",
              *fidelity_table(r["gradient_fidelity"]), "", *fidelity_table(r["gradient_fidelity"], "param_")]
    lines += ["", f"Wall times (s): {json.dumps(r['times'])}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except PipelineError as e:  # bad input: one line, like the pipeline's own commands
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
