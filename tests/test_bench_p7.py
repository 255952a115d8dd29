"""P7's probe runs: stage 1 in a fresh process per corpus size, peak RSS read from /proc."""

import sys

import pytest

from bench import p7

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_p7_reports_a_peak_per_corpus_size():
    out = p7.run(tokens=4000, sizes=(1, 3))
    sizes = [c["size"] for c in out["curve"]]
    assert sizes == ["1N", "3N"]
    small, large = out["curve"]
    assert 2.5 * small["tokens"] < large["tokens"] < 3.5 * small["tokens"]
    assert 100 < small["peak_mb"] and out["ratio"]["median"] == pytest.approx(large["peak_mb"] / small["peak_mb"])
    assert out["ratio"]["median"] < 1.15
