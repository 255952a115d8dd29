"""A small chat set from public-domain text, and a masked distillation run on it.

Consecutive speeches of a Shakespeare play (``data/shakespeare``, Project Gutenberg) become
conversations: speech 1 is the user's turn, speech 2 the assistant's, and so on (``--turns``
speeches per conversation). The rows are written as ``messages`` JSON lines; stage 1 renders
them with the teacher's chat template (the embedded SmolLM2-135M-Instruct by default) and caches
a loss mask; stage 2 trains the default student on the assistant's tokens only, logging to
TensorBoard. Prints one JSON object: the mask's bytes per token, the fraction of tokens that are
targets, the teacher's and the student's held-out numbers (and which tokens they count).

    python -m bench.chat_shakespeare --out /tmp/chat-bench [--plays hamlet macbeth] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SPEAKER = re.compile(r"^[A-Z][A-Za-z. ]{0,24}\.$")  # "Ham.", "First Clown.", "Mar."
STAGE_DIRECTION = re.compile(r"\[[^\]]*\]")


def speeches(text: str) -> list[str]:
    """The play's speeches in order: blocks whose first line names a speaker, without the name
    and the stage directions."""
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [line.strip() for line in block.strip().split("\n")]
        if len(lines) >= 2 and SPEAKER.match(lines[0]):
            speech = STAGE_DIRECTION.sub("", " ".join(lines[1:])).strip()
            if speech:
                out.append(re.sub(r"\s+", " ", speech))
    return out


def chat_rows(text: str, turns: int = 4) -> list[dict]:
    """Conversations of ``turns`` consecutive speeches, alternating user and assistant."""
    said = speeches(text)
    return [{"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": s}
                          for i, s in enumerate(said[start:start + turns])]}
            for start in range(0, len(said) - turns + 1, turns)]


def write_chat_set(plays: list[str], folder: Path, turns: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "speeches.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for play in plays:
            text = (Path("data/shakespeare") / f"{play}_gut.txt").read_text(encoding="utf-8")
            for row in chat_rows(text, turns):
                f.write(json.dumps(row) + "\n")
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="folder for the chat set, the cache and the runs")
    ap.add_argument("--plays", nargs="+", default=["hamlet", "macbeth"])
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--train-tokens", type=int, default=20480)
    ap.add_argument("--mode", default="topk_tail")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args(argv)

    from pipeline.cache import CacheReader
    from pipeline.config import load_config
    from stage1_teacher_cache.run import cache_teacher
    from stage2_student_train.train import train

    out = Path(args.out)
    data = write_chat_set(args.plays, out / "chat", args.turns)
    common = [f"data.source={json.dumps(str(data.parent))}", "data.eval_documents=[]", "data.eval_fraction=0.1",
              f"data.max_train_tokens={args.train_tokens}", "data.max_eval_tokens=4096",
              f"cache.dir={json.dumps(str(out / 'cache'))}", "cache.store_head=false"]
    info = cache_teacher(load_config("configs/default.toml", common), show_progress=False)
    reader = CacheReader(out / "cache")
    mask = reader.read_range(0, len(reader), ("loss_mask",))["loss_mask"]
    summary = train(load_config("configs/default.toml", common + [
        f"run.runs_dir={json.dumps(str(out / 'runs'))}", "run.name=chat", f"train.steps={args.steps}",
        f"train.batch_size={args.batch_size}",
        f"train.eval_every={max(1, args.steps // 4)}", f"train.save_every={args.steps}",
        f"train.warmup_steps={min(20, args.steps // 5)}", f"kd.mode={args.mode}", 'train.report_to=["tensorboard"]',
        "train.overwrite=true"]), show_progress=False)
    print(json.dumps({
        "rows": sum(1 for _ in open(data)), "cache_tokens": info["tokens"],
        "loss_mask_bytes_per_token": info["array_bytes_per_token"].get("loss_mask"),
        "bytes_per_token_without_mask": round(sum(v for k, v in info["array_bytes_per_token"].items()
                                                  if k != "loss_mask"), 2),
        "target_fraction": round(float(mask.mean()), 4),
        "teacher_eval_ppl_all_tokens": info.get("teacher_eval_ppl"),
        "teacher_eval_ppl_targets": info.get("teacher_eval_ppl_targets"),
        "teacher_eval_bpb_targets": info.get("teacher_eval_bpb_targets"),
        "student_eval": summary["eval"], "run_dir": summary["run_dir"]}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
