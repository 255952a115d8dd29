import pytest

from pipeline.config import Config, all_keys, load_config, parse_override, to_toml
from pipeline.errors import ConfigError


def test_defaults_validate_and_every_key_is_listed():
    cfg = load_config(None)
    assert isinstance(cfg, Config)
    keys = all_keys()
    assert "cache.top_k" in keys and "data.seq_len" in keys and "teacher.model" in keys
    assert len(keys) == len(set(keys))


def test_override_types_are_parsed_as_toml_values():
    assert parse_override("cache.top_k=32") == ("cache.top_k", 32)
    assert parse_override("cache.store_head=true") == ("cache.store_head", True)
    assert parse_override("data.eval_fraction=0.25") == ("data.eval_fraction", 0.25)
    assert parse_override('data.eval_documents=["a.txt","b.txt"]') == ("data.eval_documents", ["a.txt", "b.txt"])
    assert parse_override("teacher.model=some/hub-id") == ("teacher.model", "some/hub-id")


def test_file_then_overrides(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[cache]\ntop_k = 16\ndir = "x"\n[data]\nseq_len = 64\n')
    cfg = load_config(path, ["cache.top_k=8", "run.seed=3"])
    assert (cfg.cache.top_k, cfg.cache.dir, cfg.data.seq_len, cfg.run.seed) == (8, "x", 64, 3)


def test_unknown_key_names_the_closest_valid_key(tmp_path):
    with pytest.raises(ConfigError, match=r"'cache.topk'.*cache\.top_k"):
        load_config(None, ["cache.topk=3"])
    path = tmp_path / "c.toml"
    path.write_text("[teacher]\nbatchsize = 2\n")
    with pytest.raises(ConfigError, match=r"teacher\.batch_size"):
        load_config(path)


@pytest.mark.parametrize("override, pattern", [
    ("cache.top_k=x", r"'cache.top_k' must be int, got str"),
    ("cache.top_k=1.5", r"must be int, got float"),
    ("cache.store_head=1", r"must be bool, got int"),
    ("cache.hidden_dtype=bf16", r"must be one of 'float16', 'int8'"),
    ("cache.top_k=0", r"'cache.top_k' must be > 0"),
    ("data.seq_len=-4", r"'data.seq_len' must be > 0"),
    ("cache.shard_sequences=6", r"multiple of cache.chunk_sequences"),
    ("data.eval_documents=3", r"must be a list"),
    ("cache=3", r"is a section"),
    ("nonsense", r"not key=value"),
])
def test_bad_values_are_named(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cache\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_resolved_config_round_trips_through_toml(tmp_path):
    cfg = load_config(None, ['data.doc_separator="a\\"b\\\\c\\n"', 'data.eval_documents=["x y.txt"]', "cache.top_k=7"])
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_shipped_configs_load():
    from pathlib import Path
    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.toml")):
        load_config(path)
