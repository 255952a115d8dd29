"""Extending a complete cache: the teacher runs only on the added train sequences, what the cache
held is kept byte for byte, the result holds the same numbers as a cache built at the larger size,
a crash at any point of the extension resumes to the same cache, refusals damage nothing, and a
student trained on the smaller cache resumes bit-exactly on the prefix it saw."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file

from conftest import CORPUS, assert_same_cache, cache_files, stage1_overrides, stage2_overrides
from pipeline.cache import ARRAYS, DONE, CacheReader, CacheWriter
from pipeline.cache.verify import verify_cache
from pipeline.config import load_config
from pipeline.errors import CacheError, ConfigError, DataError, FingerprintMismatch
from stage1_teacher_cache.run import cache_teacher
from stage2_student_train.checkpoint import resume_config
from stage2_student_train.train import train

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

SEQ = 32
SMALL, LARGE = 9 * SEQ, 20 * SEQ  # train tokens: 9 + 6 eval = 15 sequences, the last shard of 4 partial
COMPARED = ("input_ids", "topk_ids", "topk_logprobs", "topk_log_tail", "logz", "next_logprob", "hidden")


def build(teacher: Path, corpus: Path, cache: Path, train_tokens: int, **extra) -> dict:
    cfg = load_config(None, stage1_overrides(teacher, corpus, cache, **{
        "data.max_train_tokens": train_tokens, "cache.topk_encoding": "sqrt8", "cache.samples": 4, **extra}))
    return cache_teacher(cfg, show_progress=False)


def stored(cache: Path, rows: int) -> dict[str, np.ndarray]:
    """The stored (encoded) arrays of the first ``rows`` sequences, read with plain zarr."""
    group = zarr.open_group(str(cache / ARRAYS), mode="r")
    return {name: group[name][:rows] for name, _ in group.arrays() if name not in ("rank_to_id", "head")}


@pytest.fixture(scope="module")
def small(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("extend") / "small"
    info = build(tiny_teacher_dir, corpus_dir, cache, SMALL)
    assert info["splits"] == {"train": 9, "eval": 6} and info["shards"] == 4
    return cache


@pytest.fixture(scope="module")
def fresh_large(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("extend") / "fresh"
    build(tiny_teacher_dir, corpus_dir, cache, LARGE)
    return cache


def extended_copy(small: Path, dest: Path, teacher: Path, corpus: Path) -> dict:
    shutil.copytree(small, dest)
    return build(teacher, corpus, dest, LARGE, **{"cache.extend": True})


def test_extension_keeps_the_cache_and_equals_a_cache_built_large(small, fresh_large, tiny_teacher_dir, corpus_dir,
                                                                  tmp_path, capsys):
    before_files, before_arrays = cache_files(small), stored(small, 15)
    info = extended_copy(small, tmp_path / "ext", tiny_teacher_dir, corpus_dir)
    out = capsys.readouterr().out
    assert "extending cache" in out and "11 train sequences after its 15" in out
    ext = tmp_path / "ext"
    assert info["complete"] and info["sequences"] == 26 and info["splits"] == {"train": 20, "eval": 6}
    assert info["extensions"] == 1

    # What the cache held: every stored value of the old rows, and the files of the full shards.
    after = stored(ext, 15)
    assert all(np.array_equal(before_arrays[k], after[k]) for k in before_arrays)
    after_files = cache_files(ext)
    full_shards = [rel for rel in before_files
                   if any(f"shard-0000{s}" in rel or f"/c/{s}/" in rel for s in range(3))]
    assert len(full_shards) > 3 * 3
    assert all(after_files[rel] == before_files[rel] for rel in full_shards)
    assert not verify_cache(ext).damaged

    # The same numbers as a cache built at the larger size from the start.
    a, b = CacheReader(ext), CacheReader(fresh_large)
    assert a.spec.splits == {"train": [[0, 9], [15, 26]], "eval": [[9, 15]]}
    assert b.spec.splits == {"train": [[0, 20]], "eval": [[20, 26]]}
    for split in ("train", "eval"):
        got = a.read_indices(a.split_indices(split), COMPARED)
        want = b.read_indices(b.split_indices(split), COMPARED)
        for name in COMPARED:
            assert np.array_equal(got[name], want[name]), (split, name)
        assert [a.text(int(i))[0] for i in a.split_indices(split)] == [b.text(int(i))[0] for i in b.split_indices(split)]
    # Sampled tokens are seeded by the cache index: the kept rows keep theirs.
    old = CacheReader(small).read_range(0, 15, ("draw_ids", "draw_counts"))
    new = a.read_range(0, 15, ("draw_ids", "draw_counts"))
    assert all(np.array_equal(old[k], new[k]) for k in old)
    # The summary sums shards, kept rows included: the same statistics as the large cache.
    assert a.info()["topk_mass_mean"] == pytest.approx(b.info()["topk_mass_mean"], rel=1e-9)
    assert a.info()["teacher_eval_ppl"] == pytest.approx(b.info()["teacher_eval_ppl"], rel=1e-12)
    assert a.spec.generations[0]["train_sequences"] == 9
    assert a.spec.generations[0]["fingerprint"] == CacheReader(small).fingerprint

    # A rerun with the same config has nothing left to do.
    build(tiny_teacher_dir, corpus_dir, ext, LARGE, **{"cache.extend": True})
    assert "stage 1 skipped" in capsys.readouterr().out


@pytest.mark.parametrize("crash_after", [0, 1, "marker-left"])
def test_a_crash_during_an_extension_resumes_to_the_same_cache(small, tiny_teacher_dir, corpus_dir, tmp_path,
                                                             monkeypatch, crash_after):
    reference = tmp_path / "reference"
    extended_copy(small, reference, tiny_teacher_dir, corpus_dir)

    victim = tmp_path / "victim"
    shutil.copytree(small, victim)
    boundary_marker = (victim / DONE / "shard-00003.json").read_bytes()
    written = []
    real = CacheWriter.write_shard

    def crashing(self, shard, *args, **kw):
        if len(written) == (0 if crash_after == "marker-left" else crash_after):
            raise KeyboardInterrupt("simulated kill")
        written.append(shard)
        return real(self, shard, *args, **kw)

    monkeypatch.setattr(CacheWriter, "write_shard", crashing)
    with pytest.raises(KeyboardInterrupt):
        build(tiny_teacher_dir, corpus_dir, victim, LARGE, **{"cache.extend": True})
    monkeypatch.setattr(CacheWriter, "write_shard", real)
    if crash_after == "marker-left":  # killed after the manifest was written, before the marker went
        (victim / DONE / "shard-00003.json").write_bytes(boundary_marker)
    with pytest.raises(CacheError, match="incomplete"):
        CacheReader(victim).require_complete()
    build(tiny_teacher_dir, corpus_dir, victim, LARGE, **{"cache.extend": True})
    assert_same_cache(victim, reference)


def test_refusals_name_the_problem_and_damage_nothing(small, tiny_teacher_dir, corpus_dir, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(small, cache)
    before = cache_files(cache) | {"manifest.json": (cache / "manifest.json").read_bytes()}

    def refused(error, pattern, corpus=corpus_dir, tokens=LARGE, **extra):
        with pytest.raises(error, match=pattern):
            build(tiny_teacher_dir, corpus, cache, tokens, **extra)
        assert cache_files(cache) | {"manifest.json": (cache / "manifest.json").read_bytes()} == before

    refused(FingerprintMismatch, r"max_train_tokens: cache has 288, now 640.*add cache\.extend=true")
    refused(FingerprintMismatch, r"other inputs.*top_k: cache has 8, now 4",
            **{"cache.extend": True, "cache.top_k": 4})
    refused(DataError, r"held-out set.*6 eval sequences, the new plan 3.*max_eval_tokens=192",
            **{"cache.extend": True, "data.max_eval_tokens": 3 * SEQ})
    refused(DataError, "nothing to extend", tokens=SMALL + SEQ - 1, **{"cache.extend": True})
    reordered = tmp_path / "reordered"
    reordered.mkdir()
    for name, text in CORPUS.items():
        (reordered / name).write_text(text, encoding="utf-8")
    (reordered / "aardvark.txt").write_text("A new first document that shifts every sequence.\n" * 20)
    refused(DataError, "no longer starts with what cache", corpus=reordered, **{"cache.extend": True})
    with pytest.raises(ConfigError, match="cache.extend"):
        load_config(None, ["cache.extend=true", "cache.overwrite=true"])


def test_the_cli_refuses_an_extension_in_one_line(small, tiny_teacher_dir, corpus_dir, tmp_path, capsys):
    from pipeline.cli import main as cli_main

    cache = tmp_path / "c"
    shutil.copytree(small, cache)
    args = stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{
        "data.max_train_tokens": LARGE, "cache.topk_encoding": "sqrt8", "cache.samples": 4})
    capsys.readouterr()
    assert cli_main(["cache-teacher", *args]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]  # not the progress bar
    assert len(errors) == 1 and errors[0].startswith("error: ") and "cache.extend=true" in errors[0]
    assert "Traceback" not in "".join(errors)


def test_more_files_extend_the_cache(tiny_teacher_dir, corpus_dir, tmp_path):
    corpus = tmp_path / "corpus"
    shutil.copytree(corpus_dir, corpus)
    cache = tmp_path / "c"
    build(tiny_teacher_dir, corpus, cache, 0)
    n = CacheReader(cache).spec.split_sizes()["train"]
    (corpus / "zeta.txt").write_text("Out, damned spot! out, I say! One: two: why, then, 'tis time to do't.\n" * 12)
    info = build(tiny_teacher_dir, corpus, cache, 0, **{"cache.extend": True})
    reader = CacheReader(cache)
    assert info["splits"]["train"] > n and info["splits"]["eval"] == 6
    last = int(reader.split_indices("train")[-1])
    assert "Out, damned spot" in reader.text(last)[0]
    assert "zeta.txt" in reader.documents().column("name").to_pylist()


def test_a_student_resumes_on_the_prefix_it_saw(small, tiny_teacher_dir, corpus_dir, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(small, cache)
    runs = tmp_path / "runs"
    # Reference: the whole run on the unextended cache (a copy, at another path).
    unextended = tmp_path / "unextended"
    shutil.copytree(small, unextended)
    train(load_config(None, stage2_overrides(unextended, runs, "reference")), show_progress=False)

    train(load_config(None, stage2_overrides(cache, runs, "run", **{"train.stop_after": 2})), show_progress=False)
    build(tiny_teacher_dir, corpus_dir, cache, LARGE, **{"cache.extend": True})
    ckpt = runs / "run" / "checkpoints" / "step-00000002"
    train(resume_config(ckpt, ["train.stop_after=0"]), resume_from=ckpt, show_progress=False)

    final = load_file(runs / "run" / "final" / "student" / "model.safetensors")
    want = load_file(runs / "reference" / "final" / "student" / "model.safetensors")
    assert final.keys() == want.keys() and all(torch.equal(final[k], want[k]) for k in final)
    state = torch.load(runs / "run" / "checkpoints" / "step-00000006" / "state.pt", weights_only=False)
    assert state["cache_train_sequences"] == 9
    assert state["cache_fingerprint"] == CacheReader(small).fingerprint

    # A new run on the extended cache trains on all 20 train sequences.
    train(load_config(None, stage2_overrides(cache, runs, "new", **{"train.steps": 2, "train.warmup_steps": 1})), show_progress=False)
    state = torch.load(runs / "new" / "checkpoints" / "step-00000002" / "state.pt", weights_only=False)
    assert state["cache_train_sequences"] == 20
    card = (runs / "new" / "final" / "student" / "README.md").read_text()
    assert "| cache train sequences | 20 |" in card
    assert json.loads((runs / "new" / "summary.json").read_text())["step"] == 2


def test_a_shard_across_segments_is_rebuilt_after_an_extension(small, tiny_teacher_dir, corpus_dir, tmp_path):
    """After an extension, shards holding rows of two segments (train and eval; eval and the new
    train) map to rows that are not adjacent in the plan: deleting their markers, as `inspect
    --verify` advises for a damaged shard, and rerunning rebuilds the same bytes. So does an old
    shard whose marker goes missing while the extension is unfinished."""
    reference = tmp_path / "reference"
    extended_copy(small, reference, tiny_teacher_dir, corpus_dir)
    cache = tmp_path / "c"
    shutil.copytree(reference, cache)
    spanning = [2, 3]  # rows 8-11 (train 8, eval 9-11) and 12-15 (eval 12-14, new train 15)
    for s in spanning:
        (cache / DONE / f"shard-0000{s}.json").unlink()
    build(tiny_teacher_dir, corpus_dir, cache, LARGE, **{"cache.extend": True})
    # Shard 3 grew in the extension: its statistics were summed in two parts then, in one now
    # (the last bits of the float sums may differ); every other byte is the same.
    got, want = cache_files(cache), cache_files(reference)
    marker = "done/shard-00003.json"
    assert {k: v for k, v in got.items() if k != marker} == {k: v for k, v in want.items() if k != marker}
    got_m, want_m = json.loads(got[marker]), json.loads(want[marker])
    assert got_m["files"] == want_m["files"] and got_m["stats"].keys() == want_m["stats"].keys()
    assert all(got_m["stats"][k] == pytest.approx(want_m["stats"][k], rel=1e-9) for k in got_m["stats"])

    victim = tmp_path / "victim"
    shutil.copytree(small, victim)
    real = CacheWriter.write_shard

    def killed(self, shard, *args, **kw):
        raise KeyboardInterrupt("simulated kill")

    CacheWriter.write_shard = killed
    try:
        with pytest.raises(KeyboardInterrupt):
            build(tiny_teacher_dir, corpus_dir, victim, LARGE, **{"cache.extend": True})
    finally:
        CacheWriter.write_shard = real
    (victim / DONE / "shard-00000.json").unlink()  # an old, full shard found damaged meanwhile
    build(tiny_teacher_dir, corpus_dir, victim, LARGE, **{"cache.extend": True})
    assert_same_cache(victim, reference)
