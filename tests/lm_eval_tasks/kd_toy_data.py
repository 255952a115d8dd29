"""The kd_toy task's data: kd_toy.jsonl beside this file, wherever the folder is."""

from pathlib import Path


def load(**kwargs):
    import datasets

    path = Path(__file__).with_name("kd_toy.jsonl")
    return datasets.DatasetDict({"test": datasets.Dataset.from_json(str(path))})
