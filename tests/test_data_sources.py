"""Every kind of data.source stage 1 accepts, read as a stream, and the one-line errors for bad
ones. Real files: datasets.save_to_disk folders, parquet, JSON lines, globs, and the streaming
hub code path driven by a local dataset folder."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import CORPUS, stage1_overrides
from pipeline.config import DataConfig, load_config
from pipeline.errors import DataError
from stage1_teacher_cache.documents import load_documents
from stage1_teacher_cache.sources import Source, _hub_rows

ROWS = [f"row {i}: " + "some words of text " * (i % 4 + 1) for i in range(23)]


def names_texts(cfg: DataConfig):
    return [(d.name, d.text) for d in load_documents(cfg)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))


def write_parquet(path, texts, field="text", row_group_size=5):
    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path, row_group_size=row_group_size)


def test_save_to_disk_dataset_and_dataset_dict(tmp_path):
    ds = datasets.Dataset.from_dict({"text": ROWS + [""], "n": list(range(len(ROWS) + 1))})
    ds.save_to_disk(str(tmp_path / "single"))
    got = names_texts(DataConfig(source=str(tmp_path / "single"), eval_fraction=0))
    assert got == [(f"row-{i}", t) for i, t in enumerate(ROWS)]
    # A filtered/selected dataset is saved flattened; a DatasetDict is read at data.split.
    datasets.DatasetDict({"train": ds.select(range(5, 15)), "test": ds.select([1, 2])}).save_to_disk(str(tmp_path / "dd"))
    assert [t for _, t in names_texts(DataConfig(source=str(tmp_path / "dd"), split="test"))] == ROWS[1:3]
    assert [t for _, t in names_texts(DataConfig(source=str(tmp_path / "dd")))] == ROWS[5:15]
    with pytest.raises(DataError, match=r"has no split 'validation' \(splits: \['train', 'test'\]\); set data.split"):
        load_documents(DataConfig(source=str(tmp_path / "dd"), split="validation"))
    with pytest.raises(DataError, match=r"saved dataset .* has no column 'body' \(columns: \['text', 'n'\]\)"):
        load_documents(DataConfig(source=str(tmp_path / "single"), text_field="body"))


def test_folder_of_parquet_and_of_jsonl_files(tmp_path):
    pq_dir, jl_dir = tmp_path / "pq", tmp_path / "jl"
    pq_dir.mkdir()
    jl_dir.mkdir()
    write_parquet(pq_dir / "b.parquet", ROWS[10:], field="body")
    write_parquet(pq_dir / "a.parquet", ROWS[:10], field="body")
    got = names_texts(DataConfig(source=str(pq_dir), text_field="body", eval_fraction=0))
    assert [t for _, t in got] == ROWS  # files in name order, rows in file order
    assert got[0][0] == "a.parquet-0" and got[10][0] == "b.parquet-0"
    write_jsonl(jl_dir / "part-1.jsonl", ROWS[:7])
    write_jsonl(jl_dir / "part-2.jsonl", ROWS[7:])
    assert [t for _, t in names_texts(DataConfig(source=str(jl_dir)))] == ROWS
    with pytest.raises(DataError, match=r"a.parquet has no column 'text' \(columns: \['body', 'id'\]\)"):
        load_documents(DataConfig(source=str(pq_dir)))


def test_a_text_column_named_like_a_chat_one_is_read_as_text(tmp_path):
    # data.text_field=messages: the column is text whenever format says text (explicitly, or auto
    # because text_field is a column), not a chat layout of the same name
    for suffix, write in ((".jsonl", write_jsonl), (".parquet", write_parquet)):
        path = tmp_path / f"a{suffix}"
        write(path, ROWS[:3], field="messages")
        for fmt in ("text", "auto"):
            cfg = DataConfig(source=str(path), text_field="messages", format=fmt, eval_fraction=0)
            assert [t for _, t in names_texts(cfg)] == ROWS[:3]


def test_glob_patterns(tmp_path):
    (tmp_path / "corpus" / "sub").mkdir(parents=True)
    write_jsonl(tmp_path / "corpus" / "x.jsonl", ROWS[:4])
    write_jsonl(tmp_path / "corpus" / "sub" / "y.jsonl", ROWS[4:9])
    (tmp_path / "corpus" / "sub" / "z.txt").write_text(CORPUS["alpha.txt"])
    (tmp_path / "corpus" / "notes.md").write_text("not data")
    got = names_texts(DataConfig(source=str(tmp_path / "corpus" / "**" / "*.jsonl"), eval_fraction=0))
    assert [n for n, _ in got][:2] == ["sub/y.jsonl-0", "sub/y.jsonl-1"] and [t for _, t in got] == ROWS[4:9] + ROWS[:4]
    mixed = names_texts(DataConfig(source=str(tmp_path / "corpus" / "sub" / "*"), eval_fraction=0))
    assert mixed[-1] == ("z.txt", CORPUS["alpha.txt"]) and len(mixed) == 6
    with pytest.raises(DataError, match=r"pattern .*\*.parquet' matches no file"):
        load_documents(DataConfig(source=str(tmp_path / "corpus" / "*.parquet")))
    with pytest.raises(DataError, match=r"matches .*notes.md, an unsupported type"):
        load_documents(DataConfig(source=str(tmp_path / "corpus" / "*")))


def test_streaming_hub_path_with_a_local_dataset(tmp_path):
    """The hub code path (datasets.load_dataset(..., streaming=True)) on a local dataset folder:
    the same calls a hub id makes, without the network."""
    repo = tmp_path / "repo"
    repo.mkdir()
    write_parquet(repo / "train-00000.parquet", ROWS[:12])
    write_parquet(repo / "train-00001.parquet", ROWS[12:])
    cfg = DataConfig(source=str(repo), split="train")
    rows = list(_hub_rows(cfg))
    assert rows == [(f"row-{i}", t) for i, t in enumerate(ROWS)]
    with pytest.raises(DataError, match=r"dataset .* has no column 'body' \(columns: \['text', 'id'\]\)"):
        list(_hub_rows(DataConfig(source=str(repo), text_field="body")))
    with pytest.raises(DataError, match=r"cannot load dataset 'nobody/no-such-dataset-x1'"):
        load_documents(DataConfig(source="nobody/no-such-dataset-x1"))
    assert Source(DataConfig(source="nobody/no-such-dataset-x1")).kind == "hub"


def test_bad_sources_are_one_line_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.md").write_text("no data here")
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "fine"}\n{"text": oops}\n')
    not_obj = tmp_path / "list.jsonl"
    not_obj.write_text('["a", "b"]\n')
    array_with_null = tmp_path / "array.json"
    array_with_null.write_text('[{"text": "one"}, null, {"text": "three"}]')
    fake_pq = tmp_path / "fake.parquet"
    fake_pq.write_bytes(b"not parquet at all")
    cases = [
        (empty, r"directory .*empty holds no .txt, .jsonl, .json or .parquet files"),
        (tmp_path / "nothing-*.jsonl", r"matches no file"),
        (bad_json, r"bad.jsonl line 2 is not valid JSON"),
        (not_obj, r"list.jsonl line 1 is not a JSON object"),
        (array_with_null, r"array.json row 1 is not a JSON object"),  # never dropped, the right row named
        (fake_pq, r"fake.parquet is not a readable parquet file"),
    ]
    for source, pattern in cases:
        with pytest.raises(DataError, match=pattern) as e:
            load_documents(DataConfig(source=str(source)))
        assert "\n" not in str(e.value)


def test_cache_from_a_saved_dataset_end_to_end(tiny_teacher_dir, tmp_path):
    from pipeline.cache import CacheReader
    from stage1_teacher_cache.run import cache_teacher

    datasets.Dataset.from_dict({"text": [CORPUS[k] for k in sorted(CORPUS)]}).save_to_disk(str(tmp_path / "ds"))
    cfg = load_config(None, stage1_overrides(tiny_teacher_dir, tmp_path / "ds", tmp_path / "c",
                                             **{"data.eval_documents": [], "data.eval_fraction": 0.3}))
    info = cache_teacher(cfg, show_progress=False)
    reader = CacheReader(tmp_path / "c")
    assert info["complete"] and set(info["splits"]) == {"train", "eval"}
    docs = reader.documents().to_pylist()
    assert [d["name"] for d in docs] == [f"row-{i}" for i in range(5)]
    assert [d["split"] for d in docs] == ["train", "eval", "train", "train", "eval"]
    eval_docs = {d for i in reader.split_indices("eval") for d in reader.sequence(i).doc_id.tolist()}
    assert eval_docs <= {1, 4}
