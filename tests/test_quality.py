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
    assert set(READS) == {"none", "topk_tail", "topk_renorm", "union", "sampled", "topk_sampled", "online", "mapped",
                          "mapped_sampled", "projected", "uld", "chunk_likelihood", "online_cross"}
    args = build_parser().parse_args(["quality", "--setting", "dev", "--seeds", "0,1,2"])
    assert (args.setting, args.seeds) == ("dev", "0,1,2")


def test_every_variant_and_setting_is_a_valid_config():
    """Each variant's KD keys load (and pass the KD-mode registry's divergence check) in each setting."""
    from argparse import Namespace

    from bench.quality import SETTINGS, VARIANTS, variant_config
    from stage2_student_train import kd_modes

    for setting in SETTINGS:
        args = Namespace(config="configs/default.toml", overrides=[], setting=setting)
        for name in [*VARIANTS, "online"]:
            cfg = variant_config(args, name, seed=2)
            assert cfg.run.seed == 2 and cfg.train.eval_every == cfg.train.steps
            mode = kd_modes.get(cfg.kd.mode)
            assert mode.loss is None or cfg.kd.divergence in mode.divergences
        assert variant_config(args, "union_jsd", 0).kd.divergence == "jsd"
        assert variant_config(args, "topk_tail", 0, steps=7).train.steps == 7


def test_paired_differences_flag_only_what_exceeds_the_seed_noise():
    from bench.quality_stats import paired, summarise

    runs = {"a": {0: {"ppl": 100.0, "ece": 0.03}, 1: {"ppl": 130.0, "ece": 0.02}, 2: {"ppl": 90.0, "ece": 0.04}},
            "b": {0: {"ppl": 104.0, "ece": 0.03}, 1: {"ppl": 135.2, "ece": 0.05}, 2: {"ppl": 93.6, "ece": 0.01}}}
    s = summarise(runs)["a"]["ppl"]
    assert abs(s["mean"] - 320 / 3) < 1e-9 and abs(s["sd"] - np.std([100, 130, 90], ddof=1)) < 1e-9
    c = paired(runs, "b", "a", "ppl")  # b = 1.04 a on every seed: tiny next to the 20% seed spread, but paired
    assert c["exceeds"] and abs(c["ratio"] - 1.04) < 1e-9 and c["se"] < 1e-12
    e = paired(runs, "b", "a", "ece")  # +0, +0.03, -0.03: no consistent difference
    assert not e["exceeds"] and abs(e["mean_diff"]) < 1e-12
    assert paired({"a": {0: {"ppl": 1.0}}, "b": {0: {"ppl": 2.0}}}, "a", "b", "ppl") is None  # one seed: no verdict


def test_fidelity_only_needs_a_finished_run_and_says_so_in_one_line(tmp_path, capsys):
    from pipeline.cli import main

    assert main(["quality", "--fidelity-only", "--out", str(tmp_path / "nothing-here")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "results.json does not exist" in err[0] and "--out" in err[0]
    assert not (tmp_path / "nothing-here").exists()


def test_q1_passes_only_when_the_whole_confidence_interval_is_within_the_bound():
    from bench.quality_report import q1_verdict

    def targets(mean, ci):
        return {"q1_ratio_of_means": mean, "q1_paired": None if ci is None else {"ratio_ci95": ci}}

    assert q1_verdict(targets(0.99, (0.97, 1.01))) == "pass"
    assert q1_verdict(targets(1.019, (0.90, 1.15))) == "inconclusive (95% CI 0.900-1.150 straddles 1.02)"
    assert q1_verdict(targets(1.019, None)) == "pass on the mean, one seed"
    assert q1_verdict(targets(1.03, (1.021, 1.05))) == "MISS"
    assert q1_verdict(targets(1.03, (1.01, 1.05))).startswith("inconclusive")


def test_t_distribution_p_values_and_critical_values_match_the_tables():
    from bench.quality_stats import T_975, t_critical, t_pvalue

    for df, crit in T_975.items():
        assert abs(t_pvalue(crit, df) - 0.05) < 2e-4
        assert abs(t_critical(df) - crit) < 2e-3
    assert abs(t_pvalue(1.0, 1) - 0.5) < 1e-12  # Cauchy: P(|t| > 1) = 1/2
    assert t_pvalue(0.0, 3) == 1.0 and t_pvalue(float("inf"), 3) == 0.0
    assert abs(t_pvalue(2.0, 10_000) - 0.0455) < 1e-3  # the normal limit


def test_holm_adjusts_step_down_and_keeps_the_order():
    from bench.quality_stats import holm

    assert holm([0.01, 0.04, 0.03, 0.2]) == [0.04, 0.09, 0.09, 0.2]
    assert holm([0.5]) == [0.5] and holm([]) == []
    assert np.allclose(holm([0.3, 0.3, 0.3]), [0.9, 0.9, 0.9]) and holm([0.6, 0.01]) == [0.6, 0.02]


def test_preregistered_comparison_is_inconclusive_when_its_ci_straddles_the_target_and_says_how_many_seeds():
    import math

    from bench.quality_stats import (comparisons, describe_preregistered, preregistered, seeds_to_settle,
                                     t_critical)

    ratios = [1.00, 1.03, 0.995]  # mean ~1.008: inside 1.02, but 3 seeds spread too much to confirm it
    runs = {"online": {s: {"ppl": 100.0, "ece": 0.03} for s in range(3)},
            "topk_sampled": {s: {"ppl": 100.0 * r, "ece": 0.03 + 0.001 * s} for s, r in enumerate(ratios)},
            "none": {s: {"ppl": 150.0 + s, "ece": 0.02} for s in range(3)}}
    c = preregistered(runs, "default")
    assert (c["a"], c["b"], c["metric"]) == ("topk_sampled", "online", "ppl")
    assert c["verdict"] == "inconclusive" and c["ratio_ci95"][0] < 1.02 < c["ratio_ci95"][1]
    n = c["seeds_to_settle"]
    gap = abs(c["mean_diff"] - math.log(1.02))
    assert t_critical(n - 1) * c["sd"] / math.sqrt(n) < gap <= t_critical(n - 2) * c["sd"] / math.sqrt(n - 1)
    assert "inconclusive" in describe_preregistered(c) and f"~{n} seeds" in describe_preregistered(c)
    assert seeds_to_settle(0.0, 0.01, 0.0) is None
    family = comparisons(runs, skip=("topk_sampled", "online"))
    assert not any(f["a"] == "topk_sampled" and f["b"] == "online" for f in family)  # tested on its own
    assert all(f["p_holm"] >= f["p"] and f["exceeds"] == (f["p_holm"] < 0.05) for f in family)
    cross = {"online_cross": {s: {"bpb": 2.0} for s in range(3)},
             "mapped_sampled": {s: {"bpb": 2.0 * (1.05 + 0.001 * s)} for s in range(3)}}
    c = preregistered(cross, "cross")
    assert c["metric"] == "bpb" and c["verdict"] == "MISS" and abs(c["ratio"] - 1.051) < 1e-3
