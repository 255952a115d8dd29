"""Packing keeps, per token, the exact characters it covers; the plan is streamed to disk and
read back shard by shard."""

import numpy as np
import pytest

from conftest import CORPUS, gpt2_tokenizer
from pipeline.config import DataConfig, load_config
from pipeline.errors import ConfigError, DataError
from stage1_teacher_cache.documents import documents_of, held_out_by_fraction, load_documents
from stage1_teacher_cache.plan import TOKENIZE_DOCS, build_plan, ensure_plan, plan_folder, tokenize_batch
from stage1_teacher_cache.plan_store import Plan


@pytest.fixture(scope="module")
def tok():
    return gpt2_tokenizer()


def docs_of(texts, eval_last=True):
    return documents_of((f"d{i}", t, "eval" if eval_last and i == len(texts) - 1 else "train")
                        for i, t in enumerate(texts))


def plan_of(tmp_path, tok, texts, seq_len, sep="\n\n", max_tokens=None, rows=3, eval_last=True):
    return build_plan(docs_of(texts, eval_last), tok, seq_len=seq_len, eos_id=tok.eos_token_id, doc_separator=sep,
                      max_tokens=max_tokens or {}, folder=tmp_path / "plan", rows=rows, show_progress=False)


def sequences(plan, start=0, stop=None):
    """(ids, text, char_end, doc_id) of every sequence in [start, stop), read back from disk."""
    stop = plan.num_sequences if stop is None else stop
    rows = plan.rows_of(start, stop)
    ends, docs = rows.char_end.to_pylist(), rows.doc_id.to_pylist()
    return [(rows.input_ids[i], rows.text[i].as_py(), ends[i], docs[i]) for i in range(len(rows))]


def reference_pack(texts, tok, seq_len, eos_id, sep):
    """The original per-token packer (one split, no limit): what the vectorised one must equal."""
    out, ids, pieces, char_end, doc_ids, length = [], [], [], [], [], 0
    for doc_id, text in enumerate(texts):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        cursor = None
        for tid, (s, e) in [*zip(enc["input_ids"], enc["offset_mapping"]), (eos_id, (None, None))]:
            if e is None:
                piece = sep
            else:
                if cursor is None:
                    cursor = s
                piece = text[cursor:e] if e > cursor else ""
                cursor = max(cursor, e)
            ids.append(tid)
            pieces.append(piece)
            length += len(piece)
            char_end.append(length)
            doc_ids.append(doc_id)
            if len(ids) == seq_len:
                out.append((ids, "".join(pieces), char_end, doc_ids))
                ids, pieces, char_end, doc_ids, length = [], [], [], [], 0
    return out


def test_vectorised_packing_equals_the_per_token_reference(tmp_path, tok):
    texts = [*CORPUS.values(), "Zürich  東京\t\tnaïve —  end " * 7, " leading space", "x" * 300, "🙂🙂 emoji 🙂"]
    for seq_len in (7, 16, 64):
        plan = plan_of(tmp_path, tok, texts, seq_len, sep="<|sep|>", eval_last=False)
        got = sequences(plan)
        want = reference_pack(texts, tok, seq_len, tok.eos_token_id, "<|sep|>")
        assert len(got) == len(want) == plan.num_sequences
        for (ids, text, ends, docs), (w_ids, w_text, w_ends, w_docs) in zip(got, want):
            assert ids.tolist() == w_ids and text == w_text and ends == w_ends and docs == w_docs


def test_token_spans_reproduce_the_text_and_the_tokens(tmp_path, tok):
    texts = list(CORPUS.values())
    plan = plan_of(tmp_path, tok, texts, 16)
    assert plan.num_sequences > 10
    seqs = sequences(plan)
    for ids, text, char_end, _ in seqs:
        assert len(ids) == 16 and len(char_end) == 16 and char_end[-1] == len(text)
        assert char_end == sorted(char_end)
        start = 0
        for tid, end in zip(ids.tolist(), char_end):
            piece = text[start:end]
            if tid == tok.eos_token_id:
                assert piece == "\n\n"
            else:
                assert piece == "" or tok.decode([tid]) in piece or piece in tok.decode([tid]) or "\ufffd" in tok.decode([tid])
            start = end
    joined = "".join(s[1] for s in seqs[:plan.splits["train"][1]])
    assert joined.startswith(texts[0] + "\n\n" + texts[1][:10])
    # The pilot's text frequencies were counted while planning: they equal a count over all rows.
    all_ids = np.concatenate([s[0] for s in seqs])
    assert np.array_equal(plan.text_counts(len(tok)), np.bincount(all_ids, minlength=len(tok)))


def test_multibyte_and_whitespace_runs(tmp_path, tok):
    text = "Zürich  東京\t\tnaïve —  end"
    plan = plan_of(tmp_path, tok, [text * 3, "x " * 40], 8, sep="|")
    seqs = sequences(plan)
    all_text = "".join(s[1] for s in seqs[:plan.splits["train"][1]])
    assert (text * 3 + "|").startswith(all_text)
    checked = 0
    for ids, seq_text, _, _ in seqs:
        decoded = tok.decode(ids.tolist())
        if tok.eos_token_id not in ids.tolist() and "\ufffd" not in decoded:
            assert decoded == seq_text
            checked += 1
    assert checked >= 3


def test_splits_are_contiguous_and_limits_apply(tmp_path, tok):
    texts = list(CORPUS.values())
    plan = plan_of(tmp_path, tok, texts, 16, sep="\n", max_tokens={"train": 64, "eval": 32})
    assert plan.splits == {"train": [0, 4], "eval": [4, 6]}
    assert {d for s in sequences(plan, 4) for d in s[3]} == {len(texts) - 1}
    # Rows across the train/eval boundary and across record batches (rows=3) read back in order.
    assert [s[3][0] for s in sequences(plan, 2, 6)] == [s[3][0] for s in sequences(plan)[2:6]]


def test_reading_stops_once_every_split_is_full(tmp_path, tok):
    consumed = []

    def stream():
        for i in range(1000):
            consumed.append(i)
            yield f"d{i}", f"document number {i} " * 20, "eval" if i % 10 == 3 else "train"

    plan = build_plan(documents_of(stream()), tok, seq_len=16, eos_id=tok.eos_token_id, doc_separator="\n",
                      max_tokens={"train": 160, "eval": 32}, folder=tmp_path / "p", rows=4, show_progress=False)
    assert plan.splits == {"train": [0, 10], "eval": [10, 12]}
    # Documents 0-3 fill both splits; reading stops within one tokenizer batch of that point.
    assert plan.info["stopped_early"] and plan.info["documents"] == 4 and len(consumed) <= 4 + TOKENIZE_DOCS < 1000


def test_document_longer_than_seq_len_spans_sequences(tmp_path, tok):
    long = "word " * 200
    plan = plan_of(tmp_path, tok, [long, "tail text " * 10], 32, sep="\n")
    assert plan.splits["train"][1] >= 6
    text = "".join(s[1] for s in sequences(plan, 0, 6))
    assert text == long[:len(text)]


def test_too_little_text_is_a_clear_error(tmp_path, tok):
    with pytest.raises(DataError, match="fewer than seq_len=512"):
        plan_of(tmp_path, tok, ["short", "eval"], 512, sep="\n")
    assert not (tmp_path / "plan").exists()  # a failed plan leaves nothing behind
    with pytest.raises(DataError, match="below data.seq_len"):
        plan_of(tmp_path, tok, ["short " * 100, "eval"], 64, sep="\n", max_tokens={"train": 10})
    with pytest.raises(DataError, match="every document read is held out"):
        build_plan(documents_of([("a", "text " * 50, "eval")]), tok, 8, tok.eos_token_id, "\n", {},
                   tmp_path / "plan", 4, show_progress=False)


def test_eval_fraction_rule_is_streaming_and_exact():
    for f in (0.05, 0.1, 0.3, 0.5):
        for n in range(1, 60):
            held = [i for i in range(n) if held_out_by_fraction(i, f)]
            assert len(held) == int(np.ceil((n - 1) * f - 1e-9)) and 0 not in held
    assert [i for i in range(45) if held_out_by_fraction(i, 0.05)] == [1, 21, 41]
    assert not any(held_out_by_fraction(i, 0.0) for i in range(100))


def test_documents_from_dir_jsonl_and_holdout(tmp_path, corpus_dir):
    docs = load_documents(DataConfig(source=str(corpus_dir), eval_documents=["beta.txt"]))
    assert [d.name for d in docs] == sorted(CORPUS)
    assert [d.name for d in docs if d.split == "eval"] == ["beta.txt"]
    auto = load_documents(DataConfig(source=str(corpus_dir), eval_fraction=0.3))
    assert [d.name for d in auto if d.split == "eval"] == [sorted(CORPUS)[1], sorted(CORPUS)[4]]
    with pytest.raises(DataError, match=r"'betta.txt'.*did you mean 'beta.txt'"):
        load_documents(DataConfig(source=str(corpus_dir), eval_documents=["betta.txt"]))
    # The demo config's plays named on one's own data: the error says how to go on.
    with pytest.raises(DataError, match=r"'hamlet_gut.txt', which is not a document.*data.eval_documents=\[\]"):
        load_documents(DataConfig(source=str(corpus_dir), eval_documents=["hamlet_gut.txt"]))
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"text": "one doc"}\n{"text": ""}\n{"text": "two doc"}\n{"text": "three"}\n')
    docs = load_documents(DataConfig(source=str(jl), eval_fraction=0.3))
    assert [d.text for d in docs] == ["one doc", "two doc", "three"]
    assert [d.split for d in docs] == ["train", "eval", "train"]
    assert [d.name for d in docs] == ["d.jsonl-0", "d.jsonl-2", "d.jsonl-3"]
    # Rows have no names known up front: an unknown name is found out at the end of the stream,
    # with the closest name met as the hint.
    with pytest.raises(DataError, match=r"'d.jsonl-9'.*did you mean 'd.jsonl-0'"):
        load_documents(DataConfig(source=str(jl), eval_documents=["d.jsonl-9"]))
    with pytest.raises(DataError, match="no column 'body'"):
        load_documents(DataConfig(source=str(jl), text_field="body"))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("   \n")
    with pytest.raises(DataError, match="no non-empty text"):
        load_documents(DataConfig(source=str(empty)))
    with pytest.raises(DataError, match="does not exist"):
        load_documents(DataConfig(source=str(tmp_path / "missing.parquet")))


def test_a_stored_plan_is_reused_until_its_inputs_change(tmp_path, tok):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in CORPUS.items():
        (corpus / name).write_text(text)
    overrides = [f'data.source="{corpus}"', f'cache.dir="{tmp_path / "c"}"', "data.seq_len=16",
                 'data.eval_documents=["omega.txt"]', "cache.shard_sequences=4", "cache.chunk_sequences=2"]
    cfg = load_config(None, overrides)
    first = ensure_plan(cfg, tok, show_progress=False)
    assert not first.reused and plan_folder(cfg) == tmp_path / ".c.plan" and first.folder == plan_folder(cfg)
    files = {p.name: p.read_bytes() for p in first.folder.iterdir()}
    again = ensure_plan(cfg, tok, show_progress=False)
    assert again.reused and again.dataset_hash == first.dataset_hash
    # A planner killed mid-way leaves no plan.json: the next run plans again, to identical files.
    (first.folder / "plan.json").unlink()
    redone = ensure_plan(cfg, tok, show_progress=False)
    assert not redone.reused and {p.name: p.read_bytes() for p in redone.folder.iterdir()} == files
    # Another config or a changed file is planned again; the dataset hash follows the content.
    assert not ensure_plan(load_config(None, [*overrides, "data.seq_len=8"]), tok, show_progress=False).reused
    (corpus / "alpha.txt").write_text(CORPUS["alpha.txt"] + " changed")
    changed = ensure_plan(cfg, tok, show_progress=False)
    assert not changed.reused and changed.dataset_hash != first.dataset_hash
    assert isinstance(Plan(changed.folder).num_sequences, int)


def test_a_plan_dir_holding_other_files_is_never_deleted(tmp_path, tok, corpus_dir):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    cfg = load_config(None, [f'data.source="{corpus_dir}"', f'cache.plan_dir="{mine}"', "data.seq_len=16",
                             'data.eval_documents=["omega.txt"]'])
    with pytest.raises(ConfigError, match=r"plan folder .*mine holds 'thesis.tex', which no plan holds; set cache.plan_dir"):
        ensure_plan(cfg, tok, show_progress=False)
    assert [p.name for p in mine.iterdir()] == ["thesis.tex"]


def test_tokenize_batch_matches_single_calls(tok):
    texts = list(CORPUS.values())
    for (ids, offs), text in zip(tokenize_batch(tok, texts), texts):
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        assert ids.tolist() == enc["input_ids"] and offs.tolist() == [list(o) for o in enc["offset_mapping"]]


@pytest.mark.slow  # plans 11k documents under tracemalloc (~20 s)
def test_planning_memory_does_not_grow_with_the_corpus(tmp_path, tok):
    """Python-side peak allocation while planning 10x more documents stays flat (the plan goes to
    disk as it is made; a planner that kept every sequence would grow ~10x here)."""
    import tracemalloc

    def peak(docs: int) -> int:
        stream = documents_of((f"d{i}", f"words of document {i} " * 10, "eval" if i % 20 == 1 else "train")
                              for i in range(docs))
        tracemalloc.start()
        build_plan(stream, tok, seq_len=32, eos_id=tok.eos_token_id, doc_separator="\n", max_tokens={},
                   folder=tmp_path / f"p{docs}", rows=8, show_progress=False)
        top = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        return top

    peak(50)  # one-time allocations (imports, tokenizer caches) out of the way
    small, large = peak(1000), peak(10000)  # both past the documents table's write batch
    assert large < 1.3 * small, (small, large)


def test_a_held_out_document_after_train_fills_up_is_still_packed(tmp_path, tok):
    """A train cap reached in the first document of a batch must not drop the named eval document
    later in the same batch (the chooser has already seen it when train fills up)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in CORPUS.items():
        (corpus / name).write_text(text)
    cfg = load_config(None, [f'data.source="{corpus}"', f'cache.dir="{tmp_path / "c"}"', "data.seq_len=16",
                             'data.eval_documents=["omega.txt"]', "data.max_train_tokens=32"])
    plan = ensure_plan(cfg, tok, show_progress=False)
    assert plan.count["train"] == 2 and plan.count["eval"] > 0
    text = plan.rows_of(2, 3).text.to_pylist()[0]
    assert text in CORPUS["omega.txt"]
