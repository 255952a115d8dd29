"""What ``topk_tail`` at tau != 1 trains towards, against the tempered teacher, on real text.

    python -m bench.tempered_tail [--tokens 1024] [--k 64] [--taus 1,2,4]

Per position of the embedded teacher on the start of Hamlet: the share of the tempered mass
beyond the top-k in ``topk_tail``'s target (the (K+1)-bucket distribution tempered: ``T^(1/tau) /
(sum_i p_i^(1/tau) + T^(1/tau))``) and in the full tempered teacher (``sum_{v beyond top-k}
p_v^(1/tau) / sum_v p_v^(1/tau)``). Prints the means as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def tail_shares(logp: torch.Tensor, k: int, tau: float) -> tuple[float, float]:
    """(mean tempered tail share of the (K+1)-bucket target, of the full tempered teacher)."""
    lp = logp.double()
    top = lp.topk(k, -1)
    log_t = torch.log(-torch.expm1(torch.logsumexp(top.values, -1)))
    buckets = torch.cat([top.values, log_t[:, None]], -1) / tau
    bucket_tail = torch.softmax(buckets, -1)[:, -1]
    beyond = lp.scatter(-1, top.indices, float("-inf")) / tau
    full_tail = torch.exp(torch.logsumexp(beyond, -1) - torch.logsumexp(lp / tau, -1))
    return float(bucket_tail.mean()), float(full_tail.mean())


def main(argv: list[str] | None = None) -> int:
    from pipeline.config import load_config
    from stage1_teacher_cache.teacher import load_model, resolve_teacher

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--taus", default="1,2,4")
    args = p.parse_args(argv)
    cfg = load_config("configs/default.toml", [])
    source = resolve_teacher(cfg.teacher)
    model = load_model(source, torch.float32, torch.device("cpu"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    text = (Path(cfg.data.source) / "hamlet_gut.txt").read_text(encoding="utf-8")[20_000:80_000]
    ids = torch.tensor([tok(text)["input_ids"][:args.tokens]])
    with torch.inference_mode():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    out = {}
    for tau in (float(t) for t in args.taus.split(",")):
        bucket, full = tail_shares(logp, args.k, tau)
        out[f"tau {tau:g}"] = {"topk_tail target's tail share": round(bucket, 4), "tempered teacher's": round(full, 4)}
    print(json.dumps({"positions": ids.shape[1], "k": args.k, **out}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
