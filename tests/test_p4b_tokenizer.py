"""bench/p4b.py rebuilds Qwen's tokenizer from a tiktoken rank file: the conversion must give the
same ids as tiktoken's byte-pair rule (merges recovered from the ranks alone)."""

import base64

import pytest

from bench.p4b import QWEN_PATTERN, tiktoken_to_hf


@pytest.fixture()
def rank_file(tmp_path):
    ranks = {bytes([b]): b for b in range(256)}
    for token in (b"th", b"the", b" t", b" the", b"e ", b"\xc3\xa9"):  # later ranks build on earlier ones
        ranks[token] = len(ranks)
    path = tmp_path / "tiny.tiktoken"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path, ranks


def test_tiktoken_ranks_become_an_equivalent_hf_tokenizer(rank_file):
    path, ranks = rank_file
    tok = tiktoken_to_hf(path, QWEN_PATTERN, ("<|endoftext|>", "<|im_start|>"), "<|endoftext|>")
    assert tok.eos_token_id == len(ranks) and len(tok) == len(ranks) + 2
    ids = tok("the theé", add_special_tokens=False)["input_ids"]
    assert ids == [ranks[b"the"], ranks[b" the"], ranks["é".encode()]]
    assert tok("thx", add_special_tokens=False)["input_ids"] == [ranks[b"th"], ord("x")]
    assert tok.decode(ids) == "the theé"


def test_a_rank_file_that_is_not_bpe_is_refused(tmp_path):
    path = tmp_path / "bad.tiktoken"
    ranks = {bytes([b]): b for b in range(256)} | {b"abc": 256}  # no "ab" or "bc" to merge from
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    with pytest.raises(ValueError, match="not a merge of two lower-ranked tokens"):
        tiktoken_to_hf(path, QWEN_PATTERN, ("<|endoftext|>",), "<|endoftext|>")
