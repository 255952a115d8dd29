"""Reading finished ``quality`` results back (``--merge``, ``--fidelity-only``): each part is
checked before anything is written, so a missing folder, bad JSON, an empty object or parts
that ran different settings are one-line errors and no ``--out`` is left behind."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

from pipeline.errors import ConfigError

NEEDED = ("setting", "seeds", "per_seed", "step_s", "times", "facts", "commands", "gradient_fidelity", "equal_wall")
WHERE_KEYS = ("run.runs_dir", "run.name", "cache.dir", "cache.views_dir", "cache.plan_dir", "train.device",
              "train.num_threads", "teacher.num_threads", "teacher.device")
"""Overrides that say where or how fast a part ran, not what it measured: parts may differ there."""
PER_PART_FLAGS = ("--seeds", "--out", "--merge", "--no-fidelity", "--fidelity-sequences", "--no-equal-wall")
"""Command-line options a part may differ in (which seeds, where, which sub-reports)."""


def read_results(folder: str | Path, what: str) -> dict:
    """``folder/results.json`` of a finished quality run, with the keys a report needs."""
    path = Path(folder) / "results.json"
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ConfigError(f"{what}: {folder} is not a folder; give the --out folder of a finished quality run")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        raise ConfigError(f"{what}: {path} does not exist; give the --out folder of a finished quality run") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"{what}: {path} is not readable JSON ({e.__class__.__name__}: "
                          f"{' '.join(str(e).split())[:80]}); rerun that part") from None
    missing = [k for k in NEEDED if k not in results] if isinstance(results, dict) else ["(not an object)"]
    if missing or not results["seeds"] or not isinstance(results["per_seed"], dict):
        raise ConfigError(f"{what}: {path} is not the results of a finished quality run (missing "
                          f"{', '.join(missing) or 'seeds'}); rerun that part")
    return results


def setting_of(results: dict) -> dict:
    """What a part measured, from the command(s) that made it: the --config, the options that are
    not per part, and the key=value overrides other than where it ran."""
    out: dict = {}
    for command in results["commands"]:
        words = shlex.split(command)
        words = words[words.index("quality") + 1:] if "quality" in words else words  # python -m pipeline quality ...
        if "--merge" in words:
            continue  # a merged part: its own parts were checked when it was made
        i = 0
        while i < len(words):
            word = words[i]
            if word.startswith("--"):
                flag, _, value = word.partition("=")
                takes = not value and i + 1 < len(words) and not words[i + 1].startswith("--") and "=" not in words[i + 1]
                value = value or (words[i + 1] if takes else "")
                i += 2 if takes else 1
                if flag not in PER_PART_FLAGS:
                    out[flag] = value
            else:
                key, _, value = word.partition("=")
                if key not in WHERE_KEYS:
                    out[key] = value
                i += 1
    return out


def load_parts(dirs: list[str]) -> list[dict]:
    """Every part's results, refused unless they ran one setting (same ``--setting``, facts and
    overrides such as ``train.lr``): only seeds of one setting may be pooled."""
    if not dirs:
        raise ConfigError("--merge: give the result folders to merge, comma-separated")
    parts = [read_results(d, "--merge") for d in dirs]
    if len({p["setting"] for p in parts}) != 1 or len({json.dumps(p["facts"], sort_keys=True) for p in parts}) != 1:
        raise ConfigError("--merge: the parts ran different settings or caches; merge only runs of one setting")
    settings = [setting_of(p) for p in parts]
    for d, s in zip(dirs[1:], settings[1:]):
        if s != settings[0]:
            diff = sorted(k for k in set(s) | set(settings[0]) if s.get(k) != settings[0].get(k))
            raise ConfigError(f"--merge: {d} ran with other options than {dirs[0]} ({', '.join(diff)}: "
                              f"{settings[0].get(diff[0], '(unset)')} vs {s.get(diff[0], '(unset)')}); pooled seeds "
                              "must differ only in the seed: merge only parts of one setting")
    return parts
