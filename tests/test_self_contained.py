"""A cache is self-contained: it carries the teacher's tokenizer (checksummed like every other
file) and every fact stage 2 needs, so a copy trains students with the teacher gone; an older
cache without the tokenizer is refused in one line and healed by rerunning stage 1; a run's
config.toml records the cache's real teacher and data; the arrays describe themselves."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import zarr

from conftest import stage1_overrides, stage2_overrides
from pipeline.cache import CacheReader
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from pipeline.errors import CacheError
from pipeline.fingerprint import tokenizer_hash
from pipeline.cache.verify import verify_cache
from pipeline.tomlcompat import tomllib
from stage1_teacher_cache.run import cache_teacher
from stage2_student_train.student import load_teacher_tokenizer
from stage2_student_train.train import train

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only


def tokenizer_records(root: Path) -> dict:
    manifest = json.loads((root / "manifest.json").read_text())
    return {k: v for k, v in manifest["files"].items() if k.startswith("tokenizer/")}


@pytest.fixture(scope="module")
def moved_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> tuple[Path, Path]:
    """A sqrt8 cache built from a private copy of the tiny teacher, copied elsewhere; then the
    teacher and the original cache are deleted. Returns (the copy, the deleted teacher's path)."""
    work = tmp_path_factory.mktemp("moved")
    teacher = work / "teacher"
    shutil.copytree(tiny_teacher_dir, teacher)
    built = work / "built" / "cache"
    cache_teacher(load_config(None, stage1_overrides(teacher, corpus_dir, built, **{
        "cache.topk_encoding": "sqrt8", "cache.pilot_sequences": 2})), show_progress=False)
    copy = work / "elsewhere" / "cache"
    shutil.copytree(built, copy)
    shutil.rmtree(teacher)
    shutil.rmtree(built)
    return copy, teacher


def test_the_cache_carries_the_teacher_tokenizer_checksummed(moved_cache):
    cache, _ = moved_cache
    recs = tokenizer_records(cache)
    assert recs and all(rel.startswith("tokenizer/") for rel in recs)
    on_disk = {f"tokenizer/{p.relative_to(cache / 'tokenizer').as_posix()}" for p in (cache / "tokenizer").rglob("*")
               if p.is_file()}
    assert set(recs) == on_disk
    reader = CacheReader(cache)
    tok = load_teacher_tokenizer(reader)
    assert tokenizer_hash(tok) == reader.fingerprint["tokenizer_hash"]
    assert reader.manifest["tokenizer"]["hash"] == reader.fingerprint["tokenizer_hash"]
    assert verify_cache(cache).ok


def test_every_fact_stage2_needs_is_in_the_cache(moved_cache):
    reader = CacheReader(moved_cache[0])
    tok = load_teacher_tokenizer(reader)
    facts, fp, spec = reader.spec.teacher, reader.fingerprint, reader.spec
    assert facts["eos_token_id"] == tok.eos_token_id
    assert "final_logit_softcapping" in facts
    assert spec.vocab_size >= len(tok) and spec.seq_len == 32
    for key in ("tokenizer_hash", "doc_separator", "seq_len", "top_k", "teacher", "dataset"):
        assert key in fp, key
    assert "head_check_max_diff" in reader.manifest["summary"]


def test_a_copied_cache_trains_with_the_teacher_gone(moved_cache, smollm2_tokenizer_dir, tmp_path):
    cache, teacher = moved_cache
    assert not teacher.exists()
    short = {"train.steps": 2, "train.warmup_steps": 1, "train.eval_every": 2}
    same = train(load_config(None, stage2_overrides(cache, tmp_path, "same", **short)), show_progress=False)
    assert same["step"] == 2 and not same["cross_tokenizer"]
    cross = train(load_config(None, stage2_overrides(cache, tmp_path, "cross", **short, **{
        "student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "mapped"})), show_progress=False)
    assert cross["step"] == 2 and cross["cross_tokenizer"]


def test_the_run_config_records_the_cache_teacher_and_data(moved_cache, tmp_path):
    cache, teacher = moved_cache
    one = {"train.steps": 1, "train.warmup_steps": 0, "train.eval_every": 1}
    train(load_config(None, stage2_overrides(cache, tmp_path, "cfg", **one)), show_progress=False)
    saved = tomllib.loads((tmp_path / "cfg" / "config.toml").read_text())
    fp = CacheReader(cache).fingerprint
    defaults = load_config(None, [])
    assert saved["teacher"]["model"] == str(teacher) != defaults.teacher.model
    assert saved["teacher"]["dtype"] == fp["teacher_dtype"] == "float32"
    assert saved["data"]["source"] == fp["dataset"] != defaults.data.source
    assert saved["data"]["seq_len"] == 32 != defaults.data.seq_len
    assert saved["data"]["eval_documents"] == ["omega.txt"]
    assert saved["cache"]["top_k"] == 8 and saved["cache"]["topk_encoding"] == "sqrt8"
    assert saved["cache"]["dir"] == str(cache)
    load_config(tmp_path / "cfg" / "config.toml")  # still a valid config


def test_an_older_cache_is_refused_in_one_line_and_healed_by_stage1(tiny_cache, tiny_teacher_dir, corpus_dir,
                                                                     tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / "manifest.json").read_text())
    markers = {p.name: p.read_bytes() for p in (old / "done").iterdir()}
    for rel in tokenizer_records(old):
        del manifest["files"][rel]
    manifest.pop("tokenizer")
    manifest.pop("digest", None)  # an older version wrote no digest either (nor a cache_id)
    manifest.pop("cache_id", None)
    (old / "manifest.json").write_text(json.dumps(manifest))
    shutil.rmtree(old / "tokenizer")
    assert not verify_cache(old).ok
    argv = ["train-student", *stage2_overrides(old, tmp_path / "runs", "r", **{"train.steps": 1,
                                                                               "train.warmup_steps": 0})]
    capsys.readouterr()
    assert cli_main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and re.search(r"no copy of the teacher tokenizer.*rerun cache-teacher with the same "
                                       r"config to add it", err[0]), err
    # Stage 1 rerun with the same config: the tokenizer is added, no shard is redone.
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, old,
                                                     **{"cache.store_head": True})), show_progress=False)
    assert tokenizer_records(old) and verify_cache(old).ok
    assert {p.name: p.read_bytes() for p in (old / "done").iterdir()} == markers
    assert load_teacher_tokenizer(CacheReader(old)).eos_token_id is not None


def test_a_damaged_tokenizer_file_is_named_and_rewritten(tiny_cache, tiny_teacher_dir, corpus_dir, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache, cache)
    victim = cache / "tokenizer" / "tokenizer.json"
    victim.write_bytes(victim.read_bytes()[:-10] + b"0123456789")
    report = verify_cache(cache)
    assert not report.ok and any(d.startswith("tokenizer/tokenizer.json") for d in report.damaged)
    with pytest.raises(CacheError, match=r"tokenizer/tokenizer.json \(the teacher tokenizer\) is corrupt"):
        load_teacher_tokenizer(CacheReader(cache))
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache,
                                                     **{"cache.store_head": True})), show_progress=False)
    assert verify_cache(cache).ok
    load_teacher_tokenizer(CacheReader(cache))



def test_arrays_and_group_describe_themselves(tiny_cache):
    group = zarr.open_group(str(tiny_cache / "arrays.zarr"), mode="r")
    assert group.attrs["schema_version"] == 3 and group.attrs["format_doc"] == "docs/cache-format.md"
    assert (Path(__file__).resolve().parents[1] / group.attrs["format_doc"]).is_file()
    names = [name for name, _ in group.arrays()]
    assert {"input_ids", "topk_ids", "topk_logprobs", "logz", "hidden", "head"} <= set(names)
    for name in names:
        attrs = dict(group[name].attrs)
        for key in ("description", "units", "encoding", "decode", "dtype_note", "dims"):
            assert attrs.get(key), (name, key)
        assert len(attrs["dims"]) == group[name].ndim, name
    assert group["logz"].attrs["units"] == "nats" and group["topk_logprobs"].attrs["units"] == "nats"
