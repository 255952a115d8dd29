"""P7: stage-1 peak memory is flat in corpus size.

``cache-teacher`` runs in a fresh process per corpus size (N, 3N, 10N tokens; N = 200k by
default, so 10N = 2M) over a synthetic corpus of many small documents in JSON-lines files, with
a tiny teacher (a 2-layer Llama, d=32, over a 1024-entry byte-level BPE trained on the corpus's
pseudo-words: a small head keeps 10N fast). Each process reports its peak resident set
(``VmHWM`` in /proc/self/status) after the whole run: imports, planning, teacher pass, writes.
The ratio peak(10N) / peak(N) is the target (<= 1.15); ``mb_per_million_tokens`` is the slope
(the planner that held the whole plan in memory cost ~77 MB per million tokens).

    python -m bench.p7 [--tokens 200000] [--one-document]   # standalone: prints the curve as JSON
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

WORDS_SEED = 7
SIZES = (1, 3, 10)


def small_tokenizer(words: list[str]):
    """A byte-level BPE with a 1024-entry vocabulary trained on the pseudo-words: a small head
    keeps the tiny teacher fast, so 10N can be millions of tokens in a bench run."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([" ".join(words)] * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def tiny_teacher(out: Path) -> Path:
    """A randomly initialised 2-layer Llama (d=32) over ``small_tokenizer``'s vocabulary."""
    from bench.tiny import tiny_llama_teacher

    return tiny_llama_teacher(small_tokenizer(vocabulary()), out)


def vocabulary() -> list[str]:
    rng = random.Random(WORDS_SEED)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "the", "and", "ing", "er", "on", "st"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(3000)]


def synthetic_corpus(folder: Path, tokens: int, doc_tokens: int = 300, files: int = 4,
                     one_document: bool = False) -> Path:
    """~``tokens`` tokens of pseudo-words in documents of ~``doc_tokens`` tokens, spread
    over ``files`` JSON-lines files (deterministic); ``one_document``: all of it as one .txt
    document (a line per ~``doc_tokens`` tokens), plus a small second one for eval."""
    words = vocabulary()
    rng = random.Random(WORDS_SEED + tokens)
    folder.mkdir(parents=True, exist_ok=True)
    if one_document:
        lines = max(1, round(tokens / doc_tokens))
        with open(folder / "a-huge.txt", "w") as f:
            for _ in range(lines):
                f.write(" ".join(rng.choice(words) for _ in range(int(doc_tokens / 1.1))) + ".\n")
        (folder / "b-eval.txt").write_text(" ".join(rng.choice(words) for _ in range(2000)) + ".\n")
        return folder
    per_doc_words = int(doc_tokens / 1.1)  # ~1.1 tokens per pseudo-word (measured)
    docs = max(files, round(tokens / doc_tokens))
    handles = [open(folder / f"part-{i:03d}.jsonl", "w") for i in range(files)]
    for d in range(docs):
        text = " ".join(rng.choice(words) for _ in range(per_doc_words)) + "."
        handles[d % files].write(json.dumps({"text": text}) + "\n")
    for h in handles:
        h.close()
    return folder


def overrides(teacher: Path, corpus: Path, cache: Path) -> list[str]:
    return [f"teacher.model={json.dumps(str(teacher))}", "teacher.batch_size=8", "teacher.logits_chunk=256",
            "teacher.num_threads=1", f"data.source={json.dumps(str(corpus))}", "data.seq_len=128",
            "data.eval_documents=[]", "data.eval_fraction=0.02", "data.max_train_tokens=0",
            "data.max_eval_tokens=0", f"cache.dir={json.dumps(str(cache))}", "cache.top_k=16",
            "cache.topk_encoding=\"sqrt8\"", "cache.shard_sequences=32", "cache.chunk_sequences=8",
            "cache.store_head=false", "cache.overwrite=true"]


def status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(teacher: Path, corpus: Path, cache: Path) -> dict:
    """In this (fresh) process: run stage 1, report its peak RSS."""
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher

    info = cache_teacher(load_config(None, overrides(teacher, corpus, cache)), show_progress=False)
    return {"tokens": info["tokens"], "sequences": info["sequences"], "peak_mb": round(status_kb("VmHWM") / 1024, 1),
            "stage1_wall_s": info.get("stage1_wall_s")}


def run(tokens: int = 200_000, sizes: tuple[int, ...] = SIZES, one_document: bool = False) -> dict:
    """The P7 row: peak RSS per corpus size and the ratio of the largest to the smallest
    (``one_document``: each corpus is one huge document, see ``synthetic_corpus``)."""
    with tempfile.TemporaryDirectory(prefix="kd-p7-") as tmp:
        tmp = Path(tmp)
        teacher = tiny_teacher(tmp / "teacher")
        curve = []
        for mult in sizes:
            corpus = synthetic_corpus(tmp / f"corpus-{mult}", tokens * mult, one_document=one_document)
            cmd = [sys.executable, "-m", "bench.p7", "--probe", str(teacher), str(corpus), str(tmp / f"cache-{mult}")]
            res = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
            if res.returncode != 0:
                raise RuntimeError(f"P7 probe for {mult}N failed: {res.stderr.strip()[-2000:]}")
            curve.append({"size": f"{mult}N", **json.loads(res.stdout.strip().splitlines()[-1])})
    lo, hi = curve[0], curve[-1]
    ratio = hi["peak_mb"] / lo["peak_mb"]
    slope = (hi["peak_mb"] - lo["peak_mb"]) / ((hi["tokens"] - lo["tokens"]) / 1e6)
    return {"ratio": {"median": ratio, "min": ratio, "max": ratio, "n": 1}, "curve": curve,
            "mb_per_million_tokens": round(slope, 2)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--probe", nargs=3, metavar=("TEACHER", "CORPUS", "CACHE"))
    p.add_argument("--tokens", type=int, default=200_000, help="N: tokens of the smallest corpus")
    p.add_argument("--one-document", action="store_true", help="each corpus is one huge document")
    a = p.parse_args()
    if a.probe:
        print(json.dumps(probe(*(Path(x) for x in a.probe))))
    else:
        print(json.dumps(run(a.tokens, one_document=a.one_document), indent=1))


if __name__ == "__main__":
    main()
