"""The fidelity table of docs/loss-math.md ("Fidelity at temperature"): the KD loss a student
equal to the exact teacher pays when trained on a decoded top-k cache, per encoding and
temperature, through the real codecs (``logit_codec`` for sqrt8, ``logp_codec`` for logp16).

Teachers: the embedded SmolLM2-135M on the first positions of Hamlet (exact top-k and exact
log-tails from the full fp32 softmax, in float64), and two synthetic Zipf-shaped teachers over
V = 49152 (peaked, near one-hot). k = 64. ``--steps`` also measures other logp grid steps, and
``--bits`` the order-0 entropy of the value codes (bits/value) for each row.

    python -m bench.topk_fidelity [--positions 2048] [--steps 8,12,16,20,24,32]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from pipeline.cache import logit_codec, logp_codec

K, V_SYNTH = 64, 49152


def real_teacher_rows(positions: int, text: Path, seq_len: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(exact top-k log-probs [N, K] by descending p, exact log-tails [N]) of the embedded
    teacher on ``text``, from the full softmax in float64."""
    import torch

    from pipeline.config import TeacherConfig
    from stage1_teacher_cache.teacher import TeacherPass, load_model, load_tokenizer, resolve_teacher

    source = resolve_teacher(TeacherConfig(model="embedded:smollm2-135m-instruct"))
    tok = load_tokenizer(source)
    ids = tok(text.read_text(encoding="utf-8"))["input_ids"][:positions]
    rows = torch.tensor(ids[:len(ids) // seq_len * seq_len]).view(-1, seq_len)
    teacher = TeacherPass(load_model(source, torch.float32, torch.device("cpu")), K, 256)
    lps, tails = [], []
    with torch.inference_mode():
        for row in rows:
            hidden = teacher.base(input_ids=row[None], use_cache=False).last_hidden_state[0]
            logp = torch.log_softmax(teacher.logits(hidden).double(), -1)
            top, idx = logp.topk(K, dim=-1)
            rest = logp.scatter(1, idx, float("-inf"))
            lps.append(top.numpy())
            tails.append(torch.logsumexp(rest, -1).numpy())
    return np.concatenate(lps), np.concatenate(tails)


def synthetic_rows(seed: int, alpha: float, boost: float, rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Zipf-shaped sorted log-probs with noise (as tests/test_logit_codec.py, over V = 49152)."""
    rng = np.random.default_rng(seed)
    z = -alpha * np.log(np.arange(1, V_SYNTH + 1)) + 0.3 * rng.standard_normal((rows, V_SYNTH))
    z[:, 0] += boost
    lp = -np.sort(-(z - np.logaddexp.reduce(z, axis=-1, keepdims=True)), axis=-1)
    return lp[:, :K], np.logaddexp.reduce(lp[:, K:], axis=-1)


def sqrt8_rows(lp: np.ndarray, lt: np.ndarray, exact_tail: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(decoded log-probs, decoded log-tail, value codes) through sqrt8 (default decoding)."""
    d_lp, d_lt = logit_codec.roundtrip_with_tail(lp.astype(np.float32), log_tail=lt if exact_tail else None)
    return d_lp, d_lt, np.rint(np.sqrt(np.exp(lp)) * logit_codec.SQRT_LEVELS)


def logp_rows(lp: np.ndarray, lt: np.ndarray, exact_tail: bool, step: float
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d_lp, d_lt = logp_codec.roundtrip_with_tail(lp.astype(np.float32), lt if exact_tail else None, step)
    return d_lp, d_lt, logp_codec.log_codes(lp.astype(np.float32), step)


def entropy_bits(codes: np.ndarray) -> float:
    _, counts = np.unique(codes, return_counts=True)
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--positions", type=int, default=2048)
    ap.add_argument("--text", default="data/shakespeare/hamlet_gut.txt")
    ap.add_argument("--steps", default="24", help="logp grid steps per nat to measure, comma-separated")
    ap.add_argument("--fp32-tail", action="store_true",
                    help="encode the tail as 1 - sum of the fp32 log-probs (what stage 1 hands the codec)")
    args = ap.parse_args()
    teachers = {"SmolLM2-135M on Hamlet": real_teacher_rows(args.positions, Path(args.text)),
                "peaked": synthetic_rows(2, 3.0, 0.0), "near one-hot": synthetic_rows(3, 2.0, 15.0)}
    results = []
    for name, (lp, lt) in teachers.items():
        top1 = float(np.exp(lp[:, 0]).mean())
        encodings = {"sqrt8": lambda e: sqrt8_rows(lp, lt, e)}
        for s in (int(x) for x in args.steps.split(",")):
            encodings[f"logp16 step 1/{s}"] = (lambda e, s=s: logp_rows(lp, lt, e, 1.0 / s))
        for enc, run in encodings.items():
            d_lp, d_lt, codes = run(not args.fp32_tail)
            row = {"teacher": name, "top1_mean": top1, "encoding": enc, "bits_per_value": entropy_bits(codes)}
            for tau in (1.0, 2.0, 4.0):
                row[f"tau{tau:g}"] = float(logit_codec.tempered_bucket_kl(lp, d_lp, tau, lt, d_lt).mean())
            results.append(row)
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
