"""How much a packed neighbour changes the teacher: masked vs unmasked on packed plays.

The speeches of a play (``bench.chat_shakespeare.speeches``) are the documents; stage 1's own
packer joins them with EOS into ``--seq-len`` sequences. The teacher (the embedded SmolLM2 by
default) runs each sequence twice: as stage 1 does without ``data.document_mask`` (plain causal
attention over the whole sequence) and with it (attention inside each document, positions
restarted). Prints one JSON object: the mean KL(masked || unmasked) of the full next-token
distributions, over every position and over the positions after a sequence's first document
(the only ones the mask can change), the mean absolute difference of the next-token log-prob,
the KL by how deep into its document a position is, the teacher's perplexity both ways on those
positions, top-1 agreement, and the forward time of each pass.

    python -m bench.document_mask [--play hamlet] [--sequences 8] [--seq-len 256]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch


def packed_sequences(tokenizer, texts: list[str], seq_len: int, count: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids, doc ids) of the first ``count`` sequences stage 1's packer makes of ``texts``."""
    from stage1_teacher_cache.plan import Packer, tokenize_batch

    out: list[tuple[np.ndarray, np.ndarray]] = []
    packer = Packer(seq_len, tokenizer.eos_token_id, "\n\n", count,
                    lambda ids, text, ends, docs, mask: out.append((ids, docs)))
    for doc_id, (text, (ids, offsets)) in enumerate(zip(texts, tokenize_batch(tokenizer, texts))):
        packer.add(doc_id, text, ids, offsets)
        if packer.full:
            break
    return out


def measure(model, sequences, threads: int) -> dict:
    from pipeline.document_mask import forward_kwargs, position_ids

    torch.set_num_threads(threads)
    kl_all, kl_after, lp_diff, nll_m, nll_u, agree, n_after, times = [], [], [], [], [], [], 0, {"masked": 0.0,
                                                                                                 "unmasked": 0.0}
    boundaries, depth_kl = 0, {"0-3": [], "4-15": [], "16+": []}
    for ids, docs in sequences:
        x = torch.from_numpy(ids.astype(np.int64))[None]
        d = torch.from_numpy(docs.astype(np.int64))[None]
        with torch.inference_mode():
            t0 = time.perf_counter()
            plain = torch.log_softmax(model(input_ids=x).logits[0].float(), -1)
            t1 = time.perf_counter()
            masked = torch.log_softmax(model(input_ids=x, **forward_kwargs(model, d)).logits[0].float(), -1)
            t2 = time.perf_counter()
        times["unmasked"] += t1 - t0
        times["masked"] += t2 - t1
        kl = (masked.exp() * (masked - plain)).sum(-1).clamp_min(0).double().numpy()
        after = docs != docs[0]  # positions past the sequence's first document: the mask changes them
        boundaries += int((docs[1:] != docs[:-1]).sum())
        kl_all.append(kl)
        kl_after.append(kl[after])
        depth = position_ids(d)[0].numpy()  # how far into its document each position is
        for name, (lo, hi) in {"0-3": (0, 4), "4-15": (4, 16), "16+": (16, 1 << 30)}.items():
            depth_kl[name].append(kl[after & (depth >= lo) & (depth < hi)])
        t = np.flatnonzero(after[:-1])
        target = torch.from_numpy(ids[t + 1].astype(np.int64))
        lm, lu = masked[t].gather(1, target[:, None])[:, 0].double(), plain[t].gather(1, target[:, None])[:, 0].double()
        lp_diff.append((lm - lu).abs().numpy())
        nll_m.append(-lm.numpy())
        nll_u.append(-lu.numpy())
        agree.append((masked[after].argmax(-1) == plain[after].argmax(-1)).numpy())
        n_after += int(after.sum())
    cat = np.concatenate
    return {
        "sequences": len(sequences), "seq_len": int(len(sequences[0][0])), "document_boundaries": boundaries,
        "positions": int(sum(len(k) for k in kl_all)), "positions_after_first_document": n_after,
        "kl_masked_unmasked_mean_all": float(cat(kl_all).mean()),
        "kl_masked_unmasked_mean_after_first_document": float(cat(kl_after).mean()),
        "kl_masked_unmasked_p90_after_first_document": float(np.quantile(cat(kl_after), 0.9)),
        "kl_after_first_document_by_depth_in_document": {k: {"mean": float(cat(v).mean()), "positions": len(cat(v))}
                                                          for k, v in depth_kl.items()},
        "next_logprob_abs_diff_mean_after_first_document": float(cat(lp_diff).mean()),
        "teacher_ppl_after_first_document": {"masked": math.exp(cat(nll_m).mean()),
                                             "unmasked": math.exp(cat(nll_u).mean())},
        "top1_agreement_after_first_document": float(cat(agree).mean()),
        "forward_s": {k: round(v, 3) for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    from bench.chat_shakespeare import speeches
    from pipeline.config import TeacherConfig
    from stage1_teacher_cache.teacher import load_model, load_tokenizer, resolve_teacher

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--play", default="hamlet")
    p.add_argument("--data", default="data/shakespeare")
    p.add_argument("--teacher", default="embedded:smollm2-135m-instruct")
    p.add_argument("--sequences", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    source = resolve_teacher(TeacherConfig(model=a.teacher))
    tokenizer = load_tokenizer(source)
    model = load_model(source, torch.float32, torch.device("cpu"))
    text = (Path(a.data) / f"{a.play}_gut.txt").read_text(encoding="utf-8")
    sequences = packed_sequences(tokenizer, speeches(text), a.seq_len, a.sequences)
    result = {"teacher": a.teacher, "play": a.play, "attn_implementation": model.config._attn_implementation,
              **measure(model, sequences, a.threads)}
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
