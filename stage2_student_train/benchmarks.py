"""Benchmark evaluation of an exported student with lm-evaluation-harness (the optional extra
``lm-eval``: ``pip install 'kd-pipeline[lm-eval]'``).

    python -m pipeline eval --config FILE --lm-eval hellaswag,arc_easy [--lm-eval-limit 100]
    python -m pipeline eval --config FILE --lm-eval my_task --lm-eval-include tasks/   # local tasks

The harness loads ``runs/<name>/final/student`` as it is (its ``hf`` model, float32) and runs the
named tasks; the results go to ``runs/<name>/lm_eval.json``, beside the run's held-out numbers
(``summary.json``), and into the model card: the run's card info (``summary.json``'s
``model_card``) gets an ``lm_eval`` entry and the exported card is written again from it.
Hub tasks download their data sets (the network, or the ``datasets`` cache); a local task (a
YAML file and its data, e.g. ``tests/lm_eval_tasks/``) runs offline.
"""

from __future__ import annotations

import datetime
import difflib
import json
from pathlib import Path

from pipeline.atomic import atomic_write_json
from pipeline.errors import ConfigError, PipelineError

RESULT_FILE = "lm_eval.json"


class LmEvalMissing(PipelineError):
    """lm-evaluation-harness is not installed."""


def _harness():
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LmEvalMissing("eval --lm-eval needs lm-evaluation-harness, which is not installed: "
                            "pip install 'kd-pipeline[lm-eval]' (or pip install lm-eval)") from None
    return lm_eval, TaskManager


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in text.split(",") if t.strip()]
    if not tasks:
        raise ConfigError("--lm-eval needs task names, comma-separated (e.g. --lm-eval hellaswag,arc_easy)")
    return tasks


def run_lm_eval(student_dir: Path, tasks: list[str], include: str | None = None, limit: float | None = None,
                num_fewshot: int | None = None, batch_size: int = 8, device: str = "cpu") -> dict:
    """The harness's results for ``tasks`` on the exported student in ``student_dir``:
    ``{"results": {task: {metric: value}}, "n-samples", "versions", "lm_eval_version", ...}``."""
    lm_eval, TaskManager = _harness()
    if include is not None and not Path(include).is_dir():
        raise ConfigError(f"--lm-eval-include {include}: not a directory of task YAML files")
    manager = TaskManager(include_path=include)
    known = set(manager.all_tasks)
    for task in tasks:
        if task not in known:
            close = difflib.get_close_matches(task, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"lm-eval knows no task {task!r}{hint}; a local task needs --lm-eval-include DIR")
    out = lm_eval.simple_evaluate(
        model="hf", model_args={"pretrained": str(student_dir), "dtype": "float32"}, tasks=tasks,
        num_fewshot=num_fewshot, limit=limit, batch_size=batch_size, device=device, task_manager=manager,
        log_samples=False, random_seed=0, numpy_random_seed=1234, torch_random_seed=1234, fewshot_random_seed=1234)
    if out is None:  # the harness returns None on ranks other than 0
        return {}
    return {"student": str(student_dir), "tasks": tasks, "lm_eval_version": getattr(lm_eval, "__version__", None),
            "limit": limit, "num_fewshot": num_fewshot,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "results": _plain(out.get("results", {})), "n-samples": _plain(out.get("n-samples", {})),
            "versions": _plain(out.get("versions", {}))}


def _plain(value):
    """JSON-safe copy (the harness's numbers may be numpy scalars; "N/A" stderrs stay text)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


def card_entry(result: dict) -> dict:
    """``task/metric -> value`` for the model card (stderrs and aliases left out)."""
    return {f"{task}/{metric.split(',')[0]}": value for task, metrics in result.get("results", {}).items()
            for metric, value in metrics.items()
            if metric != "alias" and "_stderr" not in metric and isinstance(value, (int, float))}


def record(run_dir: Path, result: dict) -> Path:
    """Write ``run_dir/lm_eval.json``; add the results to the run's card info and card."""
    path = run_dir / RESULT_FILE
    atomic_write_json(path, result)
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text())
    except (OSError, ValueError):
        return path  # a run without a summary has no card to update
    info = summary.get("model_card")
    student_dir = run_dir / "final" / "student"
    if isinstance(info, dict):
        info["lm_eval"] = card_entry(result)
        atomic_write_json(summary_path, summary)
        if (student_dir / "README.md").is_file():
            from .model_card import write_model_card

            write_model_card(student_dir, info)
    return path
