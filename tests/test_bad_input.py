"""The bad-input catalogue: every case ends at the CLI boundary with exit code 2, ONE line
`error: ...` naming the problem and what to do, no traceback, and the files already on disk
unchanged. Runs the real CLI entry point in-process (same code path as `python -m pipeline`)."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import stage1_overrides, stage2_overrides
from pipeline.cache import CacheReader, file_crc32
from pipeline.cli import main as cli_main


def snapshot(*roots: Path) -> dict[str, bytes]:
    out = {}
    for root in roots:
        if root.exists():
            out.update({str(p): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})
    return out


def run(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_refused(capsys, argv, pattern: str, *watched: Path) -> str:
    before = snapshot(*watched)
    code, err = run(capsys, *argv)
    assert code == 2, err
    import re
    # Progress bars (tqdm, on stderr, redrawn with \r) may precede the message; the message
    # itself is one line, the last thing printed.
    pieces = [p.strip() for p in re.split(r"[\r\n]", err) if p.strip()]
    errors = [p for p in pieces if p.startswith("error: ")]
    assert len(errors) == 1 and pieces[-1] == errors[0], err
    assert "Traceback" not in err
    lines = errors
    assert re.search(pattern, lines[0]), lines[0]
    assert snapshot(*watched) == before, "a refused command changed files on disk"
    return lines[0]


@pytest.fixture()
def cache_copy(tiny_cache, tmp_path) -> Path:
    dst = tmp_path / "cache"
    shutil.copytree(tiny_cache, dst)
    return dst


@pytest.fixture(scope="module")
def finished_run(tiny_cache, tmp_path_factory) -> Path:
    from pipeline.config import load_config
    from stage2_student_train.train import train

    runs = tmp_path_factory.mktemp("runs")
    train(load_config(None, stage2_overrides(tiny_cache, runs, "done", **{"train.steps": 2, "train.warmup_steps": 0,
                                                                           "train.save_every": 1})),
          show_progress=False)
    return runs / "done"


def train_args(cache, runs, name="r", **extra):
    return ["train-student", *stage2_overrides(cache, runs, name, **{"train.steps": 2, "train.warmup_steps": 0, **extra})]


# -- caches -----------------------------------------------------------------------------------


def test_missing_cache(capsys, tmp_path):
    assert_refused(capsys, ["inspect", tmp_path / "nope"], r"cache .*nope does not exist; build it with cache-teacher")
    assert_refused(capsys, train_args(tmp_path / "nope", tmp_path / "runs"), r"does not exist")


def test_cache_shard_file_deleted(capsys, cache_copy, tmp_path):
    (cache_copy / "meta" / "shard-00001.arrow").unlink()
    assert_refused(capsys, train_args(cache_copy, tmp_path / "runs"), r"shard-00001.arrow of shard 1 is missing; delete",
                   cache_copy)


def test_cache_shard_bytes_corrupted(capsys, cache_copy, tmp_path):
    victim = cache_copy / "arrays.zarr" / "input_ids" / "c" / "2" / "0"
    data = bytearray(victim.read_bytes())
    data[len(data) // 3] ^= 0x5A
    victim.write_bytes(bytes(data))
    assert_refused(capsys, train_args(cache_copy, tmp_path / "runs"), r"input_ids.*shard 2 is corrupt", cache_copy)


def test_manifest_truncated(capsys, cache_copy, tmp_path):
    m = cache_copy / "manifest.json"
    m.write_text(m.read_text()[:100])
    assert_refused(capsys, ["inspect", cache_copy], r"manifest.json is unreadable.*overwrite=true", cache_copy)
    assert_refused(capsys, train_args(cache_copy, tmp_path / "runs"), r"unreadable", cache_copy)


def test_manifest_of_another_schema_version(capsys, cache_copy):
    m = cache_copy / "manifest.json"
    obj = json.loads(m.read_text())
    obj["schema_version"] = 1
    m.write_text(json.dumps(obj))
    assert_refused(capsys, ["inspect", cache_copy], r"schema version 1, this tool reads versions 2, 3; rebuild", cache_copy)


@pytest.mark.parametrize("change, named", [
    ({"data.seq_len": 16}, r"seq_len: cache has 32, now 16"),
    ({"cache.top_k": 4}, r"top_k: cache has 8, now 4"),
    ({"data.eval_documents": ["alpha.txt"]}, r"dataset_hash: cache has"),
])
def test_cache_built_from_other_inputs_is_refused(capsys, cache_copy, tiny_teacher_dir, corpus_dir, change, named):
    argv = ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, cache_copy,
                                               **{"cache.store_head": True, **change})]
    assert_refused(capsys, argv, named + r".*cache.overwrite=true", cache_copy)


def test_cache_of_another_tokenizer_is_refused(capsys, cache_copy, tiny_teacher_dir, corpus_dir, smollm2_tokenizer_dir,
                                               tmp_path):
    other = tmp_path / "teacher-other-tok"
    shutil.copytree(tiny_teacher_dir, other)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_tokenizer_dir / f, other / f)
    argv = ["cache-teacher", *stage1_overrides(other, corpus_dir, cache_copy, **{"cache.store_head": True})]
    assert_refused(capsys, argv, r"tokenizer_hash: cache has .* now ", cache_copy)


def test_a_directory_that_is_not_a_cache_is_not_touched(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    precious = tmp_path / "mine"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    assert_refused(capsys, ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, precious)],
                   r"not empty and holds no cache manifest", precious)


def test_overwrite_never_deletes_a_directory_that_is_not_a_cache(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "thesis.txt").write_text("years of work")
    argv = ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, precious, **{"cache.overwrite": True})]
    assert_refused(capsys, argv, r"is not a cache .*only replaces caches", precious)


def test_nan_in_a_cached_tensor_is_reported_with_its_sequence(capsys, cache_copy, tmp_path):
    import zarr

    victim = CacheReader(cache_copy).split_indices("eval")[0]  # every eval reads it
    arr = zarr.open_group(str(cache_copy / "arrays.zarr"), mode="r+")["logz"]
    values = arr[victim:victim + 1]
    values[0, 3] = np.nan
    arr[victim:victim + 1] = values  # as if the teacher had produced it: re-seal the shard's checksums
    marker = cache_copy / "done" / f"shard-{victim // 4:05d}.json"
    obj = json.loads(marker.read_text())
    for rel in obj["files"]:
        obj["files"][rel] = {"bytes": (cache_copy / rel).stat().st_size, "crc32": file_crc32(cache_copy / rel)}
    marker.write_text(json.dumps(obj))
    assert_refused(capsys, train_args(cache_copy, tmp_path / "runs"), rf"logz of sequence {victim} holds NaN/Inf",
                   cache_copy)


def test_incomplete_cache_cannot_train(capsys, cache_copy, tmp_path):
    (cache_copy / "done" / "shard-00002.json").unlink()
    assert_refused(capsys, train_args(cache_copy, tmp_path / "runs"), r"incomplete: 1 of \d+ shards.*rerun cache-teacher",
                   cache_copy)


@pytest.mark.slow  # runs stage 1 and stage 2
def test_union_mode_needs_the_stored_head(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path / "nohead"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache)), show_progress=False)
    assert_refused(capsys, train_args(cache, tmp_path / "runs", **{"kd.mode": "union"}),
                   r"union needs the teacher head.*store_head=true", cache)
    assert not (tmp_path / "runs" / "r").exists()  # a refused run leaves no run directory behind
    # Following the message works: the head is added to the complete cache, then union trains.
    assert run(capsys, "cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, cache,
                                                          **{"cache.store_head": True}))[0] == 0
    assert CacheReader(cache).head() is not None
    assert run(capsys, *train_args(cache, tmp_path / "runs", **{"kd.mode": "union"}))[0] == 0


# -- checkpoints and runs ---------------------------------------------------------------------


def test_checkpoint_path_that_does_not_exist(capsys, tmp_path):
    assert_refused(capsys, ["resume", tmp_path / "runs" / "x" / "checkpoints" / "step-00000009"],
                   r"checkpoint .* does not exist; give a directory like")


def test_checkpoint_of_another_run(capsys, finished_run, tmp_path):
    moved = tmp_path / "elsewhere"
    shutil.copytree(finished_run, moved)
    assert_refused(capsys, ["resume", moved / "checkpoints" / "step-00000002"],
                   r"belongs to run directory .*done", moved, finished_run)


def test_checkpoint_against_another_cache(capsys, finished_run, cache_copy):
    other = cache_copy  # same content, but a different fingerprint once we change the dataset hash
    m = other / "manifest.json"
    obj = json.loads(m.read_text())
    obj["spec"]["fingerprint"]["dataset_hash"] = "0" * 16
    from pipeline.cache.files import DIGEST, manifest_digest
    obj[DIGEST] = manifest_digest(obj)  # another cache, not an edited one: its digest matches
    m.write_text(json.dumps(obj))
    ckpt = finished_run / "checkpoints" / "step-00000002"
    assert_refused(capsys, ["resume", ckpt, f"cache.dir={json.dumps(str(other))}"],
                   r"trained on another cache \(dataset_hash", finished_run)


def test_damaged_checkpoint(capsys, finished_run, tmp_path):
    runs = tmp_path / "runs"
    shutil.copytree(finished_run, runs / "done")
    ckpt = runs / "done" / "checkpoints" / "step-00000002"
    (ckpt / "state.pt").write_bytes(b"not a checkpoint")
    assert_refused(capsys, ["resume", ckpt, f"run.runs_dir={json.dumps(str(runs))}"],
                   r"checkpoint .* is damaged .*pick an older one", runs)


def test_existing_run_directory_is_not_overwritten(capsys, finished_run, tiny_cache):
    assert_refused(capsys, train_args(tiny_cache, finished_run.parent, "done"),
                   r"run directory .* already exists; resume it", finished_run)


# -- config and data ----------------------------------------------------------------------------


@pytest.mark.parametrize("override, pattern", [
    ("cache.topk=4", r"unknown config key 'cache.topk'; did you mean cache.top_k\?"),
    ("train.stepz=4", r"unknown config key 'train.stepz'; did you mean train.steps\?"),
    ("train.steps=many", r"'train.steps' must be int, got str 'many'"),
    ("train.lr=[1]", r"'train.lr' must be float, got list"),
    ("train.batch_size=-2", r"'train.batch_size' must be > 0, got -2"),
    ("data.seq_len=0", r"'data.seq_len' must be > 0, got 0"),
    ("cache.top_k=0", r"'cache.top_k' must be > 0, got 0"),
    ("kd.mode=forward_kl", r"kd.mode='forward_kl' is not a KD mode \(choose from none, topk_tail"),
])
def test_bad_config_values(capsys, tmp_path, override, pattern):
    assert_refused(capsys, ["train-student", override], pattern)


def test_config_file_missing_or_invalid(capsys, tmp_path):
    assert_refused(capsys, ["show-config", "--config", tmp_path / "none.toml"], r"none.toml does not exist")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3\n")
    assert_refused(capsys, ["show-config", "--config", bad], r"is not valid TOML")


def test_top_k_larger_than_the_vocabulary(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    assert_refused(capsys, ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c",
                                                               **{"cache.top_k": 60000})],
                   r"cache.top_k=60000 exceeds the teacher's vocabulary \(50257\)")
    assert not (tmp_path / "c").exists()


def test_empty_dataset(capsys, tiny_teacher_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("\n  \n")
    assert_refused(capsys, ["cache-teacher", *stage1_overrides(tiny_teacher_dir, empty, tmp_path / "c")],
                   r"holds no non-empty text")
    assert not (tmp_path / "c").exists()


def test_unknown_eval_document_and_unsupported_file(capsys, tiny_teacher_dir, corpus_dir, tmp_path):
    assert_refused(capsys, ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c",
                                                               **{"data.eval_documents": ["omegaa.txt"]})],
                   r"'omegaa.txt'.*did you mean 'omega.txt'")
    csv = tmp_path / "d.csv"
    csv.write_text("text\nhello\n")
    assert_refused(capsys, ["cache-teacher", *stage1_overrides(tiny_teacher_dir, csv, tmp_path / "c")],
                   r"unsupported type; use .txt, .jsonl or .parquet")


def test_a_document_longer_than_seq_len_is_packed_not_refused(tiny_teacher_dir, tmp_path):
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "long.txt").write_text("a long line of words " * 400)
    (docs / "z.txt").write_text("held out text " * 50)
    info = cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, docs, tmp_path / "c",
                                                            **{"data.eval_documents": ["z.txt"]})),
                         show_progress=False)
    assert info["complete"] and info["splits"]["train"] > 10  # one document, many sequences


# -- the machine --------------------------------------------------------------------------------


@pytest.mark.slow  # runs stage 1, fails it, and reruns it
def test_disk_full_while_writing_keeps_committed_shards(capsys, tiny_teacher_dir, corpus_dir, tmp_path, monkeypatch):
    from pipeline import cache as cache_module

    real = cache_module.CacheWriter.write_shard
    calls = {"n": 0}

    def fills_the_disk(self, shard, *args, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "arrays.zarr"))
        return real(self, shard, *args, **kw)

    monkeypatch.setattr(cache_module.CacheWriter, "write_shard", fills_the_disk)
    argv = ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "c")]
    code, err = run(capsys, *argv)
    assert code == 2 and err.splitlines()[-1].startswith("error: disk full while writing")
    committed = CacheReader(tmp_path / "c")
    assert len(committed._markers) == 2 and not committed.complete
    monkeypatch.setattr(cache_module.CacheWriter, "write_shard", real)
    assert run(capsys, *argv)[0] == 0  # space is back: the rerun finishes the cache
    assert CacheReader(tmp_path / "c").complete


def test_read_only_output_directory(capsys, tiny_teacher_dir, corpus_dir, tmp_path, monkeypatch):
    import pathlib

    real_mkdir = pathlib.Path.mkdir

    def read_only(self, *a, **kw):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **kw)

    monkeypatch.setattr(pathlib.Path, "mkdir", read_only)
    assert_refused(capsys, ["cache-teacher", *stage1_overrides(tiny_teacher_dir, corpus_dir, tmp_path / "ro" / "c")],
                   r"cannot write .*ro.*Read-only file system; choose a writable directory")
