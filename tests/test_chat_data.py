"""Chat / instruction data: rows rendered with the teacher's chat template, a cached per-token
loss mask (assistant tokens only), applied by stage 2 to CE and every KD mode."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from conftest import CHAT_ROWS, stage2_overrides

from pipeline.errors import DataError
from stage1_teacher_cache.chat import as_messages, render


@pytest.fixture(scope="module")
def smol(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


def test_assistant_spans_are_the_assistant_turns(smol):
    """Each span is exactly an assistant message and its end-of-turn marker; prompt/completion
    rows are one user turn and one assistant turn."""
    messages = as_messages(CHAT_ROWS[0], "row")
    text, spans = render(smol, messages, "row")
    assert text == smol.apply_chat_template(messages, tokenize=False)
    got = [text[a:b] for a, b in spans]
    assert got == [m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant"]
    text, spans = render(smol, as_messages(CHAT_ROWS[-1], "row"), "row")
    assert [text[a:b] for a, b in spans] == ["Hello, good sir; well met.<|im_end|>\n"]
    assert "<|im_start|>user\nSay hello.<|im_end|>" in text[:spans[0][0]]


def test_chat_rows_without_a_template_or_assistant_are_one_line_errors(smol):
    from conftest import gpt2_tokenizer

    with pytest.raises(DataError, match="has no chat template"):
        render(gpt2_tokenizer(), as_messages(CHAT_ROWS[0], "row"), "row")
    with pytest.raises(DataError, match="no assistant turn"):
        render(smol, [{"role": "user", "content": "hi"}], "row")
    with pytest.raises(DataError, match="role"):
        as_messages({"messages": [{"content": "no role"}]}, "row")


def test_the_cache_masks_exactly_the_assistant_tokens(chat_cache):
    """Stage 1 stores loss_mask (uint8, checksummed in the shard markers); the tokens it keeps
    are the assistant turns' tokens; the prompt, system turn and separator are masked out."""
    from transformers import AutoTokenizer

    from pipeline.cache import CacheReader
    from pipeline.cache.verify import verify_cache

    reader = CacheReader(chat_cache)
    assert reader.spec.has_loss_mask and "loss_mask" in reader.spec.logical_arrays()
    assert reader.fingerprint["loss_mask"] == "assistant" and reader.fingerprint["chat_template"]
    marker = json.loads((chat_cache / "done" / "shard-00000.json").read_text())
    assert any("loss_mask" in rel for rel in marker["files"])
    assert verify_cache(chat_cache).ok
    tok = AutoTokenizer.from_pretrained(chat_cache / "tokenizer")
    data = reader.read_range(0, len(reader), ("input_ids", "loss_mask"))
    kept = "".join(tok.decode(ids[m == 1]) for ids, m in zip(data["input_ids"], data["loss_mask"]))
    dropped = "".join(tok.decode(ids[m == 0]) for ids, m in zip(data["input_ids"], data["loss_mask"]))
    assert data["loss_mask"].dtype == np.uint8 and set(np.unique(data["loss_mask"])) == {0, 1}
    assert "the king rode" in kept and "She weeps" in kept and "what news" not in kept and "system" not in kept
    assert "what news" in dropped and "helpful AI assistant" in dropped
    # The teacher's held-out numbers over the same targets: from next_logprob where loss_mask[t+1].
    eval_ids = reader.split_indices("eval")
    got = reader.read_indices(eval_ids, ("next_logprob", "loss_mask"))
    keep = got["loss_mask"][:, 1:] > 0
    nll = -got["next_logprob"][:, :-1][keep].astype(np.float64)
    assert reader.info()["teacher_eval_ppl_targets"] == pytest.approx(float(np.exp(nll.mean())), rel=1e-6)
    eos = reader.spec.teacher["eos_token_id"]
    for i in range(len(reader)):  # the separator token (eos standing for "\n\n") is never a target
        text, ends = reader.text(i)
        starts = np.concatenate([[0], ends[:-1]])
        for t in np.flatnonzero(data["loss_mask"][i]):
            assert text[starts[t]:ends[t]] != reader.fingerprint["doc_separator"] or data["input_ids"][i, t] != eos


def test_raw_text_caches_store_no_mask(tiny_cache):
    from pipeline.cache import CacheReader

    reader = CacheReader(tiny_cache)
    assert not reader.spec.has_loss_mask and "loss_mask" not in reader.spec.array_specs()
    assert "loss_mask" not in reader.fingerprint and "chat_template" not in reader.fingerprint
    assert not (tiny_cache / "arrays.zarr" / "loss_mask").exists()
    assert "loss_mask" not in json.loads((tiny_cache / "manifest.json").read_text())["spec"]


# ---------------------------------------------------------------- stage 2: the mask in every loss


def _batch(mode: str, seed: int = 0):
    """A same-tokenizer batch with random teacher arrays and a loss mask (B=2, L=10, K=4, V=40)."""
    g = torch.Generator().manual_seed(seed)
    B, L, K, V, D = 2, 10, 4, 40, 8
    logits = torch.randn(B, L, V, generator=g) * 2
    logp = torch.log_softmax(logits, -1)
    top = logp.topk(K, -1)
    batch = {"input_ids": torch.randint(0, V, (B, L), generator=g), "topk_ids": top.indices,
             "topk_logprobs": top.values, "topk_log_tail": torch.log1p(-top.values.exp().sum(-1)),
             "logz": torch.zeros(B, L), "loss_mask": torch.rand(B, L, generator=g) < 0.5}
    batch["loss_mask"][:, 1] = True
    if mode == "union":
        batch["hidden"] = torch.randn(B, L, D, generator=g)
    if mode == "sampled":
        batch["draw_ids"] = torch.randint(0, V, (B, L, 3), generator=g)
        batch["draw_counts"] = torch.randint(1, 4, (B, L, 3), generator=g)
    return batch, (torch.randn(V, D, generator=g) if mode == "union" else None)


def _student():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(3)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True))


def _run(model, batch, mode, head, temperature=1.0):
    from pipeline.config import KDConfig
    from stage2_student_train.objective import Weights, batch_objective

    model.zero_grad()
    out = batch_objective(model, batch, KDConfig(mode=mode, union_student_k=2),
                          Weights(1.0, 1.0, temperature, 0.0, 0.0), head=head, chunk=7, backward=True)
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("mode", ["none", "topk_tail", "topk_renorm", "union", "sampled"])
def test_masked_positions_contribute_exactly_zero(mode):
    """Whatever the teacher says at a masked position (values replaced by other random ones),
    the loss and every gradient are bit-identical: a masked position adds exactly 0."""
    model = _student()
    batch, head = _batch(mode)
    out, grads = _run(model, batch, mode, head, temperature=1.0 if mode == "sampled" else 2.0)
    other, _ = _batch(mode, seed=1)
    masked = ~batch["loss_mask"]  # position t counts when token t+1 is a target: t = masked[t+1]
    where = torch.zeros_like(masked)
    where[:, :-1] = masked[:, 1:]
    changed = dict(batch)
    for name in ("topk_ids", "topk_logprobs", "topk_log_tail", "logz", "hidden", "draw_ids", "draw_counts"):
        if name in batch:
            changed[name] = torch.where(where.view(*where.shape, *[1] * (batch[name].dim() - 2)), other[name],
                                        batch[name])
    out2, grads2 = _run(model, changed, mode, head, temperature=1.0 if mode == "sampled" else 2.0)
    assert out2["loss"] == out["loss"] and out["positions"] == int(batch["loss_mask"][:, 1:].sum())
    assert grads and all(torch.equal(grads[n], grads2[n]) for n in grads)
    unmasked_out, _ = _run(model, {k: v for k, v in batch.items() if k != "loss_mask"}, mode, head,
                           temperature=1.0 if mode == "sampled" else 2.0)
    assert unmasked_out["loss"] != out["loss"]  # the mask does change the objective


def test_masked_objective_against_a_float64_reference():
    """CE + topk_tail KD with a mask = the float64 mean over the kept positions only, and so are
    its gradients."""
    from stage2_student_train import losses

    model = _student()
    batch, _ = _batch("topk_tail", seed=5)
    out, grads = _run(model, batch, "topk_tail", None, temperature=1.0)
    model.zero_grad()
    logits = model(input_ids=batch["input_ids"]).logits[:, :-1].double()
    logp = torch.log_softmax(logits, -1).reshape(-1, logits.shape[-1])
    keep = batch["loss_mask"][:, 1:].reshape(-1)
    targets = batch["input_ids"][:, 1:].reshape(-1)
    ids = batch["topk_ids"][:, :-1].reshape(-1, 4)
    ce = -logp.gather(1, targets[:, None])[:, 0]
    q = batch["topk_logprobs"][:, :-1].reshape(-1, 4).double()
    q_tail = batch["topk_log_tail"][:, :-1].reshape(-1).double()
    s = logp.gather(1, ids)
    s_tail = torch.log1p(-s.exp().sum(-1))
    kl = (q.exp() * (q - s)).sum(-1) + q_tail.exp() * (q_tail - s_tail)
    ref = ((ce + kl) * keep).sum() / keep.sum()
    ref.backward()
    assert out["loss"] == pytest.approx(float(ref.detach()), rel=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(grads[n].double(), p.grad.double(), rtol=1e-4, atol=1e-6)
    assert losses  # the module under test computes the same terms


# ---------------------------------------------------------------- cross-tokenizer and the whole run


def test_cross_tokenizer_mask_covers_the_same_characters(chat_cache):
    """The student's (GPT-2's) target tokens cover the characters the teacher's do: exactly,
    except inside a student token that straddles a span's edge (GPT-2's "\n\n" spans the end of
    a turn and the document separator), which counts by its last character."""
    from pipeline.cache import CacheReader
    from stage2_student_train import align
    from stage2_student_train.cross import build_view
    from stage2_student_train.data import masked_chars
    from stage2_student_train.student import gpt2_tokenizer, load_teacher_tokenizer

    reader = CacheReader(chat_cache)
    student = gpt2_tokenizer()
    view = build_view(reader, load_teacher_tokenizer(reader), student, show_progress=False)
    assert view.loss_mask is not None and view.loss_mask.shape == view.ids.shape
    covered = differ = 0
    for i in range(len(reader)):
        text, teacher_ends = reader.text(i)
        teacher_chars = masked_chars(reader, i, text, teacher_ends)
        _, ends = align.student_tokens(student, text)
        student_chars = np.zeros(len(text), bool)
        starts = np.concatenate([[0], ends[:-1]])
        for a, b in zip(starts[view.loss_mask[i, :len(ends)]], ends[view.loss_mask[i, :len(ends)]]):
            student_chars[a:b] = True
        straddling = np.zeros(len(text), bool)
        for a, b in zip(starts, ends):
            if b > a and teacher_chars[a:b].any() and not teacher_chars[a:b].all():
                straddling[a:b] = True
                assert student_chars[b - 1] == teacher_chars[b - 1]  # decided by its last character
        assert np.array_equal(student_chars[~straddling], teacher_chars[~straddling]), i
        covered += int(teacher_chars.sum())
        differ += int((student_chars != teacher_chars).sum())
    assert covered > 0 and differ <= 0.02 * covered


@pytest.mark.slow
@pytest.mark.parametrize("student", ["same", "cross"])
def test_a_chat_run_exports_a_chat_student(chat_cache, tmp_path, student):
    """Same- and cross-tokenizer runs on a chat cache: the held-out numbers say which tokens they
    count, and the exported student has a chat template that renders a prompt it generates from."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.config import load_config
    from stage2_student_train.train import train

    from test_trackers import check_against_metrics

    extra = {"train.report_to": ["tensorboard"]} if student == "same" else {"student.tokenizer": "embedded:gpt2",
                                                                          "kd.mode": "mapped"}
    summary = train(load_config(None, stage2_overrides(chat_cache, tmp_path, **extra)), show_progress=False)
    assert summary["eval"]["counted"].startswith("assistant") and summary["eval"]["positions"] > 0
    if student == "same":  # the tracker got what metrics.jsonl got, at the same steps
        assert set(check_against_metrics(tmp_path / "run")["eval/ppl"]) == {3, 6}
    final = tmp_path / "run" / "final" / "student"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    prompt = tok.apply_chat_template([{"role": "user", "content": "What news?"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.endswith("<|im_start|>assistant\n")
    inputs = tok(prompt, return_tensors="pt", add_special_tokens=False)
    out = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 4 or out[0, -1] == model.generation_config.eos_token_id
    assert "assistant/completion tokens" in (final / "README.md").read_text()


def test_cross_tokenizer_masked_positions_contribute_exactly_zero(chat_cache):
    """mapped mode on a chat cache seen through GPT-2: the teacher's numbers at the student
    positions the mask drops change neither the loss nor any gradient."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.cache import CacheReader
    from stage2_student_train.cross import build_view, cross_batch
    from stage2_student_train.student import gpt2_tokenizer, load_teacher_tokenizer

    reader = CacheReader(chat_cache)
    student_tok = gpt2_tokenizer()
    view = build_view(reader, load_teacher_tokenizer(reader), student_tok, show_progress=False)
    batch = cross_batch(reader, view, np.array([0, 1]))
    dropped = (view.ids[[0, 1]][:, 1:] >= 0) & ~view.loss_mask[[0, 1]][:, 1:]
    assert dropped.any() and batch["target_mask"].any() and not batch["target_mask"][torch.from_numpy(dropped)].any()
    changed = dict(batch)
    where = torch.from_numpy(dropped)[..., None]
    changed["topk_logprobs"] = torch.where(where, batch["topk_logprobs"] - 3.0, batch["topk_logprobs"])
    changed["topk_ids"] = torch.where(where, (batch["topk_ids"] + 7) % len(student_tok), batch["topk_ids"])
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(student_tok), hidden_size=8, intermediate_size=16,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    out, grads = _run(model, batch, "mapped", None, temperature=2.0)
    out2, grads2 = _run(model, changed, "mapped", None, temperature=2.0)
    assert out["kd"] > 0 and out2["loss"] == out["loss"] and all(torch.equal(grads[n], grads2[n]) for n in grads)
