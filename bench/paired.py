"""Paired timing of two arms until the median ratio is pinned down.

``paired_ratio(a, b, margin)`` times ``a`` and ``b`` in alternating order (a b, b a, a b, ...),
one ratio ``t_a / t_b`` per pair, and keeps adding pairs until the 95% confidence interval of the
median ratio (distribution-free: the order statistics ``n/2 -+ 0.98 sqrt(n)``) is narrower than
``margin`` on each side, or ``max_pairs`` / ``max_s`` is reached. The result says which it was,
so a noisy figure is reported as noisy rather than as a pass or a fail. Beside the wall-clock
ratio it reports the ratio of process CPU time (all threads), which other jobs on a shared
machine disturb far less than wall time.
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Callable


def median_ci(values: list[float]) -> tuple[float, float]:
    """A ~95% confidence interval of the median of ``values`` from their order statistics."""
    s = sorted(values)
    n = len(s)
    half = 0.98 * math.sqrt(n)
    lo, hi = max(0, math.floor(n / 2 - half)), min(n - 1, math.ceil(n / 2 + half) - 1)
    return s[lo], s[hi]


def paired_ratio(a: Callable[[], object], b: Callable[[], object], margin: float, *, min_pairs: int = 6,
                 max_pairs: int = 40, max_s: float = 300.0) -> dict:
    """Ratios ``t_a / t_b`` over alternating pairs; see the module docstring."""
    ratios, cpu_ratios, ta, tb = [], [], [], []
    start = time.perf_counter()
    stop = "max_pairs"
    for i in range(max_pairs):
        pair, cpu = {}, {}
        for name, fn in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            t, c = time.perf_counter(), time.process_time()
            fn()
            pair[name], cpu[name] = time.perf_counter() - t, time.process_time() - c
        cpu_ratios.append(cpu["a"] / cpu["b"])
        ta.append(pair["a"])
        tb.append(pair["b"])
        ratios.append(pair["a"] / pair["b"])
        if len(ratios) >= min_pairs:
            lo, hi = median_ci(ratios)
            med = statistics.median(ratios)
            if med - lo < margin and hi - med < margin:
                stop = "ci_within_margin"
                break
        if time.perf_counter() - start > max_s:
            stop = "max_s"
            break
    lo, hi = median_ci(ratios)
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "n": len(ratios),
            "ci95": [lo, hi], "stopped": stop, "a_s": statistics.median(ta), "b_s": statistics.median(tb),
            "cpu_median": statistics.median(cpu_ratios), "cpu_ci95": list(median_ci(cpu_ratios))}
