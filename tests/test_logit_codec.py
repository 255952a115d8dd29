"""The sqrt8 codec's decoding rule and its fidelity at temperature, through the real encode/decode.

Teachers are synthetic but LM-like: Zipf-shaped sorted probabilities p_r ~ r^-alpha with noise,
k = 64 over a 4096-token vocabulary (flat, peaked, near one-hot). The loss a perfect student pays
is computed by the real KD loss (`kd_topk_tail`) and compared with the codec's own statement of
it (`tempered_bucket_kl`)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache import logit_codec as codec
from stage2_student_train import losses

V, K, ROWS = 4096, 64, 96
M = codec.SQRT_LEVELS


def teacher(seed: int, alpha: float, boost: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids [R, K], exact top-k log-probs [R, K] by descending p, exact log-tails [R]), float64."""
    rng = np.random.default_rng(seed)
    z = -alpha * np.log(np.arange(1, V + 1)) + 0.3 * rng.standard_normal((ROWS, V))
    z[:, 0] += boost
    lp = z - np.logaddexp.reduce(z, axis=-1, keepdims=True)
    order = np.argsort(-lp, axis=-1)
    perm = np.stack([rng.permutation(V) for _ in range(ROWS)])  # ids unrelated to rank
    ids = np.take_along_axis(perm, order, -1)
    lp = np.take_along_axis(lp, order, -1)
    return ids[:, :K], lp[:, :K], np.logaddexp.reduce(lp[:, K:], axis=-1)


TEACHERS = {"flat": (1, 1.1, 0.0), "peaked": (2, 3.0, 0.0), "one-hot": (3, 2.0, 15.0)}


def through_codec(ids, lp, code0=None):
    """encode -> decode_with_tail with a rank table from these rows; exact values aligned to the
    decoded order."""
    counts = np.bincount(ids.ravel(), minlength=V)
    rank_to_id = codec.rank_table(counts)
    gaps, codes, tail = codec.encode(ids, lp.astype(np.float32), rank_to_id)
    d_ids, d_lp, d_tail = codec.decode_with_tail(gaps, codes, tail, rank_to_id, code0=code0)
    aligned = np.stack([lp[r][np.argsort(ids[r])][np.searchsorted(np.sort(ids[r]), d_ids[r])] for r in range(len(ids))])
    return d_ids, d_lp, d_tail, aligned


def perfect_student_loss(d_lp, d_tail, exact_lp, exact_tail, tau):
    """kd_topk_tail with the decoded teacher as target and a student equal to the exact teacher."""
    t = torch.from_numpy
    return losses.kd_topk_tail(t(exact_lp), t(d_lp.astype(np.float64)), tau, teacher_log_tail=t(d_tail),
                               student_log_tail=t(exact_tail)).numpy()


def old_rule_loss(lp, log_tail, tau):
    """The decoding before this change (bin centres, code 0 -> a quarter step), same codes."""
    p = np.exp(np.concatenate([lp, log_tail[:, None]], -1))
    c = np.rint(np.sqrt(p) * M)
    q = (np.where(c == 0, 0.25, c) / M) ** 2
    q /= q.sum(-1, keepdims=True)
    return codec.tempered_bucket_kl(lp, np.log(q[:, :-1]), tau, log_tail, np.log(q[:, -1]))


def test_code0_decodes_to_the_mean_p_of_its_bin_and_the_others_to_their_centre():
    codes = np.arange(M + 1)
    values, tail = codec.dequantize(codes, codes, M)
    assert np.array_equal(values, tail)
    u = (np.arange(200_000) + 0.5) / 200_000 * (0.5 / M)  # sqrt(p) uniform on code 0's bin
    assert values[0] == pytest.approx((u ** 2).mean(), rel=1e-8)
    np.testing.assert_allclose(values[1:], (codes[1:] / M) ** 2, rtol=1e-15)
    assert np.all(np.rint(np.sqrt(values) * M) == codes)  # every value re-encodes to its code
    table = np.log([1e-9, 2e-6, 3e-10])
    v, t = codec.dequantize(np.array([[0, 5], [0, 5]]), np.array([0, 3]), M, table)
    assert v[0, 0] == pytest.approx(1e-9) and v[1, 0] == pytest.approx(2e-6) and v[0, 1] == values[5]
    assert t[0] == pytest.approx(3e-10) and t[1] == values[3]


@pytest.mark.parametrize("name", list(TEACHERS))
def test_decoded_tail_is_the_explicit_tail_and_matches_the_writers_roundtrip(name):
    ids, lp, lt = teacher(*TEACHERS[name])
    d_ids, d_lp, d_tail, exact = through_codec(ids, lp)
    assert np.array_equal(np.sort(d_ids, -1), np.sort(ids, -1))
    total = np.exp(d_lp.astype(np.float64)).sum(-1) + np.exp(d_tail)
    np.testing.assert_allclose(total, 1.0, rtol=1e-6)
    # the writer's statistics (roundtrip) see exactly what readers decode
    r_lp, r_tail = codec.roundtrip_with_tail(exact)
    np.testing.assert_allclose(np.sort(r_lp, -1), np.sort(d_lp.astype(np.float64), -1), rtol=1e-6)
    np.testing.assert_allclose(r_tail, d_tail, rtol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("name", list(TEACHERS))
def test_fidelity_states_the_loss_a_perfect_student_pays(name, tau):
    ids, lp, lt = teacher(*TEACHERS[name])
    _, d_lp, d_tail, exact = through_codec(ids, lp)
    paid = perfect_student_loss(d_lp, d_tail, exact, lt, tau)
    stated = codec.tempered_bucket_kl(exact, d_lp, tau, lt, d_tail)
    np.testing.assert_allclose(stated, paid, rtol=1e-9, atol=1e-15)
    assert (paid > 0).all()
    other = codec.tempered_bucket_kl(exact, d_lp, tau, lt, d_tail, direction="exact")
    assert not np.allclose(other, paid, rtol=1e-3)  # the two directions are different numbers
    if tau == 1.0:  # bucket_kl (the writer's tau = 1 statistic) is the "exact" direction
        np.testing.assert_allclose(codec.bucket_kl(exact, d_lp), other, rtol=1e-3, atol=1e-9)


@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_expected_value_decoding_beats_the_quarter_step_on_peaked_teachers(tau):
    ids, lp, lt = teacher(*TEACHERS["peaked"])
    _, d_lp, d_tail, exact = through_codec(ids, lp)
    new = perfect_student_loss(d_lp, d_tail, exact, lt, tau).mean()
    old = old_rule_loss(lp, lt, tau).mean()
    assert new < old


@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
@pytest.mark.parametrize("name", list(TEACHERS))
def test_a_measured_code0_table_helps_and_is_the_minimiser(name, tau):
    ids, lp, lt = teacher(*TEACHERS[name])
    table = codec.code0_table(lp, log_tail=lt)
    _, d_lp, d_tail, exact = through_codec(ids, lp, table)
    with_table = perfect_student_loss(d_lp, d_tail, exact, lt, tau).mean()
    _, d_lp0, d_tail0, _ = through_codec(ids, lp)
    default = perfect_student_loss(d_lp0, d_tail0, exact, lt, tau).mean()
    old = old_rule_loss(lp, lt, tau).mean()
    assert with_table <= default * (1 + 1e-6) and with_table <= old * (1 + 1e-6)  # (fp32 encode input)
    if name == "one-hot" and tau > 1:
        assert with_table < old / 10
    # moving the measured values away in either direction costs more (where code 0 occurs)
    if np.isfinite(table).all() and tau > 1 and name != "flat":
        for f in (-1.0, 1.0):
            _, d_lp1, d_tail1, _ = through_codec(ids, lp, table + f)
            assert perfect_student_loss(d_lp1, d_tail1, exact, lt, tau).mean() > with_table


@pytest.mark.xfail(strict=True, reason="sqrt8 at M=160 cannot reach 1e-4 at tau=2: the nonzero codes' own "
                                        "quantisation costs ~4e-3 on real teachers (docs/loss-math.md); "
                                        "needs a format change")
def test_issue_target_perfect_student_below_1e4_at_tau2():
    for name in ("flat", "peaked"):
        ids, lp, lt = teacher(*TEACHERS[name])
        _, d_lp, d_tail, exact = through_codec(ids, lp, codec.code0_table(lp, log_tail=lt))
        assert perfect_student_loss(d_lp, d_tail, exact, lt, 2.0).mean() < 1e-4
