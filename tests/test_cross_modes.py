"""The cross-tokenizer modes read from a real cache: mapped_sampled (draws at the aligned teacher
position through the vocab map), uld and chunk_likelihood; refusals before anything is written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import stage2_overrides
from pipeline.config import KDConfig, load_config
from pipeline.errors import ConfigError


def _access(cache, tokenizer_dir, **need):
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from stage2_student_train.data import data_access

    reader = CacheReader(cache)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    return reader, tok, data_access(reader, tok, False, need_hidden=False, show_progress=False, **need)


def test_cross_batch_carries_the_aligned_draws_and_chunks(sampled_cache, smollm2_tokenizer_dir):
    from stage2_student_train.cross import load_or_build_view

    reader, tok, access = _access(sampled_cache, smollm2_tokenizer_dir, need_samples=True, need_chunks=True)
    batch = access.load(np.arange(4))
    view = load_or_build_view(reader, None, tok, show_progress=False)
    raw = reader.read_indices(np.arange(4), ("draw_ids", "draw_counts", "topk_ids", "next_logprob"))
    aligned = view.aligned[:4]
    for r in range(4):
        for j in np.flatnonzero(batch["kd_position"][r].numpy())[:5]:
            t = aligned[r, j]
            counts = raw["draw_counts"][r, t].astype(int)
            assert batch["draw_counts"][r, j].tolist() == counts.tolist()
            twins = view.vmap[raw["draw_ids"][r, t].astype(np.int64)]
            assert batch["draw_twin"][r, j].tolist() == (twins >= 0).tolist()
            outside = [int(i) not in set(raw["topk_ids"][r, t].tolist()) for i in raw["draw_ids"][r, t]]
            assert batch["draw_outside"][r, j].tolist() == outside
        js = np.flatnonzero(aligned[r] >= 0)
        lengths = batch["chunk_len"][r].numpy()
        assert lengths.sum() == js[-1] - js[0]  # the chunks tile the text between the first and last boundary
        ends = np.flatnonzero(lengths)
        ts = aligned[r, ends + 1]
        t0 = aligned[r, ends + 1 - lengths[ends]]
        want = [raw["next_logprob"][r, a:b].astype(np.float64).sum() for a, b in zip(t0, ts)]
        assert np.allclose(batch["teacher_chunk_logp"][r].numpy()[ends], want, atol=1e-4)
    assert set(batch["twin_ids"].tolist()) == set(view.vmap[view.vmap >= 0].tolist())


@pytest.mark.parametrize("mode", ["mapped_sampled", "uld", "chunk_likelihood"])
def test_new_cross_modes_do_not_depend_on_the_chunk_size(sampled_cache, smollm2_tokenizer_dir, mode):
    from stage2_student_train import kd_modes
    from stage2_student_train.objective import Weights, batch_objective
    from stage2_student_train.student import build_student

    need = kd_modes.get(mode).needs
    reader, tok, access = _access(sampled_cache, smollm2_tokenizer_dir, need_samples="samples" in need,
                                  need_chunks="next_logprob" in need)
    batch = access.load(np.arange(5))
    torch.manual_seed(0)
    model = build_student(load_config(None, stage2_overrides(sampled_cache, Path("/unused"))), len(tok), access.seq_len)
    w = Weights(1.0, 1.0, 1.0, 0.0, 0.0)
    outs = [batch_objective(model, batch, KDConfig(mode=mode), w, chunk=c) for c in (7, 100000)]
    assert outs[0]["kd"] > 0 and outs[1]["kd"] == pytest.approx(outs[0]["kd"], rel=1e-6)


@pytest.mark.slow  # trains students
def test_new_cross_modes_train_and_mapped_sampled_is_refused_without_samples(sampled_cache, tiny_cache,
                                                                              smollm2_tokenizer_dir, tmp_path):
    from stage2_student_train.train import train

    base = {"student.tokenizer": str(smollm2_tokenizer_dir), "train.steps": 2, "train.warmup_steps": 1}
    for mode in ("mapped_sampled", "uld", "chunk_likelihood"):
        out = train(load_config(None, stage2_overrides(sampled_cache, tmp_path, mode, **{**base, "kd.mode": mode})),
                    show_progress=False)
        assert out["step"] == 2
    with pytest.raises(ConfigError) as err:
        train(load_config(None, stage2_overrides(tiny_cache, tmp_path, "refused", **{**base,
                                                                                   "kd.mode": "mapped_sampled"})),
              show_progress=False)
    assert "\n" not in str(err.value) and "cache.samples" in str(err.value)
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_tokenizer_pair_measure_is_one_for_a_tokenizer_against_itself_and_a_share_otherwise(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    from bench.tokenizer_pair import measure
    from conftest import CORPUS, gpt2_tokenizer

    gpt2, smol = gpt2_tokenizer(), AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    texts = list(CORPUS.values())
    same = measure(gpt2, gpt2, texts)
    # against itself every id is its own twin; only the earlier byte-tokens of a split character
    # (the CJK text) are unaligned, by the last-of-run rule
    assert same["teacher_vocab_with_twin"] == 1.0 and 0.95 < same["student_positions_aligned"] < 1.0
    assert same["tokens_per_teacher_token"] == 1.0 and same["twin_token_share"] == 1.0
    other = measure(gpt2, smol, texts)
    assert 0.1 < other["teacher_vocab_with_twin"] < 1.0 and 0.5 < other["student_positions_aligned"] < 1.0
