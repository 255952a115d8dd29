"""A cache on an object store (``cache.dir = s3://...``), against a real S3-compatible server the
test starts on 127.0.0.1 (moto's threaded server). Stage 1 writes there, is SIGKILLed after its
first committed shard, and resumes; a second process verifies every byte and a student trains
from it. The files are byte-identical to a local cache of the same config, and the student's
numbers equal those of one trained from the local cache.

Also: the commit rule without rename (a shard counts once its marker object exists), overwrite
and refusals on a bucket, and an in-process ``memory://`` cache."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, cache_files, stage1_overrides, stage2_overrides

pytestmark = pytest.mark.slow  # starts processes or runs a stage end to end: `make test` only

BUCKET = "kd-cache-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """(env for subprocesses, s3fs filesystem) of a fresh moto S3 server with one bucket."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://{host}:{port}",
           "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("xdg"))}  # local lock, plan and views of remote caches
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    fs.mkdir(BUCKET)
    yield dict(os.environ, PYTHONPATH=str(REPO), **env), fs
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    server.stop()


def run_cli(args: list[str], env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True, env=env)


def remote_files(fs, prefix: str) -> dict[str, bytes]:
    fs.invalidate_cache()
    return {f[len(prefix) + 1:]: fs.cat_file(f) for f in sorted(fs.find(prefix)) if not f.endswith("manifest.json")}


@pytest.fixture(scope="module")
def corpus(corpus_dir, tmp_path_factory) -> Path:
    """Enough text for a dozen shards, so that a kill lands between commits."""
    out = tmp_path_factory.mktemp("s3-corpus")
    for p in corpus_dir.iterdir():
        for c in range(3):
            (out / f"{p.stem}-{c}.txt").write_text(p.read_text() + f"\ncopy {c}\n")
    return out


EXTRA = {"cache.topk_encoding": "sqrt8", "cache.hidden_dtype": "int8", "cache.store_head": True, "cache.samples": 8}


def stage1(teacher: Path, corpus: Path, cache, **extra) -> list[str]:
    return stage1_overrides(teacher, corpus, cache, **{"data.eval_documents": ["omega-0.txt"], **extra})


def test_stage1_to_s3_killed_resumed_verified_and_trained_from(s3, tiny_teacher_dir, corpus, tmp_path):
    env, fs = s3
    url, prefix = f"s3://{BUCKET}/caches/c", f"{BUCKET}/caches/c"
    local = tmp_path / "local"
    r = run_cli(["cache-teacher", *stage1(tiny_teacher_dir, corpus, local, **EXTRA)], env)
    assert r.returncode == 0, r.stderr[-3000:]

    # Write to S3; SIGKILL once the first shard's marker object exists (waits on the bucket, not a clock).
    args = ["cache-teacher", *stage1(tiny_teacher_dir, corpus, url, **EXTRA)]
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while proc.poll() is None and time.time() < deadline:
        fs.invalidate_cache()
        if fs.exists(f"{prefix}/done/shard-00000.json"):
            break
        time.sleep(0.02)
    assert proc.poll() is None, "stage 1 finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    fs.invalidate_cache()
    markers = [f for f in fs.ls(f"{prefix}/done") if "shard-" in f]
    total = json.loads(fs.cat_file(f"{prefix}/manifest.json"))["spec"]
    assert 1 <= len(markers) < -(-total["num_sequences"] // total["shard_sequences"])  # killed mid-way

    r = run_cli(args, env)  # resume: committed shards kept, the rest done
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming cache" in r.stdout and "shards already committed" in r.stdout

    # The same bytes as the local cache, file for file (the manifest records wall times).
    want, got = cache_files(local), remote_files(fs, prefix)
    assert sorted(got) == sorted(want)
    assert [k for k in want if want[k] != got[k]] == []

    # A second process reads it: every byte verified, and a student trained from it equals one
    # trained from the local copy.
    r = run_cli(["inspect", url, "--verify", "--json"], env)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    verified = report["verify"]
    assert verified["ok"] and verified["checked_files"] > 20 and not verified["uncommitted_shards"]
    summaries = []
    for name, cache in (("from-local", local), ("from-s3", url)):
        r = run_cli(["train-student", *stage2_overrides(cache, tmp_path / "runs", name, **{
            "kd.mode": "union", "train.steps": 4, "train.save_every": 100})], env)
        assert r.returncode == 0, r.stderr[-3000:]
        summaries.append(json.loads((tmp_path / "runs" / name / "summary.json").read_text()))
    a, b = summaries
    assert a["eval"] and a["eval"] == b["eval"]
    weights = [(tmp_path / "runs" / n / "final" / "student" / "model.safetensors").read_bytes()
               for n in ("from-local", "from-s3")]
    assert weights[0] == weights[1]


def test_a_shard_counts_once_its_marker_object_exists(s3, tiny_teacher_dir, corpus):
    """No rename on S3: a shard whose data objects exist but whose marker does not is not
    committed (reader and writer agree), and deleting the marker is the repair."""
    from pipeline.cache import CacheReader, open_storage

    env, fs = s3
    url = f"s3://{BUCKET}/caches/marker"
    r = run_cli(["cache-teacher", *stage1(tiny_teacher_dir, corpus, url)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    store = open_storage(url)
    store.remove("done/shard-00001.json")
    reader = CacheReader(url)
    assert reader.missing_shards() == [1] and store.is_file("meta/shard-00001.arrow")
    r = run_cli(["cache-teacher", *stage1(tiny_teacher_dir, corpus, url)], env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resuming cache" in r.stdout
    assert CacheReader(url).complete


def test_overwrite_and_refusals_on_a_bucket(s3, tiny_teacher_dir, corpus, capsys):
    from pipeline.cache import CacheReader, open_storage
    from pipeline.cache.files import mark_creation
    from pipeline.cli import main as cli_main

    env, fs = s3
    url = f"s3://{BUCKET}/caches/over"
    base = stage1(tiny_teacher_dir, corpus, url)
    assert cli_main(["cache-teacher", *base]) == 0
    first = CacheReader(url).fingerprint
    # Other inputs: refused, naming the field; with overwrite: replaced, every old marker gone first.
    assert cli_main(["cache-teacher", *stage1(tiny_teacher_dir, corpus, url, **{"cache.top_k": 4})]) != 0
    assert "built from other inputs" in capsys.readouterr().err
    assert cli_main(["cache-teacher", *stage1(tiny_teacher_dir, corpus, url, **{
        "cache.top_k": 4, "cache.overwrite": True})]) == 0
    reader = CacheReader(url)
    assert reader.complete and reader.spec.top_k == 4 and reader.fingerprint != first
    # A prefix holding other objects is never replaced, whatever the flag says.
    store = open_storage(f"s3://{BUCKET}/caches/foreign")
    store.write_bytes("notes.txt", b"mine")
    assert cli_main(["cache-teacher", *stage1(tiny_teacher_dir, corpus, store.url, **{
        "cache.overwrite": True})]) != 0
    assert "is not a cache of this tool" in capsys.readouterr().err
    assert store.read_bytes("notes.txt") == b"mine"
    # A replacement killed after it deleted the markers and the manifest leaves cache folders
    # only: the next run, overwrite or not, starts over instead of refusing a "foreign" prefix.
    store = open_storage(url)
    mark_creation(store)  # a replacement writes this tool's creation marker before deleting anything
    store.remove_tree("done")
    store.remove("manifest.json")
    assert store.list() and not store.is_file("manifest.json")
    assert cli_main(["cache-teacher", *stage1(tiny_teacher_dir, corpus, url, **{"cache.top_k": 4})]) == 0
    assert CacheReader(url).complete
    # A skeleton whose manifest was never written (a kill during creation) is started over.
    half = open_storage(f"s3://{BUCKET}/caches/half")
    mark_creation(half)
    half.write_bytes("arrays.zarr/zarr.json", b"{}")
    assert cli_main(["cache-teacher", *stage1(tiny_teacher_dir, corpus, half.url)]) == 0
    assert CacheReader(half.url).complete


def test_a_memory_cache_reads_like_a_local_one(tiny_teacher_dir, corpus_dir, tiny_cache, tmp_path, monkeypatch):
    """The seam in one process: ``memory://`` (fsspec's in-memory filesystem) holds the same
    bytes as the local cache of the same config and reads back the same arrays."""
    from pipeline.cache import CacheReader
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    url = "memory://kd/tiny"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, url, **{"cache.store_head": True})),
                  show_progress=False)
    import fsspec

    fs = fsspec.filesystem("memory")
    got = {f[len("/kd/tiny/"):]: fs.cat_file(f) for f in fs.find("/kd/tiny") if not f.endswith("manifest.json")}
    want = {k: v for k, v in cache_files(tiny_cache).items() if not k.startswith("student-views")}
    assert sorted(got) == sorted(want) and all(got[k] == want[k] for k in want)
    a, b = CacheReader(tiny_cache), CacheReader(url)
    idx = np.array([5, 0, 1, 2, 9, 5])
    for name in ("topk_ids", "topk_logprobs", "topk_log_tail", "hidden", "logz"):
        assert np.array_equal(a.read_indices(idx, (name,))[name], b.read_indices(idx, (name,))[name]), name
    assert np.array_equal(a.head(), b.head())
    assert b.sequence(3).text == a.sequence(3).text
    fs.rm("/kd/tiny", recursive=True)


def test_s3_folder_marker_keys_are_not_files(s3, tmp_path):
    """Keys ending in "/" (what the S3 console makes for a "folder") are neither files nor names."""
    import boto3

    from pipeline.cache import open_storage

    store = open_storage(f"s3://{BUCKET}/caches/markers")
    store.write_bytes("tokenizer/a.json", b"{}")
    client = boto3.client("s3")
    for key in ("caches/markers/", "caches/markers/tokenizer/"):
        client.put_object(Bucket=BUCKET, Key=key, Body=b"")
    assert store.list() == ["tokenizer"] and store.list("tokenizer") == ["a.json"]
    assert store.files_under("") == ["tokenizer/a.json"] and store.bytes_under("") == 2
    store.get_dir("tokenizer", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]
    assert store.size("tokenizer") is None and store.size("tokenizer/a.json") == 2


def test_a_cache_on_s3_extends_like_a_local_one(s3, tiny_teacher_dir, corpus, tmp_path):
    from pipeline.cache import CacheReader
    from pipeline.cache.verify import verify_cache
    from pipeline.cli import main as cli_main

    env, fs = s3
    url, local = f"s3://{BUCKET}/caches/grow", tmp_path / "grow"
    for cache in (url, str(local)):
        for tokens, extend in ((9 * 32, False), (20 * 32, True)):  # 9 train + eval: the last shard is partial
            assert cli_main(["cache-teacher", *stage1(tiny_teacher_dir, corpus, cache, **{
                "data.max_train_tokens": tokens, "cache.extend": extend, **EXTRA})]) == 0
    assert remote_files(fs, f"{BUCKET}/caches/grow") == cache_files(local)
    reader = CacheReader(url)
    assert reader.complete and reader.spec.split_sizes()["train"] == 20 and len(reader.spec.generations) == 1
    assert not verify_cache(url).damaged
