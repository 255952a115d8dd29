"""train.report_to: metrics.jsonl records also go to experiment trackers. TensorBoard is read
back with tensorboard's own event reader; a tracker whose package is missing is a one-line error."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.errors import ConfigError


def read_events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def scalars_of(events) -> dict[str, dict[int, float]]:
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def check_against_metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """Every number of every metrics.jsonl record is a TensorBoard scalar at its step, and no more."""
    got = scalars_of(read_events(run_dir / "tensorboard"))
    want: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        split = record.get("split", "train")
        for k, v in record.items():
            if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
                want.setdefault(f"{split}/{k}", {})[record["step"]] = float(v)
    assert got.keys() == want.keys()
    for tag in want:
        assert got[tag] == pytest.approx(want[tag], rel=1e-6), tag
    return got


def test_tensorboard_gets_every_record_and_the_config(tmp_path):
    from stage2_student_train.runlog import MetricsLog
    from stage2_student_train.trackers import Trackers

    cfg = load_config(None, ["run.name=tb", 'train.report_to=["tensorboard"]', "kd.temperature=2.0"])
    log = MetricsLog(tmp_path / "metrics.jsonl", trackers=Trackers(cfg, tmp_path))
    for step in (1, 2, 3):
        log.write({"step": step, "loss": 3.0 / step, "ce": 2.5 / step, "kd": None, "tokens_per_s": 100.0 * step})
    log.write({"step": 3, "split": "eval", "ppl": 12.5, "bpb": 1.25, "counted": "all tokens"})
    log.close()
    got = check_against_metrics(tmp_path)
    assert got["train/loss"] == pytest.approx({1: 3.0, 2: 1.5, 3: 1.0}) and got["eval/ppl"] == {3: 12.5}
    events = read_events(tmp_path / "tensorboard")
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "temperature = 2.0" in config and 'name = "tb"' in config


def test_unknown_tracker_is_a_config_error():
    with pytest.raises(ConfigError, match="report_to"):
        load_config(None, ['train.report_to=["mlflow"]'])


@pytest.mark.parametrize("name", ["wandb", "trackio"])
def test_a_missing_tracker_package_is_one_line(name, monkeypatch, tmp_path):
    from stage2_student_train.train import train

    monkeypatch.setitem(sys.modules, name, None)  # import fails as if not installed
    cfg = load_config(None, [f'train.report_to=["{name}"]', f"run.runs_dir={json.dumps(str(tmp_path))}",
                             "run.name=r", f"cache.dir={json.dumps(str(tmp_path / 'no-cache'))}"])
    with pytest.raises(ConfigError) as e:
        train(cfg, show_progress=False)
    assert "\n" not in str(e.value) and f"pip install -e '.[{name}]'" in str(e.value)
    assert not (tmp_path / "r" / "metrics.jsonl").exists()
