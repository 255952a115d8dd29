"""Random-sampling KD (RS-KD): the stage-1 sampler, the cache's sample arrays, and the ``sampled``
loss, checked in float64 against the exact full-vocabulary KL: the loss value equals its
formula, and the mean of its gradient over many independent draws equals the exact gradient
within a tolerance derived from the estimator's own variance (and a biased estimator fails it)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import stage1_overrides, stage2_overrides
from pipeline.cache import logit_codec
from pipeline.cache import CacheReader
from pipeline.config import load_config
from pipeline.errors import ConfigError, FingerprintMismatch
from pipeline.cache.verify import verify_cache
from stage1_teacher_cache import sampling
from stage2_student_train import kd_modes, losses

F64 = torch.float64


def draws(logits: torch.Tensor, samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1's own sampler on ``logits`` [n, V]: (distinct ids, counts), each [n, samples]."""
    u = torch.rand(logits.shape[0], samples, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return sampling.unique_counts(sampling.draw(logits, torch.logsumexp(logits, -1), u))


def test_sampler_frequencies_match_the_teacher_distribution():
    g = torch.Generator().manual_seed(3)
    logits = (2.5 * torch.randn(1, 40, generator=g, dtype=F64)).expand(20000, 40).contiguous()
    ids, counts = draws(logits, 8, seed=11)
    freq = torch.zeros(40, dtype=F64).scatter_add_(0, ids.reshape(-1), counts.reshape(-1).to(F64)) / (20000 * 8)
    p = torch.softmax(logits[0], -1)
    sigma = (p * (1 - p) / (20000 * 8)).sqrt()
    assert ((freq - p).abs() <= 5 * sigma + 1e-12).all()
    assert (counts.sum(-1) == 8).all()
    assert ((counts > 0).sum(-1) <= 8).all()


def test_a_probability_zero_id_is_never_drawn_even_at_the_edges_of_u():
    """The largest uniform below 1 scales to exactly the CDF's total in fp32 (the old sampler then
    clamped the draw to id V-1, probability 0 here); u = 0 and a zero-probability first id, and a
    zero-probability id between two others, are the other flat steps of the CDF."""
    neg = float("-inf")
    logits = torch.tensor([[neg, 0.3, neg, -1.2, 0.7, neg, neg]] * 4, dtype=torch.float32)
    u_top = 1.0 - 2.0 ** -53  # the largest float64 below 1
    cdf = torch.cumsum(torch.softmax(logits[0], -1), -1)
    assert (torch.tensor(u_top, dtype=F64) * cdf[-1].double()).float() == cdf[-1]  # the edge is real
    u = torch.tensor([[u_top], [0.0], [float(cdf[1]) / float(cdf[-1])], [0.5]], dtype=F64)
    ids = sampling.draw(logits, torch.logsumexp(logits, -1), u)[:, 0]
    p = torch.softmax(logits[0], -1)
    assert (p[ids] > 0).all(), ids
    assert ids.tolist()[:2] == [4, 1]  # the top edge is the last id with mass; u = 0 the first
    many = torch.rand(20000, 8, generator=torch.Generator().manual_seed(0), dtype=F64)
    many[:, 0] = u_top
    drawn = sampling.draw(logits[:1].expand(20000, -1).contiguous(), torch.logsumexp(logits[:1], -1).expand(20000), many)
    assert (p[drawn] > 0).all()


def test_unique_counts_packs_distinct_ids_ascending_with_zero_padding():
    ids, counts = sampling.unique_counts(torch.tensor([[5, 2, 5, 9, 2, 5], [1, 1, 1, 1, 1, 1]]))
    assert ids.tolist() == [[2, 5, 9, 0, 0, 0], [1, 0, 0, 0, 0, 0]]
    assert counts.tolist() == [[2, 3, 1, 0, 0, 0], [6, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("with_table", [True, False])
def test_sample_codec_round_trips(with_table):
    rng = np.random.default_rng(5)
    vocab, shape, s = 3000, (4, 7), 12
    logits = torch.from_numpy(rng.standard_normal((int(np.prod(shape)), vocab)) * 3)
    ids, counts = draws(logits, s, seed=2)
    ids, counts = ids.numpy().reshape(*shape, s), counts.numpy().reshape(*shape, s).astype(np.uint8)
    table = rng.permutation(vocab).astype(np.int64) if with_table else None
    gaps, coded_counts = logit_codec.encode_samples(ids, counts, table)
    assert gaps.min() >= 0 and gaps.max() < vocab
    back = logit_codec.decode_samples(gaps, table)
    want = {(i, int(a), int(c)) for i, (ra, rc) in enumerate(zip(ids.reshape(-1, s), counts.reshape(-1, s)))
            for a, c in zip(ra, rc) if c}
    got = {(i, int(a), int(c)) for i, (ra, rc) in enumerate(zip(back.reshape(-1, s), coded_counts.reshape(-1, s)))
           for a, c in zip(ra, rc) if c}
    assert got == want
    assert (coded_counts.reshape(-1, s).sum(-1) == s).all()


# ---------------------------------------------------------------- the loss


def test_kd_sampled_value_is_its_formula():
    g = torch.Generator().manual_seed(7)
    z = torch.randn(6, 30, generator=g, dtype=F64)
    logp = torch.log_softmax(z, -1)
    ids, counts = draws(torch.randn(6, 30, generator=g, dtype=F64) * 2, 16, seed=1)
    got = losses.kd_sampled(logp.gather(-1, ids), counts)
    for n in range(6):
        want = sum((int(c) / 16) * (np.log(int(c) / 16) - float(logp[n, int(i)]))
                   for i, c in zip(ids[n], counts[n]) if c > 0)
        assert abs(float(got[n]) - want) <= 1e-12 * max(1.0, abs(want))


def test_kd_sampled_ignores_padding_and_refuses_other_temperatures():
    at = torch.tensor([[-1.0, float("-inf"), float("nan")]], dtype=F64, requires_grad=True)
    counts = torch.tensor([[4, 0, 0]])
    loss = losses.kd_sampled(at, counts)
    loss.sum().backward()
    assert float(loss) == pytest.approx(1.0) and torch.isfinite(at.grad).all() and at.grad[0, 1:].eq(0).all()
    with pytest.raises(ValueError, match="temperature 1"):
        losses.kd_sampled(at, counts, temperature=2.0)


def _gradient_error(estimator, seed: int, repeats: int = 4000, samples: int = 16, vocab: int = 40):
    """(|mean of the estimator's gradient - exact|, standard error of that mean) per logit, for a
    fresh random teacher/student pair, over ``repeats`` independent draws of ``samples`` tokens.
    The standard error is the RS-KD estimator's own: its gradient is ``s - c / N`` with
    ``Var(c_v / N) = p_v (1 - p_v) / N`` (multinomial counts), so the mean's is that over ``repeats``."""
    g = torch.Generator().manual_seed(seed)
    z_t = 2.0 * torch.randn(vocab, generator=g, dtype=F64)
    z_s = (1.5 * torch.randn(vocab, generator=g, dtype=F64)).expand(repeats, vocab).clone().requires_grad_(True)
    p = torch.softmax(z_t, -1)
    exact = torch.softmax(z_s[0].detach(), -1) - p  # d KL(p || softmax(z)) / dz
    logp = torch.log_softmax(z_s, -1)
    estimator(logp, z_t.expand(repeats, vocab).contiguous(), samples, seed).sum().backward()
    return (z_s.grad.mean(0) - exact).abs(), (p * (1 - p) / samples / repeats).sqrt()


def _sampled(logp, z_t, samples, seed):
    ids, counts = draws(z_t, samples, seed + 100)
    return losses.kd_sampled(logp.gather(-1, ids), counts)


def _renorm_topk(logp, z_t, samples, seed):
    ids = z_t.topk(samples // 2, -1).indices
    return losses.kd_topk_renorm(logp.gather(-1, ids), torch.log_softmax(z_t, -1).gather(-1, ids))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_sampled_gradient_is_unbiased_for_full_kl(seed):
    err, se = _gradient_error(_sampled, seed)
    # 40 logits, each within 5 standard errors (a false alarm has probability ~40 * 6e-7).
    assert (err <= 5 * se + 1e-12).all(), float((err / (se + 1e-300)).max())


def test_the_unbiasedness_check_catches_a_biased_estimator():
    err, se = _gradient_error(_renorm_topk, 0)
    assert not (err <= 5 * se + 1e-12).all()  # the top-k renormalised gradient is biased: the test has power


def test_sampled_mode_is_checked_against_the_cache_and_the_temperature():
    args = dict(same_tokenizer=True, teacher={}, cache_dir="c")
    assert kd_modes.check("sampled", cache_has={"topk", "samples"}, **args).name == "sampled"
    with pytest.raises(ConfigError, match="cache.samples"):
        kd_modes.check("sampled", cache_has={"topk"}, **args)
    with pytest.raises(ConfigError, match="temperature 1"):
        kd_modes.check("sampled", cache_has={"topk", "samples"}, temperatures=(2.0,), **args)
    with pytest.raises(ConfigError, match="tokenizer"):
        kd_modes.check("sampled", cache_has={"topk", "samples"}, **{**args, "same_tokenizer": False})


# ---------------------------------------------------------------- stage 1 and stage 2 with a sampled cache


def test_stage1_stores_samples_covered_by_the_commit_markers(sampled_cache, tmp_path):
    reader = CacheReader(sampled_cache)
    assert reader.spec.samples == 12 and reader.fingerprint["samples"] == 12
    got = reader.read_range(0, len(reader), ("draw_ids", "draw_counts", "input_ids"))
    assert got["draw_ids"].shape == got["input_ids"].shape + (12,)
    assert (got["draw_counts"].astype(int).sum(-1) == 12).all()
    assert got["draw_ids"].max() < reader.spec.vocab_size
    info = reader.info()
    assert info["samples_unique_mean"] > 1 and info["samples_bytes_per_token"] > 0
    marker = json.loads((sampled_cache / "done" / "shard-00000.json").read_text())
    files = [f for f in marker["files"] if "/draw_" in f]
    assert {f.split("/")[1] for f in files} == {"draw_gaps", "draw_counts"}
    assert verify_cache(sampled_cache).ok
    import shutil
    damaged = tmp_path / "damaged"
    shutil.copytree(sampled_cache, damaged)
    path = damaged / next(f for f in files if "draw_gaps" in f)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    report = verify_cache(damaged)
    assert not report.ok and "draw_gaps" in report.damaged[0]


@pytest.mark.slow  # runs stage 1 again (another batching) and a refused rerun
def test_samples_do_not_depend_on_batching_and_are_fingerprinted(sampled_cache, tiny_teacher_dir, corpus_dir,
                                                                  tmp_path):
    from stage1_teacher_cache.run import cache_teacher

    other = tmp_path / "other"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, other, **{
        "cache.samples": 12, "cache.topk_encoding": "sqrt8", "teacher.batch_size": 3,
        "teacher.logits_chunk": 23})), show_progress=False)
    a, b = CacheReader(sampled_cache), CacheReader(other)
    names = ("draw_ids", "draw_counts")
    ra, rb = a.read_range(0, len(a), names), b.read_range(0, len(b), names)
    same = (ra["draw_ids"] == rb["draw_ids"]) | (ra["draw_counts"] == 0)
    assert same.mean() > 0.999 and (ra["draw_counts"] == rb["draw_counts"]).mean() > 0.999
    with pytest.raises(FingerprintMismatch, match="samples"):
        cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, other, **{
            "cache.samples": 8, "cache.topk_encoding": "sqrt8"})), show_progress=False)


@pytest.mark.slow  # trains students
def test_sampled_mode_trains_and_refuses_what_it_cannot_do(sampled_cache, tiny_cache, tmp_path):
    from stage2_student_train.train import train

    out = train(load_config(None, stage2_overrides(sampled_cache, tmp_path, "s", **{
        "kd.mode": "sampled", "train.steps": 3})), show_progress=False)
    recs = [json.loads(x) for x in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert out["step"] == 3 and all(r["kd"] > 0 for r in recs if "split" not in r)
    with pytest.raises(ConfigError, match="cache.samples"):
        train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "n", **{"kd.mode": "sampled"})),
              show_progress=False)
    with pytest.raises(ConfigError, match="temperature 1"):
        train(load_config(None, stage2_overrides(sampled_cache, tmp_path, "t", **{
            "kd.mode": "sampled", "kd.temperature": 2.0})), show_progress=False)


# ---------------------------------------------------------------- topk_sampled: exact top-k + sampled tail


def _topk_sampled_grads(seed: int, estimator: str, repeats: int = 4000, samples: int = 16, vocab: int = 40, k: int = 5):
    """Per-repeat gradients [repeats, V] of ``estimator`` w.r.t. the student's logits, and the exact
    full-KL gradient [V], for a fresh teacher/student pair (draws through stage 1's own sampler)."""
    g = torch.Generator().manual_seed(seed)
    z_t = 2.0 * torch.randn(vocab, generator=g, dtype=F64)
    z_s = (1.5 * torch.randn(vocab, generator=g, dtype=F64)).expand(repeats, vocab).clone().requires_grad_(True)
    p = torch.softmax(z_t, -1)
    logp = torch.log_softmax(z_s, -1)
    top = p.topk(k).indices.expand(repeats, k)
    t_lp = p.log()[top]
    t_tail = torch.log(p.sum() - p[top[0]].sum()).expand(repeats)
    at = logp.gather(-1, top)
    if estimator == "topk_sampled":
        ids, counts = draws(z_t.expand(repeats, vocab).contiguous(), samples, seed + 100)
        loss = losses.kd_topk_sampled(at, t_lp, top, logp.gather(-1, ids), ids, counts, teacher_log_tail=t_tail)
    else:
        loss = losses.kd_topk_tail(at, t_lp, teacher_log_tail=t_tail)
    loss.sum().backward()
    return z_s.grad, torch.softmax(z_s[0].detach(), -1) - p, p


@pytest.mark.parametrize("seed", [0, 1])
def test_kd_topk_sampled_gradient_is_unbiased_for_full_kl_and_the_tail_bucket_is_not(seed):
    grads, exact, p = _topk_sampled_grads(seed, "topk_sampled")
    # The empirical standard error, floored by RS-KD's own (an id too rare to be drawn in any
    # repeat shows an empirical spread of 0 and an error of its p).
    se = torch.maximum(grads.std(0), (p * (1 - p) / 16).sqrt()) / grads.shape[0] ** 0.5
    err = (grads.mean(0) - exact).abs()
    assert (err <= 5 * se + 1e-12).all(), float((err / (se + 1e-300)).max())
    bucket, _, _ = _topk_sampled_grads(seed, "topk_tail")
    assert not ((bucket.mean(0) - exact).abs() <= 5 * se + 1e-12).all()  # same check, the biased one fails


def test_kd_topk_sampled_value_is_its_formula_and_has_no_tail_term_without_outside_draws():
    g = torch.Generator().manual_seed(9)
    p = torch.softmax(2 * torch.randn(3, 12, generator=g, dtype=F64), -1)
    logp = torch.log_softmax(torch.randn(3, 12, generator=g, dtype=F64), -1)
    top = p.topk(4, -1).indices
    ids = torch.tensor([[top[0, 0], 7, 9, 0], [top[1, 1], top[1, 2], 0, 0], [1, 2, 3, 4]])
    counts = torch.tensor([[3, 2, 5, 0], [6, 4, 0, 0], [1, 1, 1, 1]])
    ids[2] = torch.tensor([v for v in range(12) if v not in top[2].tolist()][:4])
    t_tail = torch.log(1 - p.gather(-1, top).sum(-1))
    got = losses.kd_topk_sampled(logp.gather(-1, top), p.log().gather(-1, top), top, logp.gather(-1, ids), ids,
                                 counts, teacher_log_tail=t_tail)
    for n in range(3):
        want = sum(float(p[n, v] * (p[n, v].log() - logp[n, v])) for v in top[n].tolist())
        tail = 1 - float(p[n, top[n]].sum())
        draws_n = int(counts[n].sum())
        hit = 1 - (1 - tail) ** draws_n
        out = [(int(i), int(c)) for i, c in zip(ids[n], counts[n]) if c > 0 and int(i) not in top[n].tolist()]
        c_out = sum(c for _, c in out)  # row 1: every draw in the top-k -> no tail term
        want += sum(tail * c / c_out / hit * (np.log(tail * c / c_out / hit) - float(logp[n, i])) for i, c in out)
        assert abs(float(got[n]) - want) <= 1e-12 * max(1.0, abs(want)), n
    assert kd_modes.check("topk_sampled", same_tokenizer=True, cache_has={"topk", "samples"}, teacher={},
                          cache_dir="c").needs == {"topk", "samples"}


def multisets(vocab: int, draws: int):
    """Every count vector of ``draws`` draws over ``vocab`` ids, as (distinct ids, counts) padded to
    ``draws`` columns [M, draws], with its multinomial coefficient ``N! / prod c!`` [M]."""
    from itertools import combinations_with_replacement
    from math import factorial

    rows_ids, rows_counts, coef = [], [], []
    for combo in combinations_with_replacement(range(vocab), draws):
        c = np.bincount(combo, minlength=vocab)
        ids = np.flatnonzero(c)
        rows_ids.append(np.pad(ids, (0, draws - len(ids))))
        rows_counts.append(np.pad(c[ids], (0, draws - len(ids))))
        coef.append(factorial(draws) / np.prod([factorial(int(x)) for x in c]))
    return torch.tensor(np.array(rows_ids)), torch.tensor(np.array(rows_counts)), torch.tensor(coef, dtype=F64)


def exact_expected_gradient(estimator, p: torch.Tensor, z_s: torch.Tensor, draws: int) -> torch.Tensor:
    """``E[d loss / d z]`` [V] over every multiset of ``draws`` draws from ``p`` (float64, exact)."""
    ids, counts, coef = multisets(len(p), draws)
    prob = coef * (p[ids] ** counts * (counts > 0) + (counts == 0)).prod(-1)
    assert abs(float(prob.sum()) - 1) < 1e-12
    z = z_s.expand(len(ids), -1).clone().requires_grad_(True)
    estimator(torch.log_softmax(z, -1), ids, counts).sum().backward()
    return (prob[:, None] * z.grad).sum(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kd_topk_sampled_expected_gradient_is_exactly_full_kl_over_every_draw_multiset(seed):
    """Exact expectation (no Monte Carlo): every multiset of N = 4 draws over V = 7 ids, with a top-2
    and a tail of mass ~0.1-0.5 (so every draw lands in the top-k with probability (1 - T)^4, far
    from 0). The old estimator (one tail bucket when C_out = 0) fails by ~(1 - T)^N |p_v - T s_v / S|."""
    g = torch.Generator().manual_seed(seed)
    vocab, k, draws = 7, 2, 4
    p = torch.softmax(1.2 * torch.randn(vocab, generator=g, dtype=F64), -1)
    z_s = torch.randn(vocab, generator=g, dtype=F64)
    top = p.topk(k).indices
    t_tail = torch.log(1 - p[top].sum())

    def estimator(logp, ids, counts):
        n = len(ids)
        return losses.kd_topk_sampled(logp[:, top], p.log()[top].expand(n, k), top.expand(n, k),
                                      logp.gather(-1, ids), ids, counts, teacher_log_tail=t_tail.expand(n))

    expected = exact_expected_gradient(estimator, p, z_s, draws)
    exact = torch.softmax(z_s, -1) - p
    assert torch.allclose(expected, exact, rtol=0, atol=1e-12), (expected - exact).abs().max()
