"""``python -m pipeline <command>``: the one place where errors become one-line messages.

The stage commands are looked up by module path when they run, so ``pipeline`` itself never
imports a stage (the data flow stays one-way: stages import ``pipeline``).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import json
import sys
from typing import Callable

from . import __version__
from .errors import NotImplementedYet, PipelineError

# command -> ("module:function", help). The function takes the parsed argparse namespace.
COMMANDS: dict[str, tuple[str, str]] = {
    "cache-teacher": ("stage1_teacher_cache.run:main", "stage 1: run the teacher once and cache its outputs"),
    "train-student": ("stage2_student_train.train:main", "stage 2: train a student from a cache"),
    "resume": ("stage2_student_train.train:resume_main", "continue a stage-2 run from a checkpoint"),
    "prune-teacher": ("stage1_teacher_cache.prune:main",
                      "a student initialised from the teacher: drop the least important layers, optionally narrow"),
    "eval": ("stage2_student_train.evaluate:main", "evaluate a trained student on the cache's held-out sequences"),
    "plot": ("pipeline.plot:main", "draw metrics.jsonl curves to PNG"),
    "report": ("pipeline.report:main", "write REPORT.md + plots comparing student runs of one cache"),
    "bench": ("bench.run:main", "measure the performance ratios P1-P6"),
    "quality": ("bench.quality:main", "offline KD modes vs online full-vocabulary KD, same student/data/steps"),
    "inspect": ("pipeline.cli:cmd_inspect", "describe a cache (add --json for machine-readable output)"),
    "doctor": ("pipeline.doctor:main", "report versions, device and the precision the pipeline would use"),
    "show-config": ("pipeline.cli:cmd_show_config", "print the resolved config"),
    "push": ("stage2_student_train.push:main", "upload a finished run's student and model card to the Hugging Face Hub"),
}

# inspect's checks that rerun the teacher live with the stage that runs it: looked up like commands.
AUDITS = {"audit": "stage1_teacher_cache.audit:audit",
          "precision_check": "stage1_teacher_cache.audit:precision_check"}

CONFIG_COMMANDS = ("cache-teacher", "train-student", "eval", "bench", "show-config", "quality", "prune-teacher")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in CONFIG_COMMANDS:
            p.add_argument("--config", help="TOML config file (default: built-in defaults)")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        if name == "bench":
            p.add_argument("--sequences", type=int, default=16, help="sequences of 256 tokens to cache")
            p.add_argument("--batch-size", type=int, default=8, help="student micro-batch")
            p.add_argument("--repeats", type=int, default=5, help="timings per measurement")
        if name == "quality":
            p.add_argument("--setting", choices=("default", "dev"), default="default",
                           help="sizes: default (~15 min per seed on 2 cores) or dev (minutes)")
            p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (student init + data order)")
            p.add_argument("--variants", help="comma-separated subset of the variants (must include none, online)")
            p.add_argument("--fidelity-sequences", type=int, default=4, help="held-out sequences for gradient fidelity")
            p.add_argument("--no-fidelity", action="store_true", help="skip the gradient-fidelity sub-report")
            p.add_argument("--no-equal-wall", action="store_true", help="skip the equal wall-clock runs")
            p.add_argument("--equal-wall-variant", help="the variant of the equal wall-clock runs (default: the best "
                                                        "offline one by mean ppl over the seeds run)")
            p.add_argument("--out", help="directory for results.{json,md} and curves.png (default: quality/)")
            p.add_argument("--merge", help="comma-separated result directories of one setting (other seeds each): "
                                           "write their pooled report to --out, training nothing")
        if name == "prune-teacher":
            p.add_argument("--out", required=True, help="new directory for the student (model + tokenizer)")
            p.add_argument("--layers", type=int, help="decoder layers to keep (default: all)")
            p.add_argument("--hidden-size", type=int, help="residual width to keep, a multiple of the head dim "
                                                            "(keeps hidden/head_dim heads; default: the teacher's)")
            p.add_argument("--intermediate-size", type=int, help="MLP width to keep (default: the teacher's)")
            p.add_argument("--calibration", type=int, default=8,
                           help="training sequences of the plan the importance scores are measured on")
        if name == "inspect":
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
        if name == "doctor":
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
        if name == "resume":
            p.add_argument("checkpoint", help="checkpoint directory, e.g. runs/NAME/checkpoints/step-N")
            p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
        if name == "report":
            p.add_argument("runs", nargs="+", help="finished run directories")
            p.add_argument("--out", required=True, help="directory for REPORT.md and curves.png")
            p.add_argument("--no-generations", action="store_true", help="skip the greedy generations")
        if name == "push":
            p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory (its final/student is uploaded)")
            p.add_argument("--repo-id", required=True, help="hub repo, USER/NAME (created if it does not exist)")
            p.add_argument("--private", action="store_true", help="create the repo private")
        if name == "plot":
            p.add_argument("runs", nargs="+", help="run directories")
            p.add_argument("--out", help="PNG file (default: RUN/curves.png of the first run)")
    return parser


def resolve(target: str) -> Callable[[argparse.Namespace], int | None]:
    module, func = target.split(":")
    return getattr(importlib.import_module(module), func)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.command:
        build_parser().print_help()
        return 2
    target = COMMANDS[args.command][0]
    try:
        if not target:
            raise NotImplementedYet(f"'{args.command}' is not implemented yet in this version")
        return resolve(target)(args) or 0
    except PipelineError as e:
        return fail(str(e))
    except KeyboardInterrupt:
        return fail("interrupted; committed work is kept, rerun the same command to continue", code=130)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            return fail(f"disk full while writing {e.filename or ''}; free space and rerun (committed work is kept)")
        if e.errno == errno.ENOTDIR:
            return fail(f"{e.filename or 'a path'}: a part of this path is a file, not a directory; "
                        "choose a path under a directory")
        if e.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            return fail(f"cannot write {e.filename or ''}: {e.strerror}; choose a writable directory")
        raise


def fail(message: str, code: int = 2) -> int:
    _close_progress_bars()
    print(f"error: {message}", file=sys.stderr)
    return code


def _close_progress_bars() -> None:
    """A progress bar still open when an error surfaces would swallow the start of the message
    line; close them so the error stands on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ---------------------------------------------------------------- small commands


def cmd_show_config(args: argparse.Namespace) -> int:
    from .config import load_config, to_toml
    print(to_toml(load_config(args.config, args.overrides)), end="")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from .cache import CacheReader
    from .errors import CacheError
    if args.verify:
        from .cache.verify import verify_cache
        from .cache.store import open_storage
        if not open_storage(args.cache).is_dir():
            CacheReader(args.cache)  # the usual one-line error: missing, a file, ...
        report = verify_cache(args.cache)
        if args.json:
            print(json.dumps({"path": str(args.cache), "verify": report.as_dict()}, indent=1))
        else:
            print(f"checked {report.checked_files} files, {report.checked_bytes} bytes")
            if report.uncommitted:
                print(f"uncommitted shards (a rerun of cache-teacher finishes them): {report.uncommitted}")
            for line in report.damaged:
                print(f"DAMAGED {line}")
        if not report.ok:
            raise CacheError(f"cache {args.cache} is damaged: {len(report.damaged)} problem(s), first: "
                             f"{report.damaged[0]}")
        if not args.json:
            print("cache verified: every committed file matches its checksum")
        return 0
    reader = CacheReader(args.cache, verify=not (args.audit or args.precision_check))
    info = reader.info()
    if args.audit:
        reader.require_complete()
        info["audit"] = resolve(AUDITS["audit"])(reader, args.audit_sequences)
    if args.precision_check:
        reader.require_complete()
        info["precision_check"] = resolve(AUDITS["precision_check"])(reader, args.audit_sequences)
    if args.json:
        print(json.dumps(info, indent=1, default=str))
        return 0
    width = max(map(len, info))
    for k, v in info.items():
        if isinstance(v, float):
            v = f"{v:.4g}"
        elif isinstance(v, dict):
            v = json.dumps(v, default=str)
        print(f"{k:<{width}}  {v}")
    return 0
