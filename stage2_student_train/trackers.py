"""Experiment trackers (``train.report_to``): every record ``metrics.jsonl`` gets, also sent to
TensorBoard, Weights & Biases or Trackio, from rank 0, with the run's config.

A record ``{"step": s, "split": "eval", "ppl": ...}`` becomes the scalars ``eval/ppl`` at step
``s``; a training record (no ``split``) becomes ``train/<name>``. Only numbers are sent (flags and
text, such as which targets an eval counts, stay in metrics.jsonl). The config goes in once, at
the start: TensorBoard as a text summary ``config`` (the run's TOML), the others as their run
config. Each tracker's package is optional (the extras of the same names): a missing one is a
one-line ``ConfigError`` before the run writes anything (``check_trackers``).
"""

from __future__ import annotations

import importlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import Config, to_toml
from pipeline.errors import ConfigError

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}
TENSORBOARD_DIR = "tensorboard"


def check_trackers(names: list[str]) -> None:
    """Every tracker of ``train.report_to`` can be imported, else one line saying what to install."""
    for name in names:
        try:
            importlib.import_module(PACKAGES[name])
        except ImportError:
            raise ConfigError(f"train.report_to lists {name}, but the package {PACKAGES[name]} is not installed; "
                              f"pip install -e '.[{name}]' in the kd-pipeline checkout (or pip install {PACKAGES[name]}), or "
                              f"remove {name} from train.report_to") from None


def scalars(record: dict[str, Any]) -> tuple[int, dict[str, float]]:
    """(step, {"<split>/<name>": value}) of a metrics.jsonl record: its numbers only."""
    split = record.get("split", "train")
    return int(record["step"]), {f"{split}/{k}": float(v) for k, v in record.items()
                                 if k not in ("step", "split") and isinstance(v, (int, float))
                                 and not isinstance(v, bool)}


class Trackers:
    """The trackers of ``cfg.train.report_to``, opened for the run in ``run_dir``."""

    def __init__(self, cfg: Config, run_dir: Path):
        check_trackers(cfg.train.report_to)
        self._sinks = [_open(name, cfg, Path(run_dir)) for name in cfg.train.report_to]

    def log(self, record: dict[str, Any]) -> None:
        if self._sinks and "step" in record:
            step, values = scalars(record)
            for sink in self._sinks:
                sink.log(step, values)

    def close(self) -> None:
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _open(name: str, cfg: Config, run_dir: Path):
    return {"tensorboard": _TensorBoard, "wandb": _Hosted, "trackio": _Hosted}[name](name, cfg, run_dir)


class _TensorBoard:
    def __init__(self, name: str, cfg: Config, run_dir: Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / TENSORBOARD_DIR))
        self.writer.add_text("config", "```toml\n" + to_toml(cfg) + "\n```", 0)

    def log(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Hosted:
    """wandb and trackio share one API: ``init(project, name, config)``, ``log(values, step)``."""

    def __init__(self, name: str, cfg: Config, run_dir: Path):
        self.module = importlib.import_module(PACKAGES[name])
        kwargs = {"dir": str(run_dir)} if name == "wandb" else {}
        self.module.init(project="kd-pipeline", name=cfg.run.name, config=asdict(cfg), **kwargs)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.module.log(values, step=step)

    def close(self) -> None:
        self.module.finish()
