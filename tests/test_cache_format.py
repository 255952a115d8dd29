"""The cache format: every array round-trips, damage is detected and named, never returned."""

import json
import subprocess
import sys

import numpy as np
import pytest
import zarr

from pipeline.cache import (ARRAYS, MANIFEST, CacheReader, CacheSpec, CacheWriter, file_record, id_dtype,
                            quantize_hidden_int8)
from pipeline.errors import CacheError, FingerprintMismatch

N, L, K, D = 10, 6, 5, 8


def make_spec(vocab=50_000, hidden_dtype="float16", topk_encoding="float16", **kw) -> CacheSpec:
    return CacheSpec(num_sequences=N, seq_len=L, top_k=K, vocab_size=vocab, hidden_dim=D,
                     splits={"train": [0, 7], "eval": [7, N]}, fingerprint={"teacher": "t", "top_k": K},
                     hidden_dtype=hidden_dtype, topk_encoding=topk_encoding, shard_sequences=4, chunk_sequences=2, **kw)


def random_topk(rng: np.random.Generator, shape: tuple[int, ...], vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct ids per position, with log-probs of a random distribution (descending, mass < 1)."""
    ids = np.stack([rng.choice(vocab, size=K, replace=False) for _ in range(int(np.prod(shape)))]).reshape(*shape, K)
    logits = rng.standard_normal((*shape, K + 20)) * 2.5
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return ids, -np.sort(-logp[..., :K], axis=-1)


def random_shard(spec: CacheSpec, shard: int, rng: np.random.Generator):
    start, stop = spec.shard_range(shard)
    n = stop - start
    stored = spec.array_specs()
    arrays = {}
    for name in spec.logical_arrays():
        if name in ("topk_ids", "topk_logprobs"):
            continue
        shape, dtype = stored[name]
        shape = (n,) + shape[1:]
        if name == "hidden" and spec.hidden_dtype == "int8":
            # logical hidden is float; values on the int8 grid of scale 1/8 (each token reaching
            # +-127 codes) survive the writer's coding exactly
            codes = rng.integers(-127, 128, shape)
            codes[..., 0] = 127
            arrays[name] = (codes * 0.125).astype(np.float32)
        elif dtype.kind == "u":
            arrays[name] = rng.integers(0, spec.vocab_size, shape).astype(dtype)
        elif dtype.kind == "i":
            arrays[name] = rng.integers(-127, 128, shape).astype(dtype)
        else:
            arrays[name] = (rng.standard_normal(shape) * 3).astype(dtype)
    ids, logp = random_topk(rng, (n, L), spec.vocab_size)
    value_dtype = spec.topk_encoding if spec.topk_encoding.startswith("float") else np.float32
    arrays["topk_ids"] = ids.astype(id_dtype(spec.vocab_size))
    arrays["topk_logprobs"] = logp.astype(value_dtype)
    texts = ["".join(rng.choice(list("abcé東 \n"), size=rng.integers(1, 20))) for _ in range(n)]
    meta = {"text": texts, "char_end": [sorted(rng.integers(0, len(t) + 1, L).tolist()) for t in texts],
            "doc_id": [rng.integers(0, 3, L).tolist() for _ in range(n)]}
    return arrays, meta


def write_all(root, spec, rng, shards=None):
    w = CacheWriter.open(root, spec, rank_table=lambda: rng.permutation(spec.vocab_size))
    w.write_documents([0, 1, 2], ["a", "b", "c"], ["train", "train", "eval"], [10, 20, 30])
    written = {}
    for s in range(spec.num_shards) if shards is None else shards:
        arrays, meta = random_shard(spec, s, rng)
        w.write_shard(s, arrays, meta, {"positions": float(len(meta["text"]) * L), "topk_mass_sum": 1.0})
        written[s] = (arrays, meta)
    return w, written


@pytest.mark.parametrize("vocab, hidden_dtype, topk_encoding", [
    (50_000, "float16", "float16"), (50_000, "int8", "float32"), (150_000, "float16", "float32"),
])
def test_every_array_round_trips_bit_exactly(tmp_path, vocab, hidden_dtype, topk_encoding):
    rng = np.random.default_rng(0)
    spec = make_spec(vocab, hidden_dtype, topk_encoding)
    w, written = write_all(tmp_path / "c", spec, rng)
    w.finalize()
    r = CacheReader(tmp_path / "c")
    assert r.complete and r.fingerprint == spec.fingerprint and len(r) == N
    assert r.info()["complete"] is True
    assert list(r.split_indices("eval")) == [7, 8, 9]
    for s, (arrays, meta) in written.items():
        start, stop = spec.shard_range(s)
        got = r.read_range(start, stop)
        assert set(got) == set(arrays)
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype, name
            assert np.array_equal(got[name], want), name
        for row, i in enumerate(range(start, stop)):
            seq = r.sequence(i)
            assert seq.text == meta["text"][row]
            assert seq.char_end.tolist() == meta["char_end"][row]
            assert seq.doc_id.tolist() == meta["doc_id"][row]
            assert seq.split == ("train" if i < 7 else "eval")
    assert r.documents().column("name").to_pylist() == ["a", "b", "c"]


def test_ids_use_the_narrowest_type():
    assert id_dtype(49_152) == np.uint16 and id_dtype(65_536) == np.uint16
    assert id_dtype(65_537) == np.uint32 and id_dtype(151_936) == np.uint32
    spec = make_spec(vocab=151_936)
    assert spec.array_specs()["topk_ids"][1] == np.uint32


def test_int8_hidden_error_is_bounded_by_half_a_step():
    rng = np.random.default_rng(1)
    h = (rng.standard_normal((3, 7, 64)) * rng.uniform(0.01, 50, (3, 7, 1))).astype(np.float32)
    h[0, 0] = 0.0  # an all-zero token must not divide by zero
    codes, scale = quantize_hidden_int8(h)
    back = codes.astype(np.float32) * scale[..., None]
    assert codes.dtype == np.int8 and np.abs(codes).max() <= 127
    assert np.all(np.abs(back - h) <= scale[..., None] / 2 + 1e-6 * np.abs(h))
    assert np.allclose(back[0, 0], 0.0)
    # The relative error per token is at most 1/254 of the token's largest magnitude.
    rel = np.abs(back - h).max(-1) / np.maximum(np.abs(h).max(-1), 1e-12)
    assert rel.max() <= 1 / 254 + 1e-6


def test_int8_hidden_round_trips_through_the_reader(tmp_path):
    rng = np.random.default_rng(2)
    spec = make_spec(hidden_dtype="int8")
    w = CacheWriter.open(tmp_path / "c", spec)
    arrays, meta = random_shard(spec, 0, rng)
    h = rng.standard_normal((4, L, D)).astype(np.float32)
    arrays["hidden"] = h  # the writer codes it (codecs.Int8Hidden), the reader decodes it
    w.write_shard(0, arrays, meta, {})
    got = CacheReader(tmp_path / "c").sequence(1).hidden()
    _, scale = quantize_hidden_int8(h)
    stored = zarr.open_array(str(tmp_path / "c" / ARRAYS / "hidden"), mode="r")[1]
    assert stored.dtype == np.int8 and np.array_equal(got, stored.astype(np.float32) * scale[1][:, None])
    assert np.all(np.abs(got - h[1]) <= scale[1][:, None] / 2 + 1e-6) and not np.array_equal(got, h[1])


def test_half_written_cache_is_reported_incomplete(tmp_path):
    rng = np.random.default_rng(3)
    spec = make_spec()
    w, _ = write_all(tmp_path / "c", spec, rng, shards=[0, 2])
    r = CacheReader(tmp_path / "c")
    assert not r.complete and r.missing_shards() == [1]
    assert r.info()["complete"] is False
    with pytest.raises(CacheError, match="incomplete.*rerun cache-teacher"):
        r.require_complete()
    with pytest.raises(CacheError, match="shard 1 .*not committed"):
        r.sequence(5)
    assert w.pending_shards() == [1]
    with pytest.raises(CacheError, match=r"shards \[1\] are not committed"):
        w.finalize()
    # Arrays written for a shard without its marker still do not count.
    arrays, meta = random_shard(spec, 1, rng)
    w._group["input_ids"][4:8] = arrays["input_ids"]
    assert CacheReader(tmp_path / "c").missing_shards() == [1]


def test_corrupted_shard_bytes_are_detected(tmp_path):
    rng = np.random.default_rng(4)
    spec = make_spec()
    write_all(tmp_path / "c", spec, rng)
    victim = tmp_path / "c" / ARRAYS / "logz" / "c" / "1" / "0"
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    r = CacheReader(tmp_path / "c")
    r.sequence(0)  # other shards still read
    with pytest.raises(CacheError, match=r"logz.*shard 1 is corrupt"):
        r.sequence(5)


def test_deleted_shard_file_is_detected(tmp_path):
    spec = make_spec()
    write_all(tmp_path / "c", spec, np.random.default_rng(5))
    (tmp_path / "c" / "meta" / "shard-00002.arrow").unlink()
    with pytest.raises(CacheError, match=r"shard-00002.arrow of shard 2 is missing"):
        CacheReader(tmp_path / "c").sequence(9)


def test_nan_in_a_cached_tensor_is_reported_with_the_sequence(tmp_path):
    rng = np.random.default_rng(6)
    spec = make_spec()
    w = CacheWriter.open(tmp_path / "c", spec)
    arrays, meta = random_shard(spec, 1, rng)
    w.write_shard(1, arrays, meta, {})
    # A NaN that got in anyway (an older version, a bit flip before the checksum): re-seal the
    # shard's checksums around it, as if it had been committed like that.
    values = w._group["logz"][4:8]
    values[2, 3] = np.nan
    w._arrays["logz"][4:8] = values
    marker = tmp_path / "c" / "done" / "shard-00001.json"
    obj = json.loads(marker.read_text())
    obj["files"] = {rel: file_record(tmp_path / "c" / rel) for rel in obj["files"]}
    marker.write_text(json.dumps(obj))
    r = CacheReader(tmp_path / "c")
    r.sequence(5)
    with pytest.raises(CacheError, match="logz of sequence 6 holds NaN"):
        r.sequence(6)


def test_truncated_or_foreign_manifest(tmp_path):
    spec = make_spec()
    write_all(tmp_path / "c", spec, np.random.default_rng(7))
    manifest = tmp_path / "c" / MANIFEST
    good = manifest.read_text()
    manifest.write_text(good[: len(good) // 2])
    with pytest.raises(CacheError, match="unreadable.*overwrite=true"):
        CacheReader(tmp_path / "c")
    obj = json.loads(good)
    obj["schema_version"] = 99
    manifest.write_text(json.dumps(obj))
    with pytest.raises(CacheError, match="schema version 99"):
        CacheReader(tmp_path / "c")
    with pytest.raises(CacheError, match="does not exist"):
        CacheReader(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    with pytest.raises(CacheError, match="not a teacher cache"):
        CacheReader(tmp_path / "plain")


def test_rerun_with_other_fingerprint_is_refused_and_nothing_is_touched(tmp_path):
    spec = make_spec()
    write_all(tmp_path / "c", spec, np.random.default_rng(8))
    before = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    other = make_spec()
    other.fingerprint = {"teacher": "another", "top_k": K}
    with pytest.raises(FingerprintMismatch, match="teacher: cache has 't', now 'another'"):
        CacheWriter.open(tmp_path / "c", other)
    after = {p: p.read_bytes() for p in (tmp_path / "c").rglob("*") if p.is_file()}
    assert before == after
    # Same fingerprint: reopened for resume, committed shards kept.
    assert CacheWriter.open(tmp_path / "c", make_spec()).pending_shards() == []
    # overwrite=True starts from scratch.
    assert CacheWriter.open(tmp_path / "c", other, overwrite=True).pending_shards() == [0, 1, 2]


def test_a_non_cache_directory_is_never_overwritten(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "precious.txt").write_text("keep me")
    with pytest.raises(CacheError, match="not empty and holds no cache manifest"):
        CacheWriter.open(tmp_path / "c", make_spec())
    assert (tmp_path / "c" / "precious.txt").read_text() == "keep me"


@pytest.mark.slow  # starts a process
def test_inspect_cli_json_and_error(tmp_path):
    spec = make_spec()
    w, _ = write_all(tmp_path / "c", spec, np.random.default_rng(9))
    w.finalize()
    out = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(tmp_path / "c"), "--json"],
                         capture_output=True, text=True, check=True)
    info = json.loads(out.stdout)
    for key in ("complete", "sequences", "tokens", "seq_len", "top_k", "hidden_dim", "teacher", "fingerprint",
                "bytes_on_disk", "bytes_per_token", "topk_mass_mean", "teacher_eval_ppl"):
        assert key in info, key
    assert info["complete"] is True and info["tokens"] == N * L and info["top_k"] == K
    # Shard statistics are sums that combine exactly: each shard reported a mass sum of 1.0.
    assert info["topk_mass_mean"] == pytest.approx(spec.num_shards / (N * L))
    bad = subprocess.run([sys.executable, "-m", "pipeline", "inspect", str(tmp_path / "nope")],
                         capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr


COMPACT = {"sqrt8": ("topk_rank_gaps", "topk_sqrt_codes", "topk_tail_code"),
           "logp16": ("topk_rank_gaps", "topk_log_codes", "topk_log_tail_code")}


@pytest.mark.parametrize("encoding", list(COMPACT))
@pytest.mark.parametrize("vocab", [50_000, 150_000])
def test_compact_encoding_round_trip_and_fidelity(tmp_path, vocab, encoding):
    from pipeline.cache.logit_codec import bucket_kl

    rng = np.random.default_rng(10)
    spec = make_spec(vocab, topk_encoding=encoding)
    w, written = write_all(tmp_path / "c", spec, rng)
    w.finalize()
    r = CacheReader(tmp_path / "c")
    stored = r.spec.array_specs()
    assert set(COMPACT[encoding]) <= set(stored) and "topk_ids" not in stored
    if encoding == "logp16":
        assert stored["topk_log_codes"][1] == np.uint16 and stored["topk_log_tail_code"][1] == np.uint16
    kl_total, positions = 0.0, 0
    for s, (arrays, _) in written.items():
        start, stop = spec.shard_range(s)
        got = r.read_range(start, stop, ("input_ids", "topk_ids", "topk_logprobs", "hidden"))
        assert np.array_equal(got["input_ids"], arrays["input_ids"])
        assert np.array_equal(got["hidden"], arrays["hidden"])
        assert got["topk_ids"].dtype == id_dtype(vocab)
        # Same id set per position, ordered by descending decoded probability.
        assert np.array_equal(np.sort(got["topk_ids"], -1), np.sort(arrays["topk_ids"], -1))
        assert np.all(np.diff(got["topk_logprobs"], axis=-1) <= 0)
        # Align the exact values to the decoded order and measure the K+1-bucket KL.
        order = np.argsort(arrays["topk_ids"], -1)
        sorted_ids = np.take_along_axis(arrays["topk_ids"], order, -1)
        pos = np.stack([[np.searchsorted(sorted_ids[i, j], got["topk_ids"][i, j]) for j in range(L)]
                        for i in range(stop - start)])
        exact = np.take_along_axis(np.take_along_axis(arrays["topk_logprobs"], order, -1), pos, -1)
        kl = bucket_kl(exact, got["topk_logprobs"])
        assert np.all(kl >= -1e-12) and kl.mean() < (1e-3 if encoding == "sqrt8" else 1e-4)
        if encoding == "sqrt8":  # sqrt(p) is off by at most about half a step (plus renormalisation)
            assert np.abs(np.sqrt(np.exp(got["topk_logprobs"])) - np.sqrt(np.exp(exact))).max() < 1.5 / spec.sqrt_levels
        else:  # log p is off by at most half a step, each ratio to the top-1 by one step
            ratio = (got["topk_logprobs"] - got["topk_logprobs"][..., :1]) - (exact - exact[..., :1])
            assert np.abs(ratio).max() <= spec.logp_step + 1e-5
        kl_total += kl.sum()
        positions += kl.size
    # The writer measured the same fidelity on every position it wrote.
    assert r.info()["topk_encoding_kl_mean"] == pytest.approx(kl_total / positions, rel=1e-6)


def test_audit_against_the_teacher(tiny_cache, capsys):
    """inspect --audit reruns the (tiny) teacher: mass grows with k, the truncation KL falls with
    k, and a float32 cache's stored distribution matches the fresh teacher pass."""
    from pipeline.cli import main as cli_main

    capsys.readouterr()
    assert cli_main(["inspect", str(tiny_cache), "--json", "--audit", "--audit-sequences", "3"]) == 0
    audit = json.loads(capsys.readouterr().out)["audit"]
    masses = [audit["per_k"][str(k)]["mass"] for k in (8, 16, 32, 64, 128)]
    kls = [audit["per_k"][str(k)]["kl_topk_tail"] for k in (8, 16, 32, 64, 128)]
    assert all(0 < m < 1 for m in masses) and masses == sorted(masses)
    assert kls == sorted(kls, reverse=True) and kls[-1] >= 0
    assert len(audit["sequences"]) == 3 and audit["stored_k"] == 8
    assert audit["kl_stored"] < 1e-6  # float32 log-probs, same teacher, same tokens
    assert audit["per_k"]["8"]["mass"] == pytest.approx(CacheReader(tiny_cache).info()["topk_mass_mean"], rel=0.5)


@pytest.mark.parametrize("topk_encoding", ["sqrt8", "logp16", "float16"])
def test_each_shard_records_the_kd_floor_at_every_temperature(tmp_path, topk_encoding):
    """The KD loss a student equal to the exact teacher pays on the decoded cache, tau^2 KL(decoded_tau
    || exact_tau) over top-k + tail, recorded per shard: checked against a float64 reference
    computed from the full distribution the top-k came from, and the decoded values read back."""
    from pipeline.cache.codecs import FIDELITY_TEMPERATURES, fidelity_key
    from pipeline.cache.files import read_shard_marker
    from pipeline.cache.store import open_storage

    rng = np.random.default_rng(11)
    spec = make_spec(topk_encoding=topk_encoding)
    w = CacheWriter.open(tmp_path / "c", spec, rank_table=lambda: rng.permutation(spec.vocab_size))
    arrays, meta = random_shard(spec, 0, rng)
    n = len(meta["text"])
    logits = rng.standard_normal((n, L, K + 30)) * 3.0
    logits[..., 0] += 6.0 * rng.random((n, L))  # some confident positions
    logits[:, ::3, 0] += 18.0  # and near one-hot ones, where the encodings' errors are large and one-sided
    full = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    order = np.argsort(-full, axis=-1)
    top = np.take_along_axis(full, order[..., :K], -1)
    exact_tail = np.log(np.exp(np.take_along_axis(full, order[..., K:], -1)).sum(-1))
    ids = np.stack([rng.choice(spec.vocab_size, size=K, replace=False) for _ in range(n * L)]).reshape(n, L, K)
    arrays["topk_ids"] = ids.astype(id_dtype(spec.vocab_size))
    arrays["topk_logprobs"] = top.astype(np.float32)
    w.write_shard(0, arrays, meta, {"positions": float(n * L)})
    stats = read_shard_marker(open_storage(tmp_path / "c"), 0, spec.shard_range(0))["stats"]

    got = CacheReader(tmp_path / "c").read_range(0, n, ("topk_ids", "topk_logprobs", "topk_log_tail"))
    # decoded values back in the input's id order: sort both sides by id
    by_id = np.take_along_axis(got["topk_logprobs"].astype(np.float64), np.argsort(got["topk_ids"].astype(np.int64), -1), -1)
    dec = np.take_along_axis(by_id, np.argsort(np.argsort(ids, -1), -1), -1)
    dec_buckets = np.concatenate([dec, got["topk_log_tail"].astype(np.float64)[..., None]], -1)
    exact_buckets = np.concatenate([top, exact_tail[..., None]], -1)
    for tau in FIDELITY_TEMPERATURES:
        def tempered(b):
            x = b / tau
            return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)
        a, e = tempered(dec_buckets), tempered(exact_buckets)
        want = (tau ** 2 * (np.exp(a) * (a - e)).sum(-1)).sum()
        assert stats[fidelity_key(tau)] == pytest.approx(want, rel=2e-3, abs=1e-9 * n * L), tau
    floor = CacheReader(tmp_path / "c").summary_stats()["kd_floor"]
    assert set(floor) == {f"{t:g}" for t in FIDELITY_TEMPERATURES}
    if topk_encoding == "sqrt8":
        assert floor["4"] > 2 * floor["1"]  # sqrt8 pays more when tempered
    if topk_encoding == "logp16":
        assert max(floor.values()) < 1e-4


def test_the_kd_floor_is_finite_for_an_empty_tail_and_averaged_over_measured_positions():
    """An empty exact tail (top-k = the vocabulary, or a sum that underflows) is floored as the
    loss floors a student's, not +inf; shards written before the floor existed do not dilute it."""
    from pipeline.cache import logit_codec
    from pipeline.cache.codecs import FIDELITY_TEMPERATURES, fidelity_key, fidelity_sums
    from pipeline.cache.summary import summary_stats

    rng = np.random.default_rng(5)
    logits = rng.standard_normal((64, K)) * 2
    exact = (logits - np.log(np.exp(logits).sum(-1, keepdims=True))).astype(np.float32)  # top-k = vocabulary
    decoded, decoded_tail = logit_codec.roundtrip_with_tail(exact)
    assert np.isfinite(decoded_tail).all()  # sqrt8 decodes code 0 to a small positive mass
    sums = fidelity_sums(exact, decoded, decoded_tail, np.full(64, -np.inf))
    assert all(np.isfinite(v) and v >= 0 for v in sums.values()) and sums["kd_floor_positions"] == 64
    # the same numbers as flooring the exact tail by hand at tau * log(1e-12) (the loss's floor)
    for tau in FIDELITY_TEMPERATURES:
        want = logit_codec.tempered_bucket_kl(exact, decoded, tau, np.full(64, tau * np.log(1e-12)), decoded_tail)
        assert sums[fidelity_key(tau)] == pytest.approx(want.sum(), rel=1e-9)
    old = {"stats": {"positions": 64.0}}  # a shard written before the floor existed
    stats = summary_stats([old, {"stats": {"positions": 64.0, **sums}}])
    assert stats["kd_floor"]["2"] == pytest.approx(sums[fidelity_key(2.0)] / 64, rel=1e-12)
