"""bench/paired.py: the median's confidence interval and the stopping rule of paired timings."""

import time

from bench.paired import median_ci, paired_ratio


def test_median_ci_is_the_order_statistics_interval():
    assert median_ci(list(range(1, 11))) == (2, 9)  # n = 10: the 2nd and 9th of 10 (~95%)
    assert median_ci([5.0]) == (5.0, 5.0)
    lo, hi = median_ci([float(x) for x in range(100)])
    assert (lo, hi) == (40.0, 59.0)


def test_paired_ratio_stops_once_the_median_is_pinned_and_reports_when_it_is_not():
    calls = []
    fast = lambda: (calls.append("a"), time.sleep(0.002))  # noqa: E731
    slow = lambda: (calls.append("b"), time.sleep(0.02))  # noqa: E731
    pinned = paired_ratio(fast, slow, margin=0.5, min_pairs=4, max_pairs=30)
    assert pinned["stopped"] == "ci_within_margin" and pinned["n"] == 4 and pinned["median"] < 0.5
    assert calls[:4] == ["a", "b", "b", "a"]  # the order alternates pair by pair
    unpinned = paired_ratio(fast, slow, margin=1e-9, min_pairs=2, max_pairs=5)
    assert unpinned["stopped"] == "max_pairs" and unpinned["n"] == 5
