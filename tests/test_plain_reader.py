"""docs/cache-format.md is enough to read a cache: a reader written from that page alone, with
plain zarr + pyarrow + numpy + json (no import of this project in the reading part), gets
exactly the numbers ``CacheReader`` returns, for a sqrt8 cache with int8 hidden states and
sampled tokens, a logp16 cache, and a float32 cache with fp16 hidden states and a head. If the page's rules are wrong, this fails."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest
import zarr

from conftest import stage1_overrides

# ---------------------------------------------------------------- the plain reader (docs only)


class PlainCache:
    """A cache reader written from docs/cache-format.md: json + zarr + pyarrow + numpy."""

    def __init__(self, root: Path, wrong: str = ""):
        self.wrong = wrong  # only for the test that the comparison can fail: one rule broken on purpose
        self.root = Path(root)
        self.manifest = json.loads((self.root / "manifest.json").read_text())
        assert self.manifest["schema_version"] == 3
        self.spec = self.manifest["spec"]
        self.group = zarr.open_group(str(self.root / "arrays.zarr"), mode="r")

    def split_indices(self, split: str) -> list[int]:
        """A split's sequences in order: its segments' ranges concatenated."""
        return [i for start, stop in self.spec["splits"].get(split, []) for i in range(start, stop)]

    # checksums: every file the manifest and the markers vouch for
    def verify(self) -> int:
        records = dict(self.manifest["files"])
        shards = -(-self.spec["num_sequences"] // self.spec["shard_sequences"])
        for s in range(shards):
            marker = json.loads((self.root / "done" / f"shard-{s:05d}.json").read_text())
            assert marker["shard"] == s
            records.update(marker["files"])
        if (self.root / "done" / "head.json").exists():
            records.update(json.loads((self.root / "done" / "head.json").read_text())["files"])
        for rel, rec in records.items():
            data = (self.root / rel).read_bytes()
            assert len(data) == rec["bytes"] and zlib.crc32(data) == rec["crc32"], rel
        return len(records)

    def topk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids by descending p, float32 log-probs, float32 log-tail) for sequences [start, stop)."""
        g = self.group
        if self.spec["topk_encoding"] == "logp16":
            return self.logp16_topk(start, stop)
        if self.spec["topk_encoding"] != "sqrt8":
            ids = g["topk_ids"][start:stop]
            logprobs = g["topk_logprobs"][start:stop]
            tail = 1.0 - np.exp(logprobs.astype(np.float64)).sum(-1)
            return ids, logprobs, np.log(np.maximum(tail, 1e-300)).astype(np.float32)
        m = self.spec["sqrt_levels"]
        assert g.attrs["sqrt_levels"] == m
        gaps = g["topk_rank_gaps"][start:stop].astype(np.int64)
        if self.wrong == "first gap relative":
            gaps[..., 0] = 0
        rank = np.cumsum(gaps, axis=-1)  # first gap absolute
        ids = g["rank_to_id"][:][rank]
        zero = 0.0 if self.wrong == "code 0 is 0" else (0.5 / m) ** 2 / 3

        def value(code):
            c = code.astype(np.float64)
            return np.where(c == 0, zero, (c / m) ** 2)  # code 0 -> (1/2 / M)^2 / 3

        v = value(g["topk_sqrt_codes"][start:stop])
        vt = value(g["topk_tail_code"][start:stop])
        total = v.sum(-1) + vt  # the K + 1 buckets renormalised together
        if self.wrong == "no renormalisation":
            total = np.ones_like(total)
        p, tail = v / total[..., None], vt / total
        order = np.argsort(-p, axis=-1, kind="quicksort" if self.wrong == "unstable sort" else "stable")
        ids = np.take_along_axis(ids, order, -1)
        with np.errstate(divide="ignore"):  # only the broken "code 0 is 0" reader takes log(0)
            logprobs = np.log(np.take_along_axis(p, order, -1)).astype(np.float32)
        id_type = np.uint16 if self.spec["vocab_size"] <= 65536 else np.uint32
        return ids.astype(id_type), logprobs, np.log(tail).astype(np.float32)

    def logp16_topk(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        g, step = self.group, self.spec["logp_step"]
        assert g.attrs["logp_step"] == step
        ids = g["rank_to_id"][:][np.cumsum(g["topk_rank_gaps"][start:stop].astype(np.int64), axis=-1)]
        values = -g["topk_log_codes"][start:stop].astype(np.float64) * step  # every code, the floor too
        tail = -g["topk_log_tail_code"][start:stop].astype(np.float64) * step
        lse = np.logaddexp(np.logaddexp.reduce(values, axis=-1), tail)  # the K + 1 buckets, in log space
        values, tail = values - lse[..., None], tail - lse
        order = np.argsort(-values, axis=-1, kind="stable")
        id_type = np.uint16 if self.spec["vocab_size"] <= 65536 else np.uint32
        return (np.take_along_axis(ids, order, -1).astype(id_type),
                np.take_along_axis(values, order, -1).astype(np.float32), tail.astype(np.float32))

    def hidden(self, start: int, stop: int) -> np.ndarray:
        h = self.group["hidden"][start:stop]
        if self.spec["hidden_dtype"] == "int8":
            return h.astype(np.float32) * self.group["hidden_scale"][start:stop][..., None]
        return h.astype(np.float32)

    def samples(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """(drawn ids, counts) [n, L, S] of a sampled cache; padding (count 0) keeps its decoded id."""
        keys = np.cumsum(self.group["draw_gaps"][start:stop].astype(np.int64), axis=-1)
        ids = self.group["rank_to_id"][:][keys] if self.spec["topk_encoding"] in ("sqrt8", "logp16") else keys
        return ids, self.group["draw_counts"][start:stop]

    def row(self, index: int) -> dict:
        shard, row = divmod(index, self.spec["shard_sequences"])
        with pa.memory_map(str(self.root / "meta" / f"shard-{shard:05d}.arrow")) as src:
            table = ipc.open_file(src).read_all()
        rec = table.slice(row, 1).to_pylist()[0]
        assert rec["seq_index"] == index
        return rec


# ---------------------------------------------------------------- the comparison


@pytest.fixture(scope="module")
def sqrt8_int8_cache(tiny_teacher_dir, corpus_dir, tmp_path_factory) -> Path:
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    cache = tmp_path_factory.mktemp("plain") / "cache"
    cache_teacher(load_config(None, stage1_overrides(tiny_teacher_dir, corpus_dir, cache, **{
        "cache.topk_encoding": "sqrt8", "cache.hidden_dtype": "int8", "cache.pilot_sequences": 2,
        "cache.samples": 16})),
        show_progress=False)
    return cache


@pytest.mark.parametrize("which", ["sqrt8_int8_cache", "logp16_cache", "tiny_cache"])
def test_a_reader_written_from_the_doc_gets_the_same_numbers(which, request):
    from pipeline.cache import CacheReader

    root = request.getfixturevalue(which)
    plain, reader = PlainCache(root), CacheReader(root)
    assert plain.verify() > 0
    n = plain.spec["num_sequences"]
    assert n == len(reader) and n > plain.spec["shard_sequences"]
    for split in ("train", "eval"):
        assert plain.split_indices(split) == reader.split_indices(split).tolist()
    want = reader.read_range(0, n, reader.spec.logical_arrays() + ("topk_log_tail",))
    ids, logprobs, log_tail = plain.topk(0, n)
    assert ids.dtype == want["topk_ids"].dtype and np.array_equal(ids, want["topk_ids"])
    assert logprobs.dtype == want["topk_logprobs"].dtype and np.array_equal(logprobs, want["topk_logprobs"])
    assert np.array_equal(log_tail, want["topk_log_tail"])
    group = plain.group
    for name in ("input_ids", "logz", "next_logprob"):
        assert np.array_equal(group[name][:], want[name]), name
    if plain.spec["topk_encoding"] in ("sqrt8", "logp16"):
        assert group["input_ids"].dtype == np.uint16 and (np.diff(np.cumsum(
            group["topk_rank_gaps"][:].astype(np.int64), -1), axis=-1) > 0).all()  # ranks strictly increase
    if plain.spec.get("samples"):
        draw_ids, counts = plain.samples(0, n)
        got = reader.read_range(0, n, ("draw_ids", "draw_counts"))
        real = counts > 0
        assert np.array_equal(draw_ids[real], got["draw_ids"][real].astype(np.int64))
        assert np.array_equal(counts, got["draw_counts"])
        assert (counts.sum(-1) == plain.spec["samples"]).all()
        ranks = np.cumsum(group["draw_gaps"][:].astype(np.int64), -1)
        assert all((np.diff(r[c > 0]) > 0).all() for r, c in zip(ranks.reshape(-1, ranks.shape[-1]),
                                                                 counts.reshape(-1, counts.shape[-1])))
    hidden = plain.hidden(0, n)
    for i in range(n):
        seq = reader.sequence(i)
        assert np.array_equal(hidden[i], seq.hidden())
        assert np.array_equal(logprobs[i] + group["logz"][i][..., None], seq.topk_logits())  # logit = lp + logz
        rec = plain.row(i)
        assert rec["text"] == seq.text and rec["split"] == seq.split
        assert i in plain.split_indices(rec["split"])
        assert np.array_equal(rec["char_end"], seq.char_end) and np.array_equal(rec["doc_id"], seq.doc_id)


def test_char_end_and_the_document_separator_as_documented(sqrt8_int8_cache):
    """Token t covers text[char_end[t-1]:char_end[t]]; the end-of-sequence token covers
    exactly the document separator; concatenated spans give the text."""
    from transformers import AutoTokenizer

    plain = PlainCache(sqrt8_int8_cache)
    eos, sep = plain.spec["teacher"]["eos_token_id"], plain.spec["fingerprint"]["doc_separator"]
    tok = AutoTokenizer.from_pretrained(str(sqrt8_int8_cache / "tokenizer"))  # the cache's own copy
    seen_eos = 0
    for i in range(plain.spec["num_sequences"]):
        rec, ids = plain.row(i), plain.group["input_ids"][i]
        ends = [0, *rec["char_end"]]
        spans = [rec["text"][a:b] for a, b in zip(ends, ends[1:])]
        assert "".join(spans) == rec["text"] and ends[-1] == len(rec["text"])
        for t, tid in enumerate(ids):
            if tid == eos:
                seen_eos += 1
                assert spans[t] == sep
            elif spans[t]:
                assert spans[t] in tok.decode([int(tid)]) or tok.decode([int(tid)]).endswith("\ufffd")
    assert seen_eos > 0


@pytest.mark.parametrize("wrong", ["code 0 is 0", "first gap relative", "no renormalisation"])
def test_the_plain_reader_fails_when_a_rule_is_wrong(sqrt8_int8_cache, tmp_path, wrong):
    """The comparison can fail: with one documented rule broken, the plain reader no longer
    matches. Code 0 is rare in a tiny random teacher's top-k, so a copy of the cache gets code 0
    written into its last top-k entries (read back unverified: its checksums no longer hold); the
    correct plain reader still matches the project's reader there."""
    import shutil

    from pipeline.cache import CacheReader

    root = tmp_path / "cache"
    shutil.copytree(sqrt8_int8_cache, root)
    stop = json.loads((root / "manifest.json").read_text())["spec"]["shard_sequences"]
    codes = zarr.open_array(str(root / "arrays.zarr" / "topk_sqrt_codes"), mode="r+")
    block = codes[0:stop]
    block[..., -3:] = 0
    codes[0:stop] = block
    want = CacheReader(root, verify=False).read_range(0, stop, ("topk_ids", "topk_logprobs"))
    ids, logprobs, _ = PlainCache(root).topk(0, stop)
    assert np.array_equal(ids, want["topk_ids"]) and np.array_equal(logprobs, want["topk_logprobs"])
    ids, logprobs, _ = PlainCache(root, wrong=wrong).topk(0, stop)
    assert not (np.array_equal(ids, want["topk_ids"]) and np.array_equal(logprobs, want["topk_logprobs"]))


def test_the_loss_mask_of_a_chat_cache_as_documented(chat_cache):
    """A chat cache (fingerprint key ``loss_mask``) holds arrays.zarr/loss_mask [N, L] uint8,
    vouched for by the shard markers; token t is a target when its last character lies in an
    assistant turn: the kept characters are the assistant's words, never the user's."""
    from pipeline.cache import CacheReader

    plain = PlainCache(chat_cache)
    assert plain.spec["fingerprint"]["loss_mask"] == "assistant"
    assert plain.verify() > 0  # the markers list the mask's shard files, and their checksums hold
    mask = plain.group["loss_mask"][:]
    n, length = plain.spec["num_sequences"], plain.spec["seq_len"]
    assert mask.shape == (n, length) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert plain.group["loss_mask"].attrs["dims"] == ["sequence", "position"]
    assert np.array_equal(mask, CacheReader(chat_cache).read_range(0, n, ("loss_mask",))["loss_mask"])
    kept = []
    for i in range(n):
        rec = plain.row(i)
        ends = [0, *rec["char_end"]]
        kept += [rec["text"][a:b] for a, b, m in zip(ends, ends[1:], mask[i]) if m]
    kept = "".join(kept)
    assert "She weeps" in kept and "what news" not in kept and "<|im_start|>" not in kept
