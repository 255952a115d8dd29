"""Packing keeps, per token, the exact characters it covers."""

import pytest

from conftest import CORPUS, gpt2_tokenizer
from pipeline.config import DataConfig
from pipeline.errors import DataError
from stage1_teacher_cache.documents import Document, load_documents
from stage1_teacher_cache.plan import build_plan


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def docs_of(texts, eval_last=True):
    return [Document(i, f"d{i}", t, "eval" if eval_last and i == len(texts) - 1 else "train")
            for i, t in enumerate(texts)]


def test_token_spans_reproduce_the_text_and_the_tokens(tok):
    texts = list(CORPUS.values())
    plan = build_plan(docs_of(texts), tok, seq_len=16, eos_id=tok.eos_token_id, doc_separator="\n\n",
                      max_tokens={}, show_progress=False)
    assert plan.num_sequences > 10
    for seq in plan.sequences:
        assert len(seq.input_ids) == 16 and len(seq.char_end) == 16 and seq.char_end[-1] == len(seq.text)
        assert seq.char_end == sorted(seq.char_end)
        start = 0
        for tid, end in zip(seq.input_ids.tolist(), seq.char_end):
            piece = seq.text[start:end]
            if tid == tok.eos_token_id:
                assert piece == "\n\n"
            else:
                # The characters a token covers decode to the token (multi-byte characters split
                # across byte tokens sit with the token that completes them).
                assert piece == "" or tok.decode([tid]) in piece or piece in tok.decode([tid]) or "\ufffd" in tok.decode([tid])
            start = end
    # Concatenated sequences of one document reproduce its text exactly, EOS as the separator.
    train = plan.sequences[plan.splits["train"][0]:plan.splits["train"][1]]
    joined = "".join(s.text for s in train)
    assert joined.startswith(texts[0] + "\n\n" + texts[1][:10])


def test_multibyte_and_whitespace_runs(tok):
    text = "Zürich  東京\t\tnaïve —  end"
    plan = build_plan(docs_of([text * 3, "x " * 40]), tok, seq_len=8, eos_id=tok.eos_token_id,
                      doc_separator="|", max_tokens={}, show_progress=False)
    all_text = "".join(s.text for s in plan.sequences[:plan.splits["train"][1]])
    assert (text * 3 + "|").startswith(all_text)
    checked = 0
    for seq in plan.sequences:  # a sequence's tokens decode to its text, unless cut inside a character
        decoded = tok.decode(seq.input_ids.tolist())
        if tok.eos_token_id not in seq.input_ids.tolist() and "\ufffd" not in decoded:
            assert decoded == seq.text
            checked += 1
    assert checked >= 3


def test_splits_are_contiguous_and_limits_apply(tok):
    texts = list(CORPUS.values())
    plan = build_plan(docs_of(texts), tok, seq_len=16, eos_id=tok.eos_token_id, doc_separator="\n",
                      max_tokens={"train": 64, "eval": 32}, show_progress=False)
    assert plan.splits == {"train": [0, 4], "eval": [4, 6]}
    eval_docs = {d for s in plan.sequences[4:] for d in s.doc_id}
    assert eval_docs == {len(texts) - 1}


def test_document_longer_than_seq_len_spans_sequences(tok):
    long = "word " * 200
    plan = build_plan(docs_of([long, "tail text " * 10]), tok, seq_len=32, eos_id=tok.eos_token_id,
                      doc_separator="\n", max_tokens={}, show_progress=False)
    assert plan.splits["train"][1] >= 6
    assert "".join(s.text for s in plan.sequences[:6]) == long[:len("".join(s.text for s in plan.sequences[:6]))]


def test_too_little_text_is_a_clear_error(tok):
    with pytest.raises(DataError, match="fewer than seq_len=512"):
        build_plan(docs_of(["short", "eval"]), tok, seq_len=512, eos_id=tok.eos_token_id, doc_separator="\n",
                   max_tokens={}, show_progress=False)
    with pytest.raises(DataError, match="below data.seq_len"):
        build_plan(docs_of(["short " * 100, "eval"]), tok, seq_len=64, eos_id=tok.eos_token_id,
                   doc_separator="\n", max_tokens={"train": 10}, show_progress=False)


def test_documents_from_dir_jsonl_and_holdout(tmp_path, corpus_dir):
    docs = load_documents(DataConfig(source=str(corpus_dir), eval_documents=["beta.txt"]))
    assert [d.name for d in docs] == sorted(CORPUS)
    assert [d.name for d in docs if d.split == "eval"] == ["beta.txt"]
    auto = load_documents(DataConfig(source=str(corpus_dir), eval_fraction=0.3))
    assert [d.name for d in auto if d.split == "eval"] == sorted(CORPUS)[-2:]
    with pytest.raises(DataError, match=r"'betta.txt'.*did you mean 'beta.txt'"):
        load_documents(DataConfig(source=str(corpus_dir), eval_documents=["betta.txt"]))
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "one doc"}\n{"text": ""}\n{"text": "two doc"}\n{"text": "three"}\n')
    docs = load_documents(DataConfig(source=str(jl), eval_fraction=0.3))
    assert [d.text for d in docs] == ["one doc", "two doc", "three"] and docs[-1].split == "eval"
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(DataConfig(source=str(jl), text_field="body"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty text"):
        load_documents(DataConfig(source=str(empty)))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataConfig(source=str(tmp_path / "missing.parquet")))
