"""Seed statistics for ``make quality``: mean and spread per variant, and which differences between
two variants are larger than their seed-to-seed noise.

How a difference is judged: the variants of one seed share the student's initialisation and the
data order, so the comparison is PAIRED by seed. For a metric x, ``d_s = f(x_a,s) - f(x_b,s)``
over the seeds s (f = log for perplexity, so d is a log-ratio; identity for ECE); the difference
is *larger than the spread* when ``|mean(d)| > t_{0.975, n-1} * sd(d) / sqrt(n)`` (a two-sided
paired t-test at 5%; n = 3 seeds needs |t| > 4.30). With fewer than 2 seeds nothing is judged.

Which comparison the run tests is named before it runs (`PREREGISTERED`: the setting's default
mode against its online reference, on the setting's metric): that one gets a verdict against the
target ratio (`verdict`: pass / MISS / inconclusive with the CI, and `seeds_to_settle`). Every
other comparison is reported with its p-value and a Holm family-wise correction over all of them
(`holm`), so "larger than the spread" there means the Holm-adjusted p is below 5%.
"""

from __future__ import annotations

import math
import statistics

T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}
"""Two-sided 95% Student-t critical values by degrees of freedom (1.96 beyond 10 would understate)."""
METRICS = ("ppl", "bpb", "ece", "top1_agree", "kl_full")
RATIO_METRICS = ("ppl", "bpb")
"""Compared as log-ratios (a / b), the others as differences."""
PREREGISTERED = {"default": ("topk_sampled", "online", "ppl"), "dev": ("topk_sampled", "online", "ppl"),
                 "cross": ("mapped_sampled", "online_cross", "bpb")}
"""setting -> (the default offline mode, its online reference, the metric): the one comparison each
run tests against the target (the rest are exploratory, Holm-corrected)."""
TARGET_RATIO = 1.02


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 400):
        m2 = 2 * m
        for aa in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta ``I_x(a, b)``."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_pvalue(t: float, df: int) -> float:
    """Two-sided p-value of Student's t with ``df`` degrees of freedom: ``I_{df/(df+t^2)}(df/2, 1/2)``."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df: int, alpha: float = 0.05) -> float:
    """The two-sided critical value: ``t`` with ``t_pvalue(t, df) = alpha`` (bisection)."""
    lo, hi = 0.0, 1e4
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_pvalue(mid, df) > alpha else (lo, mid)
    return (lo + hi) / 2


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order:
    the i-th smallest p becomes ``max_{j <= i} min(1, (m - j) p_(j))`` (j from 0)."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    out, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(ci: tuple[float, float], target: float = TARGET_RATIO) -> str:
    """For a ratio a / b against ``a / b <= target``: ``pass`` when the whole CI is at or below it,
    ``MISS`` when the whole CI is above it, else ``inconclusive`` (the CI straddles it)."""
    if ci[1] <= target:
        return "pass"
    if ci[0] > target:
        return "MISS"
    return "inconclusive"


def seeds_to_settle(mean: float, sd: float, target_log: float, exact_up_to: int = 200) -> int | None:
    """Seeds a paired test would need for its 95% CI of the mean log-ratio to clear ``target_log``,
    if the seeds behave like these (this mean and sd): the least n >= 2 with
    ``t_{0.975, n-1} sd / sqrt(n) < |mean - target_log|`` (beyond ``exact_up_to`` seeds, the
    normal approximation ``(1.96 sd / gap)^2``). None when the mean sits exactly on the target."""
    gap = abs(mean - target_log)
    if gap == 0.0:
        return None
    for n in range(2, exact_up_to + 1):
        if t_critical(n - 1) * sd / math.sqrt(n) < gap:
            return n
    return math.ceil((1.96 * sd / gap) ** 2)


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
    f = math.log if metric in RATIO_METRICS else (lambda x: x)
    d = [f(per_seed[a][s][metric]) - f(per_seed[b][s][metric]) for s in seeds]
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    se = sd / math.sqrt(len(d))
    t = mean / se if se > 0 else (math.inf if mean else 0.0)
    crit = T_975.get(len(d) - 1, 2.2)
    out = {"a": a, "b": b, "metric": metric, "seeds": seeds, "mean_diff": mean, "sd": sd, "se": se, "t": t,
           "t_crit": crit, "exceeds": abs(t) > crit, "p": t_pvalue(t, len(d) - 1)}
    if metric in RATIO_METRICS:
        out["ratio"] = math.exp(mean)  # geometric mean of a / b over the seeds
        out["ratio_ci95"] = [math.exp(mean - crit * se), math.exp(mean + crit * se)]
    return out


def comparisons(per_seed: dict[str, dict[int, dict]], reference: str = "online", baseline: str = "none",
                metric: str = "ppl", skip: tuple[str, str] | None = None) -> list[dict]:
    """Every KD variant against the online reference (``metric``) and against CE (``metric``, ECE),
    plus union vs topk_tail; ``skip`` = the pre-registered (a, b) pair, tested on its own. Each
    carries ``p_holm``, Holm-adjusted over this family, and ``exceeds`` is judged on it."""
    out = []
    for v in per_seed:
        if v in (reference, baseline, "teacher"):
            continue
        if skip != (v, reference):
            out.append(paired(per_seed, v, reference, metric))
        out += [paired(per_seed, v, baseline, metric), paired(per_seed, v, baseline, "ece")]
    out += [paired(per_seed, reference, baseline, metric), paired(per_seed, reference, baseline, "ece"),
            paired(per_seed, "union", "topk_tail", metric)]
    out = [c for c in out if c is not None]
    for c, adj in zip(out, holm([c["p"] for c in out])):
        c["p_holm"], c["exceeds"] = adj, adj < 0.05
    return out


def preregistered(per_seed: dict[str, dict[int, dict]], setting: str, target: float = TARGET_RATIO) -> dict | None:
    """The setting's named comparison (`PREREGISTERED`) with its verdict against ``target`` and, when
    inconclusive, the seeds that would settle it. None when it did not run on >= 2 common seeds."""
    if setting not in PREREGISTERED:
        return None
    a, b, metric = PREREGISTERED[setting]
    c = paired(per_seed, a, b, metric)
    if c is None:
        return None
    c["target"] = target
    c["verdict"] = verdict(tuple(c["ratio_ci95"]), target)
    c["seeds_to_settle"] = (seeds_to_settle(c["mean_diff"], c["sd"], math.log(target))
                            if c["verdict"] == "inconclusive" else None)
    return c


def describe_preregistered(c: dict) -> str:
    lo, hi = c["ratio_ci95"]
    line = (f"Pre-registered: {c['a']} vs {c['b']} {c['metric']} ratio {c['ratio']:.4f} (95% CI {lo:.4f}-{hi:.4f}, "
            f"{len(c['seeds'])} seeds), target <= {c['target']}: {c['verdict']}")
    if c["verdict"] == "inconclusive":
        more = c["seeds_to_settle"]
        line += (f" (the CI straddles {c['target']}; " + (f"~{more} seeds with this mean and spread would settle it)"
                 if more else "the mean sits exactly on the target: no number of seeds settles it)"))
    return line + "."


def describe(c: dict) -> str:
    """One line: ``a vs b metric: difference (SE, t, p, Holm p); larger than the spread / within it``."""
    verdict_text = "LARGER than the seed spread" if c["exceeds"] else "within the seed spread"
    if "ratio" in c:
        lo, hi = c["ratio_ci95"]
        what = f"{c['metric']} ratio {c['ratio']:.4f} (95% CI {lo:.4f}-{hi:.4f})"
    else:
        what = f"{c['metric']} diff {c['mean_diff']:+.4f} (SE {c['se']:.4f})"
    p = f", p = {c['p']:.3g}" if "p" in c else ""
    holm_p = f", Holm p = {c['p_holm']:.3g}" if "p_holm" in c else ""
    return f"{c['a']} vs {c['b']}: {what}, t = {c['t']:.2f}{p}{holm_p} over {len(c['seeds'])} seeds: {verdict_text}"
