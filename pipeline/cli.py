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
from .cli_options import OPTIONS, config_arguments
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
    "bench": ("bench.run:main", "measure the performance ratios P1-P9 and P4b"),
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
            config_arguments(p)
        if name in OPTIONS:
            OPTIONS[name](p)
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
        resolve_path_arguments(args)
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


PATH_ARGUMENTS = ("config", "cache", "checkpoint", "run_dir", "out", "teacher_config", "student_config", "runs",
                  "merge")
"""The command-line arguments that name paths: each follows the ``work:`` rule as config paths do."""


def resolve_path_arguments(args: argparse.Namespace) -> None:
    from .config import resolve_work

    for name in PATH_ARGUMENTS:
        value = getattr(args, name, None)
        if isinstance(value, list):
            setattr(args, name, [resolve_work(v) for v in value])
        elif isinstance(value, str) and name == "merge":
            setattr(args, name, ",".join(resolve_work(v.strip()) for v in value.split(",")))
        elif isinstance(value, str):
            setattr(args, name, resolve_work(value))


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
