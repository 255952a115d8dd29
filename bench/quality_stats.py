"""Seed statistics for ``make quality``: mean and spread per variant, and which differences between
two variants are larger than their seed-to-seed noise.

How a difference is judged: the variants of one seed share the student's initialisation and the
data order, so the comparison is PAIRED by seed. For a metric x, ``d_s = f(x_a,s) - f(x_b,s)``
over the seeds s (f = log for perplexity, so d is a log-ratio; identity for ECE); the difference
is *larger than the spread* when ``|mean(d)| > t_{0.975, n-1} * sd(d) / sqrt(n)`` (a two-sided
paired t-test at 5%; n = 3 seeds needs |t| > 4.30). With fewer than 2 seeds nothing is judged.
"""

from __future__ import annotations

import math
import statistics

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% Student-t critical values by degrees of freedom (1.96 beyond 10 would understate)."""
METRICS = ("ppl", "bpb", "ece", "top1_agree", "kl_full")


def spread(values: list[float]) -> dict:
    """mean, sample standard deviation (0 for one value), min, max, n."""
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values), "n": len(values)}


def summarise(per_seed: dict[str, dict[int, dict]]) -> dict[str, dict[str, dict]]:
    """``{variant: {seed: metrics}}`` -> ``{variant: {metric: spread}}`` over the seeds it ran."""
    return {v: {m: spread([r[m] for r in runs.values()]) for m in METRICS if all(m in r for r in runs.values())}
            for v, runs in per_seed.items() if runs}


def paired(per_seed: dict[str, dict[int, dict]], a: str, b: str, metric: str) -> dict | None:
    """The paired difference of ``metric`` between variants ``a`` and ``b`` over their common seeds:
    ``d = log(a / b)`` for ppl, ``a - b`` otherwise; mean, standard error, t, and ``exceeds``
    (|t| above the 95% critical value). None with fewer than 2 common seeds."""
    seeds = sorted(set(per_seed.get(a, {})) & set(per_seed.get(b, {})))
    if len(seeds) < 2:
        return None
    f = math.log if metric == "ppl" else (lambda x: x)
    d = [f(per_seed[a][s][metric]) - f(per_seed[b][s][metric]) for s in seeds]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    se = sd / math.sqrt(len(d))
    t = mean / se if se > 0 else (math.inf if mean else 0.0)
    crit = T_975.get(len(d) - 1, 2.2)
    out = {"a": a, "b": b, "metric": metric, "seeds": seeds, "mean_diff": mean, "se": se, "t": t,
           "t_crit": crit, "exceeds": abs(t) > crit}
    if metric == "ppl":
        out["ratio"] = math.exp(mean)  # geometric mean of a / b over the seeds
        out["ratio_ci95"] = [math.exp(mean - crit * se), math.exp(mean + crit * se)]
    return out


def comparisons(per_seed: dict[str, dict[int, dict]], reference: str = "online", baseline: str = "none") -> list[dict]:
    """Every KD variant against online KD (ppl) and against CE (ppl, ECE), plus union vs topk_tail."""
    out = []
    for v in per_seed:
        if v in (reference, baseline, "teacher"):
            continue
        out += [paired(per_seed, v, reference, "ppl"), paired(per_seed, v, baseline, "ppl"),
                paired(per_seed, v, baseline, "ece")]
    out += [paired(per_seed, reference, baseline, "ppl"), paired(per_seed, reference, baseline, "ece"),
            paired(per_seed, "union", "topk_tail", "ppl")]
    return [c for c in out if c is not None]


def describe(c: dict) -> str:
    """One line: ``a vs b metric: difference (SE, t); larger than the spread / within it``."""
    verdict = "LARGER than the seed spread" if c["exceeds"] else "within the seed spread"
    if c["metric"] == "ppl":
        lo, hi = c["ratio_ci95"]
        what = f"ppl ratio {c['ratio']:.4f} (95% CI {lo:.4f}-{hi:.4f})"
    else:
        what = f"{c['metric']} diff {c['mean_diff']:+.4f} (SE {c['se']:.4f})"
    return f"{c['a']} vs {c['b']}: {what}, t = {c['t']:.2f} over {len(c['seeds'])} seeds: {verdict}"
