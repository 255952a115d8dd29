"""``make quality``'s report: quality/results.md from results.json's dict, and the training curves."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

import torch


from . import grad_fidelity, quality_stats
from .quality_stats import describe


def _ms(s: dict, fmt: str) -> str:
    return f"{s['mean']:{fmt}} ± {s['sd']:{fmt}}"


def quality_table(results: dict) -> list[str]:
    summary, steps, reads = results["summary"], results["step_vs_ce"], results["bytes_per_token_read"]
    lines = ["| variant | held-out ppl (mean ± sd) | min-max | bits/byte | ECE | top-1 agree | KL to teacher "
             "| cache B/token read | step time / CE |", "|---|---|---|---|---|---|---|---|---|"]
    for v, s in summary.items():
        step = f"{steps[v]:.2f}" if v in steps else "-"
        base = v.removeprefix("equal_wall_")
        mode = next((m for m in sorted(reads, key=len, reverse=True) if base.startswith(m)), None)
        bpt = f"{reads[mode]:.1f}" if mode is not None else "-"
        lines.append(f"| {v} | {_ms(s['ppl'], '.2f')} | {s['ppl']['min']:.1f}-{s['ppl']['max']:.1f} "
                     f"| {_ms(s['bpb'], '.3f')} | {_ms(s['ece'], '.4f')} | {_ms(s['top1_agree'], '.3f')} "
                     f"| {_ms(s['kl_full'], '.3f')} | {bpt} | {step} |")
    return lines


def fidelity_table(fidelity: dict, level: str = "") -> list[str]:
    """cosine / norm ratio per (student, mode); ``level`` "" for the logits, "param_" for the parameters
    (results from before the parameter level have no "param_" keys: no table)."""
    if not fidelity:
        return []
    modes = list(next(iter(fidelity.values())))
    if any(f"{level}cosine" not in per[m] for per in fidelity.values() for m in modes):
        return []
    lines = ["| student | " + " | ".join(modes) + " |", "|---|" + "---|" * len(modes)]
    for student, per in fidelity.items():
        lines.append(f"| {student} | " + " | ".join(
            f"{per[m][level + 'cosine']:.3f} / {per[m][level + 'norm_ratio']:.2f}" for m in modes) + " |")
    return lines


def q1_verdict(targets: dict, bound: float = 1.02) -> str:
    """``pass`` only when the whole paired 95% CI is within the bound, ``MISS`` when the whole CI is
    above it; otherwise ``inconclusive`` with the CI (the seeds cannot tell it from the other side);
    one seed: the mean only."""
    q = targets["q1_paired"]
    if q is None:
        return ("MISS on the mean" if targets["q1_ratio_of_means"] > bound else "pass on the mean") + ", one seed"
    lo, hi = q["ratio_ci95"]
    v = quality_stats.verdict((lo, hi), bound)
    return v if v != "inconclusive" else f"inconclusive (95% CI {lo:.3f}-{hi:.3f} straddles {bound})"


def markdown(results: dict) -> str:
    t, sizes = results["targets"], results["sizes"]
    lines = [f"Setting `{results['setting']}`, seeds {results['seeds']} (mean ± sample sd over the seeds; "
             "commands: " + "; ".join(f"`{c}`" for c in results["commands"]) + ").", "", *quality_table(results), ""]
    if results.get("preregistered"):
        lines += [quality_stats.describe_preregistered(results["preregistered"]), ""]
    if t:
        q = t["q1_paired"]
        metric, ref = t.get("metric", "ppl"), t.get("reference", "online")
        paired = "" if q is None else (f"; paired over seeds {q['ratio']:.4f} (95% CI {q['ratio_ci95'][0]:.4f}-"
                                       f"{q['ratio_ci95'][1]:.4f})")
        lines += [f"Q1 (picked after the fact, on the same seeds: exploratory): best offline variant "
                  f"`{t['best_offline']}`: mean {metric} / {ref} mean {metric} = "
                  f"{t['q1_ratio_of_means']:.4f}{paired} (target <= 1.02: {q1_verdict(t)}).",
                  f"Calibration: variants with mean ECE above CE's: {', '.join(t['ece_worse_than_ce']) or 'none'}.", ""]
    if results.get("equal_wall"):
        e = results["equal_wall"]
        steps = e.get("steps_by_seed") or e["steps"]
        lines += [f"Equal wall-clock: `{e['variant']}` for {steps} steps (online step / its step, measured in "
                  f"each run; first {e['factor']:.2f}) is row `equal_wall_{e['variant']}`; stage 1 "
                  f"({sizes['stage1_s']} s here) is paid once for every student of the cache.", ""]
    lines += ["Differences, paired by seed (two-sided paired t-test on log ppl / log bits-per-byte / ECE; "
              "\"larger\" = Holm-adjusted p < 0.05 over this family; `bench/quality_stats.py`):", ""]
    lines += [f"- {describe(c)}" for c in results["comparisons"]]
    if results.get("gradient_fidelity"):
        lines += ["", "Gradient fidelity (first seed, held-out positions): cosine / norm ratio of each mode's "
                  "gradient w.r.t. the student's logits against the exact full-vocabulary KL gradient `s - p`:", "",
                  *fidelity_table(results["gradient_fidelity"])]
        if params := fidelity_table(results["gradient_fidelity"], "param_"):
            lines += ["", "The same at the student's parameters (each mode's logit gradient back-propagated, summed "
                      "over the measured sequences, against the exact loss's parameter gradient):", "", *params]
    ex = results["tail_bucket_example"]
    lines += ["", f"Tail-bucket example (p = [.5,.3,.15,.05], student logits [0,.3,0,0], union of teacher top-1 and "
              f"student top-1): exact {[round(x, 3) for x in ex['exact']]}, union {[round(x, 3) for x in ex['union']]}.",
              "", f"Sizes: {json.dumps(sizes)}"]
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, recs in curves.items():
        ax.plot([r["step"] for r in recs], [r["ce"] for r in recs], label=name, lw=1)
    ax.set(xlabel="step", ylabel="train CE (nats)", title="make quality (first seed): same student, data and steps")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- results.json


def results_dict(setting: str, seeds: list[int], per_seed: dict, step_s: dict, fidelity: dict, times: dict,
                 facts: dict, eq: dict | None, commands: list[str] | None = None) -> dict:
    summary = quality_stats.summarise(per_seed)
    ce_ece = summary["none"]["ece"]["mean"]
    default, ref, metric = quality_stats.PREREGISTERED.get(setting, ("topk_sampled", "online", "ppl"))
    offline = [v for v in summary if v not in ("none", ref, "teacher")]
    best = min((v for v in offline if not v.startswith("equal_wall")), key=lambda v: summary[v][metric]["mean"],
               default=None)
    steps = {v: statistics.median(x) for v, x in step_s.items()}
    return {
        "setting": setting, "seeds": seeds, "commands": commands or [this_command()],
        "per_seed": per_seed, "summary": summary,
        "preregistered": quality_stats.preregistered(per_seed, setting),
        "comparisons": quality_stats.comparisons(per_seed, ref, "none", metric, skip=(default, ref)), "equal_wall": eq,
        "targets": None if best is None or ref not in summary else {
            "metric": metric, "reference": ref, "best_offline": best,
            "q1_ratio_of_means": summary[best][metric]["mean"] / summary[ref][metric]["mean"],
            "q1_paired": quality_stats.paired(per_seed, best, ref, metric),
            "ece_worse_than_ce": [v for v in [*offline, ref] if summary[v]["ece"]["mean"] > ce_ece]},
        "step_s": step_s, "step_s_median": steps,
        "step_vs_ce": {v: x / steps["none"] for v, x in steps.items()} if "none" in steps else {},
        "bytes_per_token_read": facts["bytes_per_token_read"], "gradient_fidelity": fidelity,
        "tail_bucket_example": grad_fidelity.worked_example(), "facts": facts, "times": times,
        "sizes": {**{k: v for k, v in facts.items() if not k.endswith("per_token") and k != "bytes_per_token_read"},
                  "eval_positions": next(iter(per_seed["none"].values()))["positions"],
                  "torch_threads": torch.get_num_threads(), "stage1_s": times.get("stage1_s", times.get("part0_stage1_s"))},
    }


def this_command() -> str:
    return "python -m pipeline " + " ".join(sys.argv[1:])


def write(out: Path, results: dict) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(markdown(results))


def merge(args, out: Path) -> int:
    """``--merge DIR,DIR,...``: one report from runs of the same setting that each ran other seeds
    (e.g. one process per seed): per-seed results and step times pooled, gradient fidelity and
    the equal wall-clock runs kept from whichever part has them."""
    from .quality_merge import load_parts

    parts = load_parts([d.strip() for d in args.merge.split(",") if d.strip()])  # all checked before --out is made
    out.mkdir(parents=True, exist_ok=True)
    per_seed, step_s, times, fidelity, eq = {}, {}, {}, {}, None
    for n, p in enumerate(parts):
        for v, runs in p["per_seed"].items():
            per_seed.setdefault(v, {}).update({int(s): r for s, r in runs.items()})
        for v, xs in p["step_s"].items():
            step_s.setdefault(v, []).extend(xs)
        times.update({f"part{n}_{k}": t for k, t in p["times"].items()})
        fidelity = fidelity or p["gradient_fidelity"]
        if p["equal_wall"]:  # each part measured its own step-time ratio: keep every part's steps
            eq = eq or {**p["equal_wall"], "steps_by_seed": {}}
            eq["steps_by_seed"].update({str(sd): p["equal_wall"]["steps"] for sd in p["seeds"]})
    seeds = sorted({s for runs in per_seed.values() for s in runs})
    commands = [c for p in parts for c in p["commands"]] + [this_command()]
    write(out, results_dict(parts[0]["setting"], seeds, per_seed, step_s, fidelity, times, parts[0]["facts"], eq,
                            commands))
    print((out / "results.md").read_text())
    return 0
