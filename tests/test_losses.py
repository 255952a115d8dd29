"""KD and CE losses against float64 references built differently: dense full-vocab softmaxes
computed by hand, folded into buckets by explicit per-row loops (tail = sum of the complement,
not 1 - sum), tempered as p^(1/tau) / sum, KL term by term. Values and gradients w.r.t. the
student logits, at tau = 1 and 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from stage2_student_train import losses

N, V, K, D, SK = 7, 50, 6, 8, 4
F64 = torch.float64
TAUS = [1.0, 2.0]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dense_probs(logits: torch.Tensor) -> torch.Tensor:
    """Softmax by hand (no log_softmax), float64."""
    e = torch.exp(logits - logits.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def bucket_kl_ref(p_t: torch.Tensor, p_s: torch.Tensor, id_rows: list[list[int]], tau: float,
                  tail: bool = True) -> torch.Tensor:
    """Per row: buckets = probs at the ids (+ the summed complement), tempered, KL(t || s) * tau^2."""
    out = []
    for n, ids in enumerate(id_rows):
        rest = [v for v in range(p_t.shape[-1]) if v not in set(ids)]
        qt = [p_t[n, i] for i in ids] + ([p_t[n, rest].sum()] if tail else [])
        qs = [p_s[n, i] for i in ids] + ([p_s[n, rest].sum()] if tail else [])
        qt = torch.stack(qt) ** (1.0 / tau)
        qs = torch.stack(qs) ** (1.0 / tau)
        qt, qs = qt / qt.sum(), qs / qs.sum()
        out.append(tau ** 2 * sum(qt[b] * (torch.log(qt[b]) - torch.log(qs[b])) for b in range(len(qt))))
    return torch.stack(out)


def make_inputs(seed: int, dtype=F64):
    g = gen(seed)
    z_s = (2.0 * torch.randn(N, V, generator=g, dtype=F64)).to(dtype).requires_grad_(True)
    z_t = 2.0 * torch.randn(N, V, generator=g, dtype=F64)
    t_ids = z_t.topk(K, dim=-1).indices
    t_logp = torch.log(dense_probs(z_t)).gather(-1, t_ids)
    return z_s, z_t, t_ids, t_logp


def grad(loss: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(loss.sum(), x, retain_graph=True)
    return g


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_manual_formula_and_torch(eps):
    g = gen(1)
    z = torch.randn(N, V, generator=g, dtype=F64, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    logp = torch.log_softmax(z, -1)
    got = losses.cross_entropy(logp.gather(-1, y[:, None])[:, 0], label_smoothing=eps, logp_mean=logp.mean(-1))
    p = dense_probs(z)
    ref = torch.stack([-(1 - eps) * torch.log(p[n, y[n]]) - eps / V * sum(torch.log(p[n, v]) for v in range(V))
                       for n in range(N)])
    assert got.shape == (N,)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(got, F.cross_entropy(z, y, label_smoothing=eps, reduction="none"), atol=1e-10, rtol=0)
    torch.testing.assert_close(grad(got, z), grad(ref, z), atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", TAUS)
def test_topk_tail_matches_dense_bucket_reference(tau):
    z_s, z_t, t_ids, t_logp = make_inputs(2)
    got = losses.kd_topk_tail((torch.log_softmax(z_s, -1)).gather(-1, t_ids), t_logp, tau)
    ref = bucket_kl_ref(dense_probs(z_t), dense_probs(z_s), t_ids.tolist(), tau)
    assert got.shape == (N,) and (ref > 1e-3).all()
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad(got, z_s), grad(ref, z_s), atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", TAUS)
def test_topk_renorm_matches_reference(tau):
    z_s, z_t, t_ids, t_logp = make_inputs(3)
    got = losses.kd_topk_renorm((torch.log_softmax(z_s, -1)).gather(-1, t_ids), t_logp, tau)
    # reference from the raw student logits at the ids (log Z cancels) and the teacher's dense probs
    ref = bucket_kl_ref(dense_probs(z_t), torch.exp(z_s), t_ids.tolist(), tau, tail=False)
    assert (ref > 1e-3).all()
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad(got, z_s), grad(ref, z_s), atol=1e-10, rtol=0)


def union_inputs(seed: int):
    g = gen(seed)
    hidden = torch.randn(N, D, generator=g, dtype=F64)
    head = torch.randn(V, D, generator=g, dtype=F64)
    z_t = hidden @ head.T
    logz = torch.log(torch.exp(z_t).sum(-1))
    t_ids = z_t.topk(K, dim=-1).indices
    return hidden, head, z_t, logz, t_ids


def union_rows(t_ids: torch.Tensor, z_s: torch.Tensor) -> list[list[int]]:
    rows = []
    for n in range(N):
        s_top = sorted(range(V), key=lambda v: -float(z_s[n, v].detach()))[:SK]
        rows.append(list(dict.fromkeys(t_ids[n].tolist() + s_top)))  # ordered set union
    return rows


@pytest.mark.parametrize("tau", TAUS)
def test_union_matches_dense_reference(tau):
    hidden, head, z_t, logz, t_ids = union_inputs(4)
    z_s = (2.0 * torch.randn(N, V, generator=gen(40), dtype=F64)).requires_grad_(True)
    rows = union_rows(t_ids, z_s)
    assert any(len(r) > K for r in rows) and any(len(r) < K + SK for r in rows)  # real union, real dedup
    got = losses.kd_union(torch.log_softmax(z_s, -1), hidden.requires_grad_(True), head.requires_grad_(True),
                          logz, t_ids, SK, tau)
    ref = bucket_kl_ref(dense_probs(z_t), dense_probs(z_s), rows, tau)
    assert (ref > 1e-3).all()
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad(got, z_s), grad(ref, z_s), atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", TAUS)
def test_union_with_student_topk_inside_teacher_set_equals_topk_tail(tau):
    hidden, head, z_t, logz, t_ids = union_inputs(5)
    z_s = torch.randn(N, V, generator=gen(50), dtype=F64)
    z_s = z_s.scatter_add(-1, t_ids, torch.full((N, K), 6.0, dtype=F64)).requires_grad_(True)
    logp = torch.log_softmax(z_s, -1)
    assert all(set(logp.topk(SK).indices[n].tolist()) <= set(t_ids[n].tolist()) for n in range(N))
    got = losses.kd_union(logp, hidden, head, logz, t_ids, SK, tau)
    t_logp = (z_t - logz[:, None]).gather(-1, t_ids)
    ref = bucket_kl_ref(dense_probs(z_t), dense_probs(z_s), t_ids.tolist(), tau)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(got, losses.kd_topk_tail(logp.gather(-1, t_ids), t_logp, tau), atol=1e-12, rtol=0)
    torch.testing.assert_close(grad(got, z_s), grad(ref, z_s), atol=1e-10, rtol=0)


@pytest.mark.parametrize("tau", TAUS)
def test_zero_iff_student_equals_teacher(tau):
    _, z_t, t_ids, t_logp = make_inputs(6)
    same = losses.kd_topk_tail((torch.log_softmax(z_t, -1)).gather(-1, t_ids), t_logp, tau)
    other = losses.kd_topk_tail((torch.log_softmax(z_t.flip(-1), -1)).gather(-1, t_ids), t_logp, tau)
    assert same.abs().max() < 1e-12 and (other > 1e-6).all()
    hidden, head, z_t, logz, t_ids = union_inputs(7)
    same = losses.kd_union(torch.log_softmax(z_t, -1), hidden, head, logz, t_ids, SK, tau)
    other = losses.kd_union(torch.log_softmax(z_t + torch.randn(N, V, generator=gen(70), dtype=F64), -1),
                            hidden, head, logz, t_ids, SK, tau)
    assert same.abs().max() < 1e-12 and (other > 1e-6).all()


def test_fp32_teacher_mass_above_one_stays_finite():
    g = gen(8)
    z_t = torch.randn(N, V, generator=g, dtype=F64)
    z_t[:, :K] += 25.0  # top-K hold all but ~1e-10 of the mass
    t_ids = torch.arange(K).expand(N, K).contiguous()
    t_logp = torch.log(dense_probs(z_t)[:, :K] * 1.0001)  # stored probs sum to ~1.0001
    assert (t_logp.exp().sum(-1) > 1.00005).all()
    z_s = torch.randn(N, V, generator=g).requires_grad_(True)
    logp = torch.log_softmax(z_s, -1)
    for tau in TAUS:
        loss = losses.kd_topk_tail(logp.gather(-1, t_ids), t_logp.float(), tau)
        assert loss.dtype == torch.float32 and torch.isfinite(loss).all() and (loss > 0).all()
        assert torch.isfinite(grad(loss, z_s)).all()
        # close to the loss against the same teacher with its true (tiny) tail
        ref = bucket_kl_ref(dense_probs(z_t), dense_probs(z_s.detach().double()), t_ids.tolist(), tau)
        torch.testing.assert_close(loss.double(), ref, atol=2e-3, rtol=0)


def test_fold_and_temper_helpers():
    g = gen(9)
    p = dense_probs(torch.randn(N, V, generator=g, dtype=F64))
    mask = torch.rand(N, K, generator=g) > 0.3
    mask[:, 0] = True
    b = losses.fold_with_tail(torch.log(p[:, :K]), mask)
    assert b.shape == (N, K + 1)
    kept = (p[:, :K] * mask).sum(-1)
    torch.testing.assert_close(b[:, -1].exp(), 1 - kept, atol=1e-12, rtol=0)
    assert torch.equal(b[:, :K].isinf(), ~mask)
    bm = torch.cat([mask, torch.ones(N, 1, dtype=torch.bool)], -1)
    t = losses.temper(b, 2.0, bm).exp()
    root = torch.where(bm, b.exp().sqrt(), torch.zeros_like(b))
    torch.testing.assert_close(t, root / root.sum(-1, keepdim=True), atol=1e-12, rtol=0)
    torch.testing.assert_close(losses.temper(b, 1.0, bm), b, atol=1e-12, rtol=0)
    # A sum at or above 1 (rounding) is an empty tail, not a floored one ...
    over = losses.fold_with_tail(torch.log(torch.full((1, 2), 0.5001, dtype=F64)))
    assert over[0, -1].item() == float("-inf")
    # ... and the student's floor acts on the TEMPERED tail: ~TAIL_FLOOR at every tau, not
    # TAIL_FLOOR ** (1 / tau) (1e-3 at tau = 4).
    for tau in (1.0, 2.0, 4.0):
        t = losses.temper(losses._floor_tail(over, tau), tau).exp()[0, -1].item()
        assert losses.TAIL_FLOOR / 3 < t <= losses.TAIL_FLOOR
        tiny = torch.log(torch.tensor([[0.5, 0.5 - 1e-40, 1e-40]], dtype=F64))  # a real tail is kept
        assert torch.equal(losses._floor_tail(tiny, tau), tiny)


def test_no_full_vocab_normalisation(monkeypatch):
    """The losses reuse the caller's log_softmax: nothing normalises over V again."""
    def guard(fn):
        def wrapped(x, *args, **kwargs):
            assert x.shape[-1] != V, f"{fn.__name__} over the full vocabulary"
            return fn(x, *args, **kwargs)
        return wrapped

    for mod, name in [(torch, "log_softmax"), (torch, "softmax"), (torch, "logsumexp"),
                      (F, "log_softmax"), (F, "softmax"), (torch.Tensor, "log_softmax"),
                      (torch.Tensor, "softmax"), (torch.Tensor, "logsumexp")]:
        monkeypatch.setattr(mod, name, guard(getattr(mod, name)))
    z_s, z_t, t_ids, t_logp = make_inputs(10)
    logp = z_s - z_s.exp().sum(-1, keepdim=True).log()
    hidden, head, _, logz, _ = union_inputs(10)
    # (the exact student tail, `losses.student_log_tail`, is the one deliberate full-vocabulary
    # pass, on confident rows only and only when asked for: not here)
    out = [losses.cross_entropy(logp.gather(-1, t_ids[:, :1])[:, 0], 0.1, logp.mean(-1)), losses.kd_topk_tail(logp.gather(-1, t_ids), t_logp, 2.0),
           losses.kd_topk_renorm(logp.gather(-1, t_ids), t_logp, 2.0),
           losses.kd_union(logp, hidden, head, logz, t_ids, SK, 2.0, exact_student_tail=False)]
    assert all(o.shape == (N,) and torch.isfinite(o).all() for o in out)
    with pytest.raises(AssertionError):  # the guard itself works
        torch.log_softmax(z_s, -1)


@pytest.mark.parametrize("tau", TAUS)
def test_mapped_matches_a_reference_built_in_the_teacher_vocabulary(tau):
    """Cross-tokenizer KD: teacher top-k ids go through a vocab map into a student vocabulary
    of another size; unmapped ids' mass joins the tail. The reference folds a dense teacher
    softmax (teacher vocab) and a dense student softmax (student vocab) by explicit loops."""
    g = gen(21)
    v_student = 37
    z_t = 2.0 * torch.randn(N, V, generator=g, dtype=F64)
    z_s = (2.0 * torch.randn(N, v_student, generator=g, dtype=F64)).requires_grad_(True)
    # An injective map (as byte-string identity is) from 30 teacher ids; the other 20 have no twin.
    vmap = torch.full((V,), -1, dtype=torch.long)
    vmap[torch.randperm(V, generator=g)[:30]] = torch.randperm(v_student, generator=g)[:30]
    t_ids = z_t.topk(K, dim=-1).indices
    p_t, p_s = dense_probs(z_t), dense_probs(z_s)
    mapped = vmap[t_ids]
    mask = mapped >= 0
    assert mask.any() and not mask.all()  # both kinds of ids occur
    t_logp = torch.log(p_t).gather(-1, t_ids)
    at_ids = torch.log_softmax(z_s, -1).gather(-1, mapped.clamp(min=0))
    got = losses.kd_mapped(at_ids, t_logp, mask, tau)
    ref = []
    for n in range(N):
        keep = [k for k in range(K) if mask[n, k]]
        qt = [p_t[n, t_ids[n, k]] for k in keep]
        qs = [p_s[n, mapped[n, k]] for k in keep]
        qt.append(1 - sum(qt) if qt else torch.tensor(1.0, dtype=F64))
        rest = [v for v in range(v_student) if v not in {int(mapped[n, k]) for k in keep}]
        qs.append(p_s[n, rest].sum())
        qt = torch.stack(qt) ** (1 / tau)
        qs = torch.stack(qs) ** (1 / tau)
        qt, qs = qt / qt.sum(), qs / qs.sum()
        ref.append(tau ** 2 * (qt * (qt.log() - qs.log())).sum())
    ref = torch.stack(ref)
    torch.testing.assert_close(got, ref, atol=1e-10, rtol=0)
    torch.testing.assert_close(grad(got, z_s), grad(ref, z_s), atol=1e-10, rtol=0)
    # A position whose ids all lack a twin contributes exactly 0.
    none = losses.kd_mapped(at_ids, t_logp, torch.zeros_like(mask), tau)
    assert torch.equal(none, torch.zeros_like(none))


# ---------------------------------------------------------------------------------------------
# Exactness for every K (1 .. V), teacher and student tails down to 1e-25, tau in {1, 2, 4}.

TAUS_ALL = [1.0, 2.0, 4.0]
KS = [1, 5, V - 1, V]


def tailed_logits(g: torch.Generator, k: int, tail: float | None, scale: float = 2.0) -> torch.Tensor:
    """[N, V] float64 logits whose top-k (a random id set per row) holds 1 - tail of the mass and
    the rest exactly ``tail`` (``None``: plain random logits, whatever their tail)."""
    z = scale * torch.randn(N, V, generator=g, dtype=F64)
    if tail is None or k == V:
        return z
    perm = torch.stack([torch.randperm(V, generator=g) for _ in range(N)])
    top, rest = perm[:, :k], perm[:, k:]
    lp = torch.empty(N, V, dtype=F64)
    lp.scatter_(-1, top, torch.log_softmax(z.gather(-1, top), -1) + math.log1p(-tail))
    lp.scatter_(-1, rest, torch.log_softmax(z.gather(-1, rest), -1) + math.log(tail))
    return lp


def ref_tail_kd(p_t: list, p_s: list, tau: float) -> torch.Tensor:
    """Explicit buckets (float64 scalars): temper b^(1/tau) / sum, KL term by term, skipping the
    teacher's empty buckets, times tau^2."""
    qt = torch.stack(p_t) ** (1.0 / tau)
    qs = torch.stack(p_s) ** (1.0 / tau)
    qt, qs = qt / qt.sum(), qs / qs.sum()
    return tau ** 2 * sum(qt[b] * (torch.log(qt[b]) - torch.log(qs[b])) for b in range(len(qt)) if qt[b] > 0)


def ref_rows(pt: torch.Tensor, ps: torch.Tensor, t_rows: list[list[int]], s_rows: list[list[int]], tau: float,
             tail: bool = True) -> torch.Tensor:
    """Per row: teacher buckets at t_rows ids (+ the summed teacher complement), student buckets at
    s_rows ids (+ the summed student complement). The tails are sums, never 1 - sum."""
    out = []
    for n in range(len(t_rows)):
        bt = [pt[n, i] for i in t_rows[n]]
        bs = [ps[n, i] for i in s_rows[n]]
        if tail:
            bt.append(pt[n, [v for v in range(pt.shape[1]) if v not in set(t_rows[n])]].sum())
            bs.append(ps[n, [v for v in range(ps.shape[1]) if v not in set(s_rows[n])]].sum())
        out.append(ref_tail_kd(bt, bs, tau))
    return torch.stack(out)


def students(g: torch.Generator, z_t: torch.Tensor, t_ids: torch.Tensor, k: int) -> dict[str, torch.Tensor]:
    """A random student, and one as confident as the teacher on its top-k but different there
    (tail 1e-20: the case where 1 - sum cancels)."""
    confident = tailed_logits(g, k, 1e-20)
    # move the confident student's top-k onto the teacher's ids (ids differ per row)
    perm = confident.argsort(-1, descending=True)
    z = torch.empty_like(confident)
    others = torch.stack([torch.tensor([v for v in range(V) if v not in set(t_ids[n].tolist())], dtype=torch.long)
                          for n in range(N)]) if k < V else None
    z.scatter_(-1, t_ids, confident.gather(-1, perm[:, :k]))
    if others is not None:
        z.scatter_(-1, others, confident.gather(-1, perm[:, k:]))
    return {"random": 2.0 * torch.randn(N, V, generator=g, dtype=F64), "confident": z}


def check(got: torch.Tensor, ref: torch.Tensor, z_s: torch.Tensor) -> None:
    assert got.dtype == F64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-15)
    gg, gr = grad(got, z_s), grad(ref, z_s)
    torch.testing.assert_close(gg, gr, rtol=1e-9, atol=1e-13 * float(gr.abs().max()) + 1e-300)


@pytest.mark.parametrize("tau", TAUS_ALL)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("t_tail", [None, 1e-12, 1e-25])
def test_tail_kd_losses_are_exact_for_any_k_tail_and_tau(k, t_tail, tau):
    """kd_topk_tail, kd_topk_renorm and kd_mapped against explicit float64 buckets, given the
    tails the caller can know exactly (a cached teacher log-tail; `student_log_tail`)."""
    g = gen(100 + k)
    z_t = tailed_logits(g, k, t_tail)
    lp_t = torch.log_softmax(z_t, -1)
    t_ids = z_t.topk(k, dim=-1).indices
    t_lp = lp_t.gather(-1, t_ids)
    t_log_tail = losses.complement_log_mass(lp_t, t_ids)
    pt = dense_probs(z_t)
    if t_tail is not None and k < V:
        torch.testing.assert_close(t_log_tail.exp(), torch.full((N,), t_tail, dtype=F64), rtol=1e-9, atol=0)
    # a vocab map sending 80% of the teacher ids to a permuted student vocab, the rest nowhere
    vmap = torch.randperm(V, generator=g)
    vmap[torch.randperm(V, generator=g)[: V // 5]] = -1
    mapped = vmap[t_ids]
    mmask = mapped >= 0
    for name, z0 in students(g, z_t, t_ids, k).items():
        z_s = z0.clone().requires_grad_(True)
        logp = torch.log_softmax(z_s, -1)
        at = logp.gather(-1, t_ids)
        ps = dense_probs(z_s)
        rows = t_ids.tolist()
        s_tail = losses.student_log_tail(logp, t_ids, at)
        got = losses.kd_topk_tail(at, t_lp, tau, teacher_log_tail=t_log_tail, student_log_tail=s_tail)
        check(got, ref_rows(pt, ps, rows, rows, tau), z_s)
        got = losses.kd_topk_renorm(at, t_lp, tau)
        check(got, ref_rows(pt, ps, rows, rows, tau, tail=False), z_s)
        # mapped: teacher buckets in the teacher vocab, student buckets at the twins
        at_m = logp.gather(-1, mapped.clamp(min=0))
        s_tail_m = losses.student_log_tail(logp, mapped.clamp(min=0), at_m, mmask)
        got = losses.kd_mapped(at_m, t_lp, mmask, tau, teacher_log_tail=t_log_tail, student_log_tail=s_tail_m)
        t_rows = [[int(t_ids[n, j]) for j in range(k) if mmask[n, j]] for n in range(N)]
        s_rows = [[int(mapped[n, j]) for j in range(k) if mmask[n, j]] for n in range(N)]
        ref = torch.stack([ref_rows(pt[n:n + 1], ps[n:n + 1], [t_rows[n]], [s_rows[n]], tau)[0]
                           if t_rows[n] else (z_s[n].sum() * 0) for n in range(N)])
        check(got, ref, z_s)


@pytest.mark.parametrize("tau", TAUS_ALL)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("t_tail", [None, 1e-25])
def test_union_is_exact_for_any_k_tail_and_tau(k, t_tail, tau):
    g = gen(200 + k)
    z_t = tailed_logits(g, k, t_tail, scale=1.0)
    # a teacher head that produces exactly these logits: hidden = one-hot rows, head = z_t.T
    hidden = torch.eye(N, dtype=F64)
    head = z_t.T.contiguous()
    logz = torch.logsumexp(z_t, -1)
    lp_t = z_t - logz[:, None]
    t_ids = z_t.topk(k, dim=-1).indices
    t_log_tail = losses.complement_log_mass(lp_t, t_ids)
    pt = dense_probs(z_t)
    for name, z0 in students(g, z_t, t_ids, k).items():
        z_s = z0.clone().requires_grad_(True)
        rows = union_rows(t_ids, z_s)
        got = losses.kd_union(torch.log_softmax(z_s, -1), hidden, head, logz, t_ids, SK, tau,
                              teacher_log_tail=t_log_tail, exact_student_tail=True)
        check(got, ref_rows(pt, dense_probs(z_s), rows, rows, tau), z_s)


@pytest.mark.parametrize("tau", TAUS_ALL)
def test_a_student_equal_to_the_teacher_pays_nothing_even_with_tiny_tails(tau):
    """fp32 student log-probs (what training uses), teacher tail 1e-25: with the exact tails the
    loss is rounding only; the old floor-then-temper gave 5.5e-2 at tau = 4."""
    g = gen(300)
    z_t = tailed_logits(g, K, 1e-25)
    t_ids = z_t.topk(K, dim=-1).indices
    lp_t = torch.log_softmax(z_t, -1)
    t_lp, t_log_tail = lp_t.gather(-1, t_ids), losses.complement_log_mass(lp_t, t_ids)
    logp = torch.log_softmax(z_t.float(), -1)
    at = logp.gather(-1, t_ids)
    loss = losses.kd_topk_tail(at, t_lp.float(), tau, teacher_log_tail=t_log_tail.float(),
                               student_log_tail=losses.student_log_tail(logp, t_ids, at))
    assert loss.dtype == torch.float32 and loss.abs().max() < 1e-5
    # the same student against the tail 1 - sum of fp32 values (what a cache without an explicit
    # tail gives) is not exact, and the exact tail is what removes the error
    cheap = losses.kd_topk_tail(at, t_lp.float(), tau)
    assert torch.isfinite(cheap).all()


def test_student_log_tail_is_exact_only_where_needed():
    g = gen(301)
    z = tailed_logits(g, K, None)
    z[:3] = tailed_logits(g, K, 1e-30)[:3]
    ids = z.topk(K, dim=-1).indices
    logp = torch.log_softmax(z, -1)
    ref = torch.stack([torch.log(dense_probs(z)[n, [v for v in range(V) if v not in set(ids[n].tolist())]].sum())
                       for n in range(N)])
    torch.testing.assert_close(losses.student_log_tail(logp, ids), ref, rtol=1e-12, atol=0)
    # 1 - sum alone cannot see a tail of 1e-30 in float64
    assert not torch.allclose(losses.log_tail(logp.gather(-1, ids))[:3], ref[:3], rtol=1e-3)
    # masked ids (and repeated ones) stay in the complement
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 1] = False
    ids_rep = ids.clone()
    ids_rep[:, 2] = ids[:, 0]
    mask[:, 2] = False
    ref_m = torch.stack([torch.log(dense_probs(z)[n, [v for v in range(V) if v not in
                                                      set(ids[n].tolist()) - {int(ids[n, 1]), int(ids[n, 2])}]].sum())
                         for n in range(N)])
    torch.testing.assert_close(losses.student_log_tail(logp, ids_rep, mask=mask, exact_below=1.0), ref_m,
                               rtol=1e-12, atol=0)
