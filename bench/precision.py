"""The embedded teacher's low-precision error on the CPU: fp16 and bf16 against fp32.

    python -m bench.precision [--sequences 4] [--seq-len 256]

For each low dtype, two heads over the same low-precision body: ``old`` = the head in the
teacher's dtype, upcast after (what stage 1 did before ``Fp32Head``), ``new`` = ``Fp32Head``
(hidden and head upcast before the matmul). Both are compared with the teacher in fp32 through
``stage1_teacher_cache.audit.precision_stats`` (logZ abs diff, top-1 agreement, KL over top-64 + tail).
What ``new`` still shows is the low-precision body's own error. Prints JSON.
"""

from __future__ import annotations

import argparse
import json

import torch

from pipeline.config import load_config
from stage1_teacher_cache.audit import merge_precision_stats, precision_stats
from stage1_teacher_cache.teacher import TeacherPass, load_model, load_tokenizer, resolve_teacher


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--text", default="data/shakespeare/hamlet_gut.txt")
    a = ap.parse_args()
    cpu = torch.device("cpu")
    source = resolve_teacher(load_config("configs/default.toml").teacher)
    tokens = load_tokenizer(source)(open(a.text, encoding="utf-8").read()[20000:200000])["input_ids"]
    ids = torch.tensor(tokens[: a.sequences * a.seq_len]).view(a.sequences, a.seq_len)
    ref_model = load_model(source, torch.float32, cpu)
    with torch.inference_mode():
        ref = [ref_model(input_ids=ids[i:i + 1], use_cache=False).logits[0].float() for i in range(len(ids))]
    del ref_model
    out = {}
    for dtype in (torch.float16, torch.bfloat16):
        teacher = TeacherPass(load_model(source, dtype, cpu), 64, 512)
        for name, head in (("old_head_in_dtype", teacher.native_logits), ("new_fp32_head", teacher.logits)):
            parts = []
            for i in range(len(ids)):
                with torch.inference_mode():
                    logits = head(teacher.base(input_ids=ids[i:i + 1], use_cache=False).last_hidden_state[0])
                    logz = torch.logsumexp(logits, -1)
                    values, top = logits.topk(64, -1)
                parts.append(precision_stats(ref[i], logz.numpy(), top.numpy(), (values - logz[:, None]).numpy()))
            out.setdefault(str(dtype).removeprefix("torch."), {})[name] = merge_precision_stats(parts)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
