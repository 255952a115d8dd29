"""data.document_mask: packed documents that do not see each other, in stage 1 (the teacher) and
stage 2 (the student, same and cross tokenizer), exact against running each document alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import stage1_overrides, stage2_overrides

from pipeline import document_mask
from pipeline.config import load_config

SHORT_DOCS = [
    "To be, or not to be.", "Now is the winter of our discontent.", "All the world's a stage.",
    "Friends, Romans, countrymen, lend me your ears.", "A horse! a horse!", "Et tu, Brute?",
    "The lady doth protest too much, methinks.", "Cry havoc, and let slip the dogs of war.",
    "What's in a name?", "Brevity is the soul of wit.", "Frailty, thy name is woman!",
    "If music be the food of love, play on.", "We few, we happy few.", "Out, damned spot!",
    "The rest is silence.", "Lord, what fools these mortals be!",
]


def _tiny(family: str, attn: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, attn_implementation=attn)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, **common)).eval()
    cls, cfg = {"llama": (LlamaForCausalLM, LlamaConfig), "qwen2": (Qwen2ForCausalLM, Qwen2Config)}[family]
    return cls(cfg(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=64, **common)).eval()


def test_positions_and_mask_restart_per_document():
    docs = torch.tensor([[3, 3, 3, 4, 4, 9], [5, 5, 5, 5, 5, 5]])
    assert document_mask.position_ids(docs).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]
    ok = document_mask.allowed(docs)
    assert ok[0, 4].tolist() == [False, False, False, True, True, False]
    assert ok[1].equal(torch.ones(6, 6, dtype=torch.bool).tril())


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_every_tested_family_equals_each_document_alone(family, attn):
    """A packed, masked batch gives each document's logits exactly as when it runs alone; the
    same batch unmasked does not (so the comparison can fail)."""
    model = _tiny(family, attn)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 97, (2, 20), generator=gen)
    docs = torch.tensor([[0] * 7 + [1] * 9 + [2] * 4, [5] * 3 + [6] * 17])
    with torch.no_grad():
        packed = model(input_ids=ids, **document_mask.forward_kwargs(model, docs)).logits
        plain = model(input_ids=ids).logits
        for b in range(2):
            for d in docs[b].unique():
                cols = (docs[b] == d).nonzero()[:, 0]
                alone = model(input_ids=ids[b:b + 1, cols]).logits[0]
                torch.testing.assert_close(packed[b, cols], alone, atol=1e-5, rtol=1e-5)
    assert (packed - plain).abs().max() > 1e-3
    assert document_mask.check_model(model, lambda i, **kw: model(input_ids=i, **kw).logits, 97, "m", 1e-4) < 1e-4


def test_other_attention_implementations_are_refused_in_one_line():
    model = _tiny("llama", "sdpa")
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(document_mask.ConfigError, match="sdpa or eager"):
        document_mask.forward_kwargs(model, torch.zeros(1, 4, dtype=torch.long))


def test_a_family_that_ignores_the_mask_is_refused():
    model = _tiny("llama", "sdpa")
    with pytest.raises(document_mask.ConfigError, match="document_mask=false"):
        document_mask.check_model(model, lambda i, **kw: model(input_ids=i).logits, 97, "the teacher", 1e-4)


@pytest.fixture(scope="module")
def short_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("short-docs")
    for i in range(32):
        (out / f"d{i:02d}.txt").write_text(f"{SHORT_DOCS[i % 16]} Act {i}.", encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def masked_cache(tiny_teacher_dir, short_corpus, tmp_path_factory):
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("masked") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, short_corpus, cache, **{
        "data.eval_documents": [f"d{i:02d}.txt" for i in range(3, 32, 4)], "data.document_mask": True, "cache.top_k": 6})),
        show_progress=False)
    return cache


def _alone_reference(model, ids: np.ndarray, docs: np.ndarray):
    """Per position: log-softmax of the teacher run on its document's piece alone."""
    out = np.zeros((len(ids), model.config.vocab_size), np.float64)
    for d in np.unique(docs):
        cols = np.flatnonzero(docs == d)
        with torch.no_grad():
            logits = model(input_ids=torch.from_numpy(ids[cols])[None]).logits[0].double()
        out[cols] = torch.log_softmax(logits, -1).numpy()
    return out


def _assert_cache_equals_alone(arrays: dict, ids: np.ndarray, docs: np.ndarray, model) -> None:
    ref = _alone_reference(model, ids, docs)
    k = arrays["topk_logprobs"].shape[-1]
    np.testing.assert_allclose(arrays["topk_logprobs"], np.sort(ref, -1)[:, ::-1][:, :k], atol=2e-5)
    ends = np.append(docs[1:] != docs[:-1], True)  # a piece's last position predicts the next piece
    inside = np.flatnonzero(~ends)
    np.testing.assert_allclose(arrays["next_logprob"][inside], ref[inside, ids[inside + 1]], atol=2e-5)


def test_stage1_cache_equals_each_document_alone(masked_cache, tiny_teacher_dir):
    """Every cached position (top-k log-probs; next-token log-prob inside each piece) equals the
    teacher run on that position's document piece alone, from position 0; the fingerprint says so."""
    from transformers import AutoModelForCausalLM

    from pipeline.cache import CacheReader

    reader = CacheReader(masked_cache)
    assert reader.spec.document_mask and reader.fingerprint["document_mask"] is True
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32).eval()
    boundaries = 0
    for i in range(len(reader)):
        seq = reader.sequence(i)
        boundaries += int((seq.doc_id[1:] != seq.doc_id[:-1]).sum())
        _assert_cache_equals_alone(seq.arrays, seq.arrays["input_ids"].astype(np.int64), seq.doc_id, model)
    assert boundaries >= len(reader)  # the short documents really are packed several to a sequence


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_teacher_pass_equals_each_document_alone(masked_cache, tiny_teacher_dir, attn):
    """The teacher pass itself, under both attention implementations, on the cached packing;
    without the mask the same rows differ from the reference."""
    from transformers import AutoModelForCausalLM

    from pipeline.cache import CacheReader
    from stage1_teacher_cache.teacher import TeacherPass

    reader = CacheReader(masked_cache)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir, dtype=torch.float32, attn_implementation=attn)
    teacher = TeacherPass(model.eval(), 6, 16)
    teacher.check_document_mask(1e-4)
    ids = reader.read_range(0, 3, ("input_ids",))["input_ids"].astype(np.int64)
    docs = np.stack([reader.sequence(i).doc_id for i in range(3)])
    with teacher.documents(docs):
        masked = teacher(torch.from_numpy(ids))
    plain = teacher(torch.from_numpy(ids))
    for row in range(3):
        _assert_cache_equals_alone({k: v[row] for k, v in masked.items()}, ids[row], docs[row], model)
    assert np.abs(masked["topk_logprobs"] - plain["topk_logprobs"]).max() > 1e-3


def test_caches_without_the_key_read_as_unmasked(tiny_cache):
    from pipeline.cache import CacheReader

    reader = CacheReader(tiny_cache)
    assert "document_mask" not in reader.fingerprint and not reader.spec.document_mask


def _student(cfg, vocab: int, length: int):
    from stage2_student_train.student import build_student

    torch.manual_seed(3)
    return build_student(cfg, vocab, length).eval()


def _alone_nll(model, ids: np.ndarray, docs: np.ndarray, keep: np.ndarray | None = None) -> tuple[float, int]:
    """Sum of -log p(token t+1) over positions t < L-1 (those of ``keep``, when given), each from a
    run of its document piece alone."""
    logp = np.zeros((len(ids), model.config.vocab_size))
    for d in np.unique(docs):
        cols = np.flatnonzero(docs == d)
        with torch.no_grad():
            logp[cols] = torch.log_softmax(model(input_ids=torch.from_numpy(ids[cols])[None]).logits[0].double(),
                                           -1).numpy()
    t = np.arange(len(ids) - 1)
    if keep is not None:
        t = t[keep[:len(t)]]
    return float(-logp[t, ids[t + 1]].sum()), len(t)


def test_student_eval_equals_each_document_alone(masked_cache, tmp_path):
    """Stage 2 reads the cache's doc ids and masks the student: its held-out CE is exactly that
    of running the student on each document piece alone."""
    from pipeline.cache import CacheReader
    from stage2_student_train.data import data_access
    from stage2_student_train.evaluate import evaluate

    reader = CacheReader(masked_cache)
    cfg = load_config(None, stage2_overrides(masked_cache, tmp_path))
    access = data_access(reader, None, True, need_hidden=False, show_progress=False)
    model = _student(cfg, reader.spec.vocab_size, reader.spec.seq_len)
    indices = list(range(len(reader)))
    got = evaluate(model, access.load, access.target_bytes, indices, 3, 40, None)
    nll, n = 0.0, 0
    for i in indices:
        batch = access.load(np.asarray([i]))
        part = _alone_nll(model, batch["input_ids"][0].numpy(), batch["doc_ids"][0].numpy())
        nll, n = nll + part[0], n + part[1]
    assert got["positions"] == n
    assert got["ce"] == pytest.approx(nll / n, rel=1e-5)
    plain = evaluate(model, lambda ids: {k: v for k, v in access.load(ids).items() if k != "doc_ids"},
                     access.target_bytes, indices, 3, 40, None)
    assert abs(plain["ce"] - got["ce"]) > 1e-4  # unmasked is measurably different


def test_training_on_a_masked_cache_records_the_mask(masked_cache, tmp_path):
    from pipeline.tomlcompat import tomllib
    from stage2_student_train.train import train

    summary = train(load_config(None, stage2_overrides(masked_cache, tmp_path, **{"train.steps": 3})),
                    show_progress=False)
    assert summary["step"] == 3
    recorded = tomllib.loads((tmp_path / "run" / "config.toml").read_text())
    assert recorded["data"]["document_mask"] is True


def test_cross_tokenizer_student_gets_the_same_documents(masked_cache, smollm2_tokenizer_dir, tmp_path):
    """A student with another tokenizer: each of its tokens belongs to the document of the
    character it ends on; its documents end at the same characters as the teacher's, and its
    masked held-out CE equals running each of its own document pieces alone."""
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from stage2_student_train import align
    from stage2_student_train.data import data_access
    from stage2_student_train.evaluate import evaluate

    reader = CacheReader(masked_cache)
    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    access = data_access(reader, tok, False, need_hidden=False, show_progress=False)
    for i in range(len(reader)):
        seq = reader.sequence(i)
        _, ends = align.student_tokens(tok, seq.text)
        docs = access.load(np.asarray([i]))["doc_ids"][0].numpy()[:len(ends)]
        teacher_cuts = seq.char_end[np.flatnonzero(seq.doc_id[1:] != seq.doc_id[:-1])]
        student_cuts = ends[np.flatnonzero(docs[1:] != docs[:-1])]
        assert student_cuts.tolist() == teacher_cuts.tolist(), i
    cfg = load_config(None, stage2_overrides(masked_cache, tmp_path))
    model = _student(cfg, len(tok), access.seq_len)
    indices = list(range(len(reader)))
    got = evaluate(model, access.load, access.target_bytes, indices, 2, 40, None)
    nll, n = 0.0, 0
    for i in indices:
        batch = access.load(np.asarray([i]))
        real = batch["doc_ids"][0].numpy() >= 0
        keep = batch["target_mask"][0].numpy()[:int(real.sum()) - 1]
        part = _alone_nll(model, batch["input_ids"][0].numpy()[real], batch["doc_ids"][0].numpy()[real], keep)
        nll, n = nll + part[0], n + part[1]
    assert got["positions"] == n and got["ce"] == pytest.approx(nll / n, rel=1e-5)


def test_chat_data_is_masked_by_default(chat_cache):
    """``data.document_mask = "auto"`` (the default): on for chat data, where each row is a
    conversation of its own."""
    from pipeline.cache import CacheReader

    assert CacheReader(chat_cache).spec.document_mask


def test_a_bad_setting_is_a_one_line_config_error():
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match="document_mask"):
        load_config(None, ['data.document_mask="yes"'])
