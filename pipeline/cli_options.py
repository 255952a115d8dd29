"""Each command's own arguments, one function a command (``pipeline.cli`` builds the parser)."""

from __future__ import annotations

import argparse


def config_arguments(p: argparse.ArgumentParser) -> None:
    """``--config FILE`` and dotted ``key=value`` overrides (the commands that read a config)."""
    p.add_argument("--config", help="TOML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sequences", type=int, default=16, help="sequences of 256 tokens to cache")
    p.add_argument("--batch-size", type=int, default=8, help="student micro-batch")
    p.add_argument("--repeats", type=int, default=5, help="timings per measurement")


def quality(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", choices=("default", "dev", "cross"), default="default",
                   help="sizes: default (23-27 min per seed on 2 idle cores), dev (minutes), or cross (the default "
                        "sizes, a student with GPT-2's tokenizer, scored in bits/byte; writes quality/cross/)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (student init + data order)")
    p.add_argument("--variants", help="comma-separated subset of the variants (must include none and online, "
                                         "or online_cross for --setting cross)")
    p.add_argument("--fidelity-sequences", type=int, default=4, help="held-out sequences for gradient fidelity")
    p.add_argument("--no-fidelity", action="store_true", help="skip the gradient-fidelity sub-report")
    p.add_argument("--fidelity-only", action="store_true",
                   help="measure only the gradient-fidelity sub-report again, on the students of the finished "
                        "run in --out (pass its run.runs_dir=...), training nothing")
    p.add_argument("--no-equal-wall", action="store_true", help="skip the equal wall-clock runs")
    p.add_argument("--equal-wall-variant", help="the variant of the equal wall-clock runs (default: the best "
                                                "offline one by mean ppl over the seeds run)")
    p.add_argument("--out", help="directory for results.{json,md} and curves.png (default: quality/)")
    p.add_argument("--merge", help="comma-separated result directories of one setting (other seeds each): "
                                   "write their pooled report to --out, training nothing")


def prune_teacher(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, help="new directory for the student (model + tokenizer)")
    p.add_argument("--layers", type=int, help="decoder layers to keep (default: all)")
    p.add_argument("--hidden-size", type=int, help="residual width to keep, a multiple of the head dim "
                                                    "(keeps hidden/head_dim heads; default: the teacher's)")
    p.add_argument("--intermediate-size", type=int, help="MLP width to keep (default: the teacher's)")
    p.add_argument("--calibration", type=int, default=8,
                   help="training sequences of the plan the importance scores are measured on")


def inspect(p: argparse.ArgumentParser) -> None:
    p.add_argument("cache", help="cache directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--verify", action="store_true",
                   help="check every byte of every file against its commit checksums; name what is "
                        "damaged and exit non-zero if anything is")
    p.add_argument("--audit", action="store_true",
                   help="also rerun the teacher on a sample: top-k mass and KL for k in 8..128")
    p.add_argument("--audit-sequences", type=int, default=4, help="sequences the audit samples")
    p.add_argument("--precision-check", action="store_true",
                   help="recompute a few sequences in fp32 on the CPU: the cache's low-precision error "
                        "(logZ diff, top-1 agreement, KL over top-k + tail)")


def doctor(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="also plan the peak memory of this config's stages 1 and 2")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    p.add_argument("--device-memory", help="plan against this much GPU memory (e.g. 16GiB) "
                                           "instead of the device this machine has")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--compute-capability", help="plan for a card of this compute capability "
                                                "(e.g. 6.0 for a P100): its precision policy")
    p.add_argument("--card", help="plan for this card: p100, t4, v100, a10g, l4, a100, a100-80gb, h100 "
                                  "(its capability and, unless --device-memory, its memory)")
    p.add_argument("--teacher-config", help="plan from this local config.json (or folder) for the "
                                            "teacher instead of reading teacher.model (no hub needed)")
    p.add_argument("--student-config", help="the same for the student (instead of student.model)")


def resume(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint directory, e.g. runs/NAME/checkpoints/step-N")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")


def report(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--out", required=True, help="directory for REPORT.md and curves.png")
    p.add_argument("--no-generations", action="store_true", help="skip the greedy generations")


def push(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (its final/student is uploaded)")
    p.add_argument("--repo-id", help="hub repo, USER/NAME (created if it does not exist); needed unless --dry-run")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--dry-run", action="store_true", help="print the model card and the files that would be "
                                                          "uploaded, and upload nothing")


def plot(p: argparse.ArgumentParser) -> None:
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="PNG file (default: RUN/curves.png of the first run)")


OPTIONS = {"bench": bench, "quality": quality, "prune-teacher": prune_teacher, "inspect": inspect,
           "doctor": doctor, "resume": resume, "report": report, "push": push, "plot": plot}
