"""``report``: one markdown page comparing student runs trained from the same cache.

    python -m pipeline report RUN [RUN ...] --out runs/demo

Writes ``OUT/REPORT.md`` and ``OUT/curves.png``: eval perplexity and bits-per-byte of every run
against the teacher's level, the cache's size and fidelity, wall times, and greedy generations
from the teacher and each student on the same prompts.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from .cache import CacheReader
from .errors import PipelineError
from .plot import plot_runs, read_metrics
from .tomlcompat import tomllib

PROMPTS = ["ROMEO.\nBut soft, what light", "KING.\nMy lords, I bid you", "Enter the Ghost.\n\nHORATIO.\n"]


def run_info(run_dir: Path) -> dict:
    if not (run_dir / "summary.json").is_file():
        raise PipelineError(f"{run_dir} has no summary.json; is the run finished (train-student wrote final/)?")
    summary = json.loads((run_dir / "summary.json").read_text())
    config = tomllib.loads((run_dir / "config.toml").read_text())
    _, evals = read_metrics(run_dir)
    return {"dir": run_dir, "summary": summary, "config": config, "evals": evals}


def greedy(model, tokenizer, prompt: str, new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def generations(runs: list[dict], reader: CacheReader, new_tokens: int) -> dict[str, list[str]]:
    """Greedy continuations: teacher (loaded from the cache's record of it) and each student."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    facts = reader.spec.teacher
    kwargs = {"gguf_file": facts["gguf_file"]} if facts.get("gguf_file") else {}
    models = {"teacher": (facts["path"], kwargs)}
    for run in runs:
        models[run["dir"].name] = (str(run["dir"] / "final" / "student"), {})
    out = {}
    for name, (path, kw) in models.items():
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).eval()
        out[name] = [greedy(model, tokenizer, p, new_tokens) for p in PROMPTS]
        del model
    return out


def write_report(run_dirs: list[Path], out_dir: Path, new_tokens: int = 40, with_generations: bool = True) -> Path:
    runs = [run_info(d) for d in run_dirs]
    cache_dirs = {r["config"]["cache"]["dir"] for r in runs}
    if len(cache_dirs) != 1:
        raise PipelineError(f"the runs trained on different caches ({sorted(cache_dirs)}); report compares one cache")
    reader = CacheReader(cache_dirs.pop(), verify=False)
    info = reader.info()
    out_dir.mkdir(parents=True, exist_ok=True)
    plot_runs(run_dirs, out_dir / "curves.png")

    def f(v, spec):
        return "n/a" if v is None else format(v, spec)

    lines = [f"# Distillation report ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"Machine: {platform.machine()}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}"
             + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU") + ".", "",
             "## Cache (stage 1)", "",
             "| | |", "|---|---|",
             f"| path | `{info['path']}` |",
             f"| teacher | {info['teacher']} |",
             f"| sequences | {info['sequences']} ({', '.join(f'{k} {v}' for k, v in info['splits'].items())}) "
             f"x {info['seq_len']} tokens = {info['tokens']} tokens |",
             f"| size on disk | {info['bytes_on_disk'] / 2**20:.1f} MiB ({info['head_bytes'] / 2**20:.1f} MiB of it the stored head) |",
             f"| bytes per token | {f(info['bytes_per_token'], '.1f')} (" + ", ".join(
                 f"{k} {v}" for k, v in info["array_bytes_per_token"].items()) + ") |",
             f"| top-{info['top_k']} mass covered | {f(info['topk_mass_mean'], '.3f')} |",
             f"| teacher held-out perplexity / bits per byte | {f(info['teacher_eval_ppl'], '.2f')} / "
             f"{f(info['teacher_eval_bpb'], '.3f')} |",
             f"| stage-1 wall time (run that completed it) | {f(info.get('stage1_wall_s'), '.0f')} s, "
             f"{f(info.get('teacher_tokens_per_s'), '.0f')} teacher tokens/s |", "",
             "## Students (stage 2, same cache, same student, same data order and steps)", "",
             "| run | KD mode | steps | held-out ppl | bits/byte | KL to teacher top-k | top-1 agreement | wall time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in runs:
        last = r["evals"][-1] if r["evals"] else {}
        s = r["summary"]
        lines.append(f"| {r['dir'].name} | {s['kd_mode']} | {s['step']} | {f(last.get('ppl'), '.1f')} | "
                     f"{f(last.get('bpb'), '.3f')} | {f(last.get('kl_teacher_topk'), '.3f')} | "
                     f"{f(last.get('teacher_top1_agree'), '.3f')} | {f(s.get('wall_s'), '.0f')} s |")
    lines += ["", f"Student: {runs[0]['summary'].get('student_parameters', 0) / 1e6:.1f} M parameters, "
              f"{student_origin(runs[0]['summary'])}. Eval uses the EMA weights.", "", "![curves](curves.png)", ""]
    if with_generations:
        gens = generations(runs, reader, new_tokens)
        lines += ["## Greedy generations", ""]
        for i, prompt in enumerate(PROMPTS):
            lines += [f"**Prompt:** `{prompt!r}`", ""]
            for name, texts in gens.items():
                lines += [f"- *{name}:* `{texts[i]!r}`"]
            lines.append("")
    path = out_dir / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def student_origin(summary: dict) -> str:
    """Where a run's student started, from its summary's model-card record."""
    card = summary.get("model_card") or {}
    pruned, start = card.get("pruned_from"), card.get("student_model")
    if pruned:
        kept, was = len(pruned.get("kept_layers") or []), (pruned.get("teacher_shape") or {}).get("layers", "?")
        return f"started from the teacher cut to {kept} of its {was} layers by prune-teacher ({Path(start).name})"
    return f"started from {start}" if start else "fresh (random initialisation)"


def main(args: argparse.Namespace) -> int:
    path = write_report([Path(r) for r in args.runs], Path(args.out), with_generations=not args.no_generations)
    print(f"report: {path}")
    return 0
