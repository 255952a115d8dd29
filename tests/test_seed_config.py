"""configs/seed-p100.toml and the ``work:`` path rule it relies on."""

from pathlib import Path

from conftest import REPO
from pipeline import config as config_module
from pipeline.config import load_config

SEED = REPO / "configs" / "seed-p100.toml"


def test_work_paths_go_under_kaggle_working_when_it_exists(monkeypatch, tmp_path):
    monkeypatch.delenv("KD_PIPELINE_WORK_DIR", raising=False)
    monkeypatch.setattr(config_module, "KAGGLE_WORKING", tmp_path / "kaggle" / "working")
    cfg = load_config(SEED)
    assert (cfg.cache.dir, cfg.run.runs_dir) == ("caches/seed-qwen3moe-wikitext", "runs")  # no such folder
    (tmp_path / "kaggle" / "working").mkdir(parents=True)
    cfg = load_config(SEED, ["cache.views_dir=work:views"])
    assert Path(cfg.cache.dir) == tmp_path / "kaggle" / "working" / "caches" / "seed-qwen3moe-wikitext"
    assert Path(cfg.run.runs_dir) == tmp_path / "kaggle" / "working" / "runs"
    assert Path(cfg.cache.views_dir) == tmp_path / "kaggle" / "working" / "views"
    monkeypatch.setenv("KD_PIPELINE_WORK_DIR", str(tmp_path / "mine"))
    assert Path(load_config(SEED).run.runs_dir) == tmp_path / "mine" / "runs"
    assert load_config(SEED, ["run.runs_dir=/abs/runs"]).run.runs_dir == "/abs/runs"  # only work: paths move


def test_the_seed_config_says_what_the_issue_asks():
    cfg = load_config(SEED)
    assert cfg.student.model == cfg.student.tokenizer == "HuggingFaceTB/SmolLM-135M"
    assert cfg.kd.mode == "mapped" and not cfg.cache.store_hidden
    assert cfg.train.precision == "auto" and cfg.teacher.dtype == "auto"
    assert 0 < cfg.train.stop_after < cfg.train.steps and cfg.train.save_every <= cfg.train.stop_after
    assert cfg.teacher.model == "huihui-ai/Huihui-MoE-1.2B-A0.6B"  # the seed's teacher, its shape shipped
