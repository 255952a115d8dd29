"""Reliability of the cache and of stage 1 under misuse and faults: overwrite deletes only caches,
every array is checksummed (``inspect --verify`` names the damage), repair advice heals, two
writers never mix, NaN is never committed. Real processes and real signals where it matters;
kills wait on events (a file appearing or vanishing), never on sleeps."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, assert_same_cache, stage1_overrides, stage2_overrides
from pipeline.cache import CacheReader, CacheWriter
from pipeline.cli import main as cli_main
from pipeline.errors import CacheError

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

ENV = dict(os.environ, PYTHONPATH=str(REPO))


def cli(*argv, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, argv)], cwd=REPO, capture_output=True,
                          text=True, env=ENV, **kw)


def start(*argv) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, argv)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)


def one_line_error(r: subprocess.CompletedProcess, pattern: str) -> str:
    import re
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    last = [p.strip() for p in re.split(r"[\r\n]", r.stderr) if p.strip()][-1]
    assert last.startswith("error: ") and re.search(pattern, last), last
    return last


def wait_for(proc: subprocess.Popen, event, timeout: float = 300) -> bool:
    """Spin until ``event()`` holds (True) or the process ends first (False)."""
    deadline = time.time() + timeout
    while not event():
        if proc.poll() is not None or time.time() > deadline:
            return False
    return True


def stage1(teacher: Path, corpus: Path, cache: Path, **extra) -> list[str]:
    return ["cache-teacher", *stage1_overrides(teacher, corpus, cache, **extra)]


def build(teacher: Path, corpus: Path, cache: Path, **extra) -> None:
    """Stage 1 in-process, through the CLI entry point (no interpreter start-up to pay)."""
    assert cli_main([str(a) for a in stage1(teacher, corpus, cache, **extra)]) == 0


def refused(capsys, argv, pattern: str) -> str:
    """In-process twin of ``one_line_error``."""
    capsys.readouterr()
    code = cli_main([str(a) for a in argv])
    err = capsys.readouterr().err
    return one_line_error(subprocess.CompletedProcess(argv, code, "", err), pattern)


@pytest.fixture(scope="module")
def ref_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    """The default tiny cache (float32 top-k, no head), built once: a reference to compare with."""
    cache = tmp_path_factory.mktemp("ref") / "cache"
    build(tiny_teacher_dir, corpus_dir, cache)
    return cache


def assert_sound(cache: Path) -> None:
    """A readable cache whose committed shards all verify (or no cache at all)."""
    if not cache.exists():
        return
    reader = CacheReader(cache)
    for shard in reader._markers:
        reader._check_shard(shard)


def bigger_corpus(corpus_dir: Path, out: Path, copies: int) -> Path:
    out.mkdir()
    for p in corpus_dir.iterdir():
        for c in range(copies):
            (out / f"{p.stem}-{c:02d}.txt").write_text(p.read_text() + f"\ncopy {c}\n")
    return out


EVAL_COPIES = {"data.eval_documents": ["omega-00.txt"]}


# -- cache.overwrite deletes only what this tool made ------------------------------------------


def test_overwrite_refuses_directories_that_are_not_caches(tiny_cache, tiny_teacher_dir, corpus_dir, tmp_path, capsys):
    web = tmp_path / "site"  # a directory that happens to hold a manifest.json
    web.mkdir()
    (web / "manifest.json").write_text('{"name": "my app", "icons": []}')
    (web / "index.html").write_text("<html>years of work</html>")
    cluttered = tmp_path / "cluttered"  # a real cache into which the user put their own file
    shutil.copytree(tiny_cache, cluttered)
    (cluttered / "notes.txt").write_text("my notes")
    for victim, named in ((web, r"it holds 'index.html'"), (cluttered, r"it holds 'notes.txt'")):
        before = {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()}
        refused(capsys, stage1(tiny_teacher_dir, corpus_dir, victim, **{"cache.overwrite": True}), rf"is not a cache of this tool \({named}.*only replaces caches")
        assert {p: p.read_bytes() for p in victim.rglob("*") if p.is_file()} == before
    # A damaged cache (truncated manifest) is still recognisably a cache: the advice works.
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_cache, damaged)
    (damaged / "manifest.json").write_text('{"schema_vers')
    build(tiny_teacher_dir, corpus_dir, damaged, **{"cache.overwrite": True})
    assert CacheReader(damaged).complete and not list(tmp_path.glob(".damaged*"))


def test_a_kill_during_overwrite_never_leaves_a_half_deleted_cache(tiny_teacher_dir, corpus_dir, tmp_path):
    # An old cache of many small shards (thousands of files: deleting them takes a while).
    corpus = bigger_corpus(corpus_dir, tmp_path / "corpus", 4)
    cache = tmp_path / "c"
    build(tiny_teacher_dir, corpus, cache, **{"cache.shard_sequences": 1, "cache.chunk_sequences": 1, **EVAL_COPIES})
    args = stage1(tiny_teacher_dir, corpus_dir, cache, **{"cache.overwrite": True})  # new inputs
    kills = 0
    for attempt in range(2):
        watched = [cache / "manifest.json", *sorted((cache / "done").glob("*.json"))[::7]]
        if not all(p.exists() for p in watched):
            break  # the new cache is in place already
        proc = start(*args)
        # Kill the moment the old cache starts to change (a rename or the first deletions).
        if wait_for(proc, lambda: not all(p.exists() for p in watched)):
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.wait()
        assert_sound(cache)  # the old cache whole, or the new one: never a half-deleted tree
        if attempt == 0:
            assert kills == 1
        # Rebuild the old cache for another try at a different moment.
        build(tiny_teacher_dir, corpus, cache, **{"cache.shard_sequences": 1, "cache.chunk_sequences": 1,
                                                  "cache.overwrite": True, **EVAL_COPIES})
    build(tiny_teacher_dir, corpus_dir, cache, **{"cache.overwrite": True})  # the same command, rerun
    assert CacheReader(cache).complete
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".c.")]  # leftovers cleaned


# -- every array is checksummed; inspect --verify names the damage -----------------------------


@pytest.fixture(scope="module")
def sqrt8_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("sqrt8") / "cache"
    build(tiny_teacher_dir, corpus_dir, cache, **{"cache.topk_encoding": "sqrt8", "cache.store_head": True})
    return cache


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_damaged_rank_to_id_is_named_never_decoded(sqrt8_cache, tmp_path, capsys, damage):
    cache = tmp_path / "c"
    shutil.copytree(sqrt8_cache, cache)
    victim = cache / "arrays.zarr" / "rank_to_id" / "c" / "0"
    if damage == "delete":
        victim.unlink()
    else:
        data = bytearray(victim.read_bytes())
        data[len(data) // 2] ^= 0x10
        victim.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"rank_to_id/c/0 \(the sqrt8 rank table\) is (missing|corrupt)"):
        CacheReader(cache).read_range(0, 1)
    refused(capsys, ["inspect", cache, "--verify"], r"damaged: 1 problem\(s\), first: arrays.zarr/rank_to_id/c/0")


def test_damaged_head_is_named_never_read_as_zeros(tiny_cache, tmp_path, capsys):
    cache = tmp_path / "c"
    shutil.copytree(tiny_cache, cache)
    (cache / "arrays.zarr" / "head" / "c" / "1" / "0").unlink()
    with pytest.raises(CacheError, match=r"head file arrays.zarr/head/c/1/0 is missing; delete done/head.json"):
        CacheReader(cache).head()
    refused(capsys, train_args(cache, tmp_path / "runs", **{"kd.mode": "union"}), r"head file .* is missing")


def teacher_head(teacher_dir: Path) -> np.ndarray:
    from safetensors.numpy import load_file

    weights = load_file(teacher_dir / "model.safetensors")
    return weights.get("lm_head.weight", weights["model.embed_tokens.weight"])


def test_a_kill_while_adding_the_head_leaves_no_usable_half_head(ref_cache, tiny_teacher_dir, corpus_dir, tmp_path):
    cache = tmp_path / "c"
    shutil.copytree(ref_cache, cache)  # complete, without the head
    want = teacher_head(tiny_teacher_dir)
    args = stage1(tiny_teacher_dir, corpus_dir, cache, **{"cache.store_head": True})
    head_meta = cache / "arrays.zarr" / "head" / "zarr.json"

    def inode() -> int | None:
        try:
            return head_meta.stat().st_ino
        except FileNotFoundError:
            return None

    killed = 0
    for delay in (0.0, 0.01):  # no clean-up between runs: each run must cope with the last one's leftovers
        before = inode()
        proc = start(*args)
        if wait_for(proc, lambda: inode() not in (None, before)):  # a new head is being written now
            time.sleep(delay)
            proc.send_signal(signal.SIGKILL)
            killed += proc.wait() == -signal.SIGKILL
        proc.wait()
        head = CacheReader(cache).head()
        assert head is None or np.array_equal(head, want), "a half-written head is handed out"
    assert killed >= 1
    build(tiny_teacher_dir, corpus_dir, cache, **{"cache.store_head": True})  # the rerun finishes the job
    assert np.array_equal(CacheReader(cache).head(), want)


def test_inspect_verify_checks_every_file_and_names_each_damage(sqrt8_cache, tmp_path, capsys):
    cache = tmp_path / "c"
    shutil.copytree(sqrt8_cache, cache)
    assert cli_main(["inspect", str(cache), "--verify"]) == 0
    assert "cache verified" in capsys.readouterr().out
    flips = ["arrays.zarr/hidden/c/1/0/0", "meta/shard-00002.arrow", "meta/documents.arrow",
             "arrays.zarr/head/c/0/0", "arrays.zarr/logz/zarr.json"]
    for rel in flips:
        data = bytearray((cache / rel).read_bytes())
        data[-3] ^= 0x01
        (cache / rel).write_bytes(bytes(data))
    (cache / "arrays.zarr" / "topk_tail_code" / "c" / "3" / "0").unlink()
    code = cli_main(["inspect", str(cache), "--verify", "--json"])
    out = json.loads(capsys.readouterr().out)["verify"]
    assert code == 2 and not out["ok"]
    named = sorted(line.split(":")[0] for line in out["damaged"])
    assert named == sorted(flips + ["arrays.zarr/topk_tail_code/c/3/0"]), out["damaged"]
    assert any("delete done/shard-00003.json and rerun" in line for line in out["damaged"])


def test_inspect_verify_needs_a_cache(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    refused(capsys, ["inspect", tmp_path / "file", "--verify"], r"is a file, not a cache directory")
    refused(capsys, ["inspect", tmp_path / "none", "--verify"], r"does not exist")


# -- repair paths that work --------------------------------------------------------------------


def test_deleting_the_marker_heals_damage_in_a_shard_index_and_data(ref_cache, tiny_teacher_dir, corpus_dir, tmp_path,
                                                                   capsys):
    ref, cache = ref_cache, tmp_path / "c"
    shutil.copytree(ref, cache)
    last = CacheReader(cache).spec.num_shards - 1
    for shard, where in ((1, 0), (last, -1)):  # data at the start, the shard index at the end
        victim = cache / "arrays.zarr" / "input_ids" / "c" / str(shard) / "0"
        data = bytearray(victim.read_bytes())
        data[where] ^= 0xFF
        victim.write_bytes(bytes(data))
        advice = refused(capsys, train_args(cache, tmp_path / "runs", f"r{shard}"), rf"shard {shard} is corrupt .*delete done/shard-\d+.json and rerun cache-teacher")
        assert f"shard-{shard:05d}.json" in advice
        (cache / "done" / f"shard-{shard:05d}.json").unlink()  # follow the advice
        build(tiny_teacher_dir, corpus_dir, cache)
    assert_same_cache(ref, cache)


@pytest.mark.parametrize("content", [b'{"shard": 2, "files": {', b"[]", b'{"shard": 2}', b"\xff\xfe",
                                     b'{"shard": 2, "start": 8, "stop": 12, "files": [], "stats": {}}'])
def test_a_malformed_marker_is_uncommitted_for_reader_and_writer(ref_cache, tiny_teacher_dir, corpus_dir, tmp_path,
                                                                 capsys, content):
    ref, cache = ref_cache, tmp_path / "c"
    shutil.copytree(ref, cache)
    (cache / "done" / "shard-00002.json").write_bytes(content)
    assert CacheReader(cache).missing_shards() == [2]
    refused(capsys, train_args(cache, tmp_path / "runs"), r"incomplete: 1 of \d+ shards not committed")
    build(tiny_teacher_dir, corpus_dir, cache)  # the rerun the message asks for redoes shard 2
    assert_same_cache(ref, cache)


# -- two writers never mix ---------------------------------------------------------------------


def test_a_second_cache_teacher_on_the_same_cache_is_refused(tiny_teacher_dir, corpus_dir, tmp_path):
    corpus = bigger_corpus(corpus_dir, tmp_path / "corpus", 3)
    ref, cache = tmp_path / "ref", tmp_path / "c"
    build(tiny_teacher_dir, corpus, ref, **EVAL_COPIES)
    args = stage1(tiny_teacher_dir, corpus, cache, **EVAL_COPIES)
    first = start(*args)
    try:
        assert wait_for(first, (cache / "manifest.json").exists)
        first.send_signal(signal.SIGSTOP)  # the first writer is mid-run, holding the cache
        second = cli(*args)
        one_line_error(second, rf"cache .*c is in use by pid {first.pid} on {socket.gethostname()}.*wait for it")
        first.send_signal(signal.SIGKILL)  # dies holding the lock: its lock file stays behind
        first.wait()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (tmp_path / ".c.lock").exists()
    build(tiny_teacher_dir, corpus, cache, **EVAL_COPIES)  # a stale lock is taken over
    assert not (tmp_path / ".c.lock").exists()
    assert_same_cache(ref, cache)


def test_lock_api(tmp_path):
    from pipeline.errors import LockHeld
    from pipeline.locks import acquire_lock, read_lock_info

    path = tmp_path / "sub" / ".x.lock"
    with acquire_lock(path, "run x") as me:
        assert me.pid == os.getpid() and read_lock_info(path) == me
        with pytest.raises(LockHeld, match=rf"run x is in use by pid {os.getpid()} on .*lock file .*x.lock"):
            with acquire_lock(path, "run x"):
                pass
        child = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[2]);"
                                "from pipeline.locks import acquire_lock\n"
                                "try:\n with acquire_lock(sys.argv[1], 'run x'): print('got it')\n"
                                "except Exception as e: print(type(e).__name__, e)", str(path), str(REPO)],
                               capture_output=True, text=True)
        assert child.stdout.startswith("LockHeld run x is in use by pid"), child
    assert not path.exists()
    path.write_text('{"pid": 999999999, "host": "gone", "since": 0}')  # left by a dead process
    with acquire_lock(path, "run x"):
        assert read_lock_info(path).pid == os.getpid()


# -- stage 1 never commits non-finite values ---------------------------------------------------


def broken_teacher(tiny_teacher_dir: Path, out: Path, where: str) -> Path:
    """The tiny teacher with one NaN weight: ``embedding`` of the token ' York' (only in
    gamma.txt, so later shards overflow while the first sequence is fine; the head is untied so
    that it stays finite), or ``norm`` (every position of every sequence)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(tiny_teacher_dir)
    tok = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    cfg = LlamaConfig.from_pretrained(tiny_teacher_dir)
    cfg.tie_word_embeddings = False
    untied = LlamaForCausalLM(cfg)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["lm_head.weight"] = model.get_output_embeddings().weight.detach().clone()
    untied.load_state_dict(state)
    with torch.no_grad():
        if where == "embedding":
            (york,) = tok.encode(" York")
            untied.model.embed_tokens.weight[york] = float("nan")
        else:
            untied.model.norm.weight[0] = float("inf")
    untied.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_nan_from_the_teacher_is_never_committed(tiny_teacher_dir, corpus_dir, tmp_path, capsys):
    teacher = broken_teacher(tiny_teacher_dir, tmp_path / "teacher", "embedding")
    cache = tmp_path / "c"
    line = refused(capsys, stage1(teacher, corpus_dir, cache), r"NaN/Inf in \w+ for shard (\d+) .*not committed.*teacher.dtype=float32")
    shard = int(line.split("for shard ")[1].split()[0])
    reader = CacheReader(cache)
    assert shard in reader.missing_shards() and shard > 0
    assert_sound(cache)
    for s in reader._markers:  # what was committed is finite
        start, stop = reader.spec.shard_range(s)
        assert all(np.isfinite(v).all() for v in reader.read_range(start, stop).values() if v.dtype.kind == "f")


def test_the_head_check_does_not_pass_on_nan(tiny_teacher_dir, corpus_dir, tmp_path, capsys):
    teacher = broken_teacher(tiny_teacher_dir, tmp_path / "teacher", "norm")
    refused(capsys, stage1(teacher, corpus_dir, tmp_path / "c"),
            r"teacher produced NaN/Inf on the first sequence .*teacher.dtype=float32")
    assert not (tmp_path / "c" / "done").exists() or not list((tmp_path / "c" / "done").iterdir())


def test_a_head_with_nan_is_not_stored(tmp_path):
    from pipeline.errors import NonFiniteError
    from test_cache_format import make_spec

    writer = CacheWriter.open(tmp_path / "c", make_spec())
    head = np.ones((50_000, 8), np.float32)
    head[7, 3] = np.nan
    with pytest.raises(NonFiniteError, match="head holds NaN/Inf"):
        writer.write_head(head)
    assert CacheReader(tmp_path / "c").head() is None


# -- one-line errors instead of tracebacks ------------------------------------------------------


def train_args(cache, runs, name="r", **extra):
    return ["train-student", *stage2_overrides(cache, runs, name, **{"train.steps": 2, "train.warmup_steps": 0,
                                                                      **extra})]


def test_top_k_equal_to_the_vocabulary_with_sqrt8(tiny_teacher_dir, corpus_dir, tmp_path):
    # Every tail mass is 0 then: a whole shard of topk_tail_code is zeros, which zarr skips
    # unless write_empty_chunks holds for reopened arrays too.
    cache = tmp_path / "c"
    build(tiny_teacher_dir, corpus_dir, cache, **{"cache.top_k": 50257, "cache.topk_encoding": "sqrt8",
                                                  "data.seq_len": 8, "data.max_train_tokens": 48,
                                                  "data.max_eval_tokens": 16, "teacher.logits_chunk": 8})
    reader = CacheReader(cache)
    assert reader.complete
    ids = reader.read_range(0, 1, ("topk_ids",))["topk_ids"]
    assert sorted(ids[0, 0].tolist()) == list(range(50257))


def test_a_cache_dir_that_is_a_file(tiny_teacher_dir, corpus_dir, tmp_path, capsys):
    victim = tmp_path / "c"
    victim.write_text("not a cache")
    refused(capsys, stage1(tiny_teacher_dir, corpus_dir, victim), r"cache.dir .*c is a file")
    refused(capsys, stage1(tiny_teacher_dir, corpus_dir, victim, **{"cache.overwrite": True}), r"is a file")
    refused(capsys, ["inspect", victim], r"is a file, not a cache directory")
    refused(capsys, train_args(victim, tmp_path / "runs"), r"is a file, not a cache directory")
    assert victim.read_text() == "not a cache"


def test_a_corrupt_student_view_is_rebuilt(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from stage2_student_train.cross import load_or_build_view, view_dir

    cache = tmp_path / "c"
    shutil.copytree(tiny_cache, cache)
    reader = CacheReader(cache)
    teacher_tok = AutoTokenizer.from_pretrained(reader.spec.teacher["path"])
    student_tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    first = load_or_build_view(reader, teacher_tok, student_tok, show_progress=False)
    npz = view_dir(reader, student_tok) / "view.npz"
    good = npz.read_bytes()
    for bad in (good[: len(good) // 2], b"garbage"):
        npz.write_bytes(bad)
        again = load_or_build_view(reader, teacher_tok, student_tok, show_progress=False)
        assert np.array_equal(again.ids, first.ids) and np.array_equal(again.aligned, first.aligned)
        assert npz.read_bytes() == good


def read_only_command(path: Path, argv: list[str]) -> list[str] | None:
    """``argv`` run with ``path`` really read-only: a read-only bind mount in a private mount
    namespace when root (root ignores permissions), else plain permissions. None: not possible."""
    if os.geteuid() != 0:
        for p in [path, *path.rglob("*")]:
            p.chmod(p.stat().st_mode & ~0o222)
        return argv
    if shutil.which("unshare") is None:
        return None
    wrap = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"', str(path)]
    probe = subprocess.run(wrap + ["sh", "-c", f'touch "{path}/.probe"'], capture_output=True, text=True)
    if "Read-only file system" not in probe.stderr:
        return None
    return wrap + argv


def test_a_read_only_cache_with_a_cross_tokenizer_student(tiny_cache, smollm2_tokenizer_dir, tmp_path):
    cache = tmp_path / "c"
    # Without the views earlier tests may have stored in the shared cache (then nothing is written).
    shutil.copytree(tiny_cache, cache, ignore=shutil.ignore_patterns("student-views"))
    student = {"student.tokenizer": str(smollm2_tokenizer_dir), "kd.mode": "mapped"}
    argv = [sys.executable, "-m", "pipeline", *train_args(cache, tmp_path / "runs", **student)]
    cmd = read_only_command(cache, argv)
    if cmd is None:
        pytest.skip("cannot make a directory read-only here")
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=ENV)
    one_line_error(r, r"cannot store the student tokenizer's view in .*c/student-views.*read-only; "
                      r"set cache.views_dir to a writable directory")
    # With a views_dir the same read-only cache serves the student: train-student builds the view there.
    views = tmp_path / "views"
    argv = [sys.executable, "-m", "pipeline",
            *train_args(cache, tmp_path / "runs", **student, **{"cache.views_dir": str(views)})]
    r = subprocess.run(read_only_command(cache, argv), cwd=REPO, capture_output=True, text=True, env=ENV)
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(views.glob("*/*/view.npz")) and not (cache / "student-views").exists()


def test_bad_data_files_are_named(tiny_teacher_dir, tmp_path, capsys):
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    blank = tmp_path / "b.jsonl"
    blank.write_text("\n\n")
    latin = tmp_path / "latin"
    latin.mkdir()
    (latin / "ok.txt").write_text("fine text " * 20)
    (latin / "bad.txt").write_bytes(b"caf\xe9 au lait\n" * 20)
    for source, pattern in ((empty, r"e.jsonl is empty"), (blank, r"b.jsonl is empty"),
                            (latin, r"bad.txt is not valid UTF-8 \(byte 0xe9 at offset 3, line 1\)"),
                            (latin / "bad.txt", r"bad.txt is not valid UTF-8")):
        refused(capsys, stage1(tiny_teacher_dir, source, tmp_path / "c", **{"data.eval_documents": []}), pattern)
        assert not (tmp_path / "c").exists()
    refused(capsys, ["cache-teacher", "--config", tmp_path], r"config file .* is a directory; pass a TOML file")
