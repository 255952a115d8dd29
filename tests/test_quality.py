"""``make quality``'s own arithmetic (the full run is measured, not tested: ~25 min)."""

import numpy as np

from bench.quality import READS, ece
from pipeline.cli import COMMANDS, build_parser


def test_ece_is_zero_when_calibrated_and_the_gap_when_not():
    rng = np.random.default_rng(0)
    conf = rng.uniform(0, 1, 200_000)
    assert ece(conf, rng.uniform(0, 1, conf.size) < conf) < 0.01
    assert abs(ece(np.full(1000, 0.9), np.arange(1000) < 600) - 0.3) < 1e-12
    assert abs(ece(np.array([0.95, 0.05]), np.array([True, True])) - (0.5 * 0.05 + 0.5 * 0.95)) < 1e-12


def test_quality_is_a_command_and_every_mode_says_what_it_reads():
    assert COMMANDS["quality"][0] == "bench.quality:main"
    args = build_parser().parse_args(["quality", "train.steps=5"])
    assert args.overrides == ["train.steps=5"]
    assert set(READS) == {"none", "topk_tail", "topk_renorm", "union", "sampled", "online"}
