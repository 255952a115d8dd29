"""Dataset -> named documents, split into train and held-out eval by whole documents."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import DataConfig
from pipeline.errors import DataError

FILE_BUILDERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


@dataclass(frozen=True)
class Document:
    doc_id: int
    name: str
    text: str
    split: str  # "train" | "eval"


def load_documents(cfg: DataConfig) -> list[Document]:
    """Load every document of ``cfg.source`` and assign each, whole, to train or eval."""
    names, texts = _load_raw(cfg)
    keep = [(n, t) for n, t in zip(names, texts) if t.strip()]
    if not keep:
        raise DataError(f"dataset {cfg.source!r} holds no non-empty text; point data.source at real text")
    names, texts = [n for n, _ in keep], [t for _, t in keep]
    eval_names = _choose_eval(names, cfg)
    return [Document(i, n, t, "eval" if n in eval_names else "train") for i, (n, t) in enumerate(zip(names, texts))]


def _load_raw(cfg: DataConfig) -> tuple[list[str], list[str]]:
    source = Path(cfg.source)
    if source.is_dir():
        files = sorted(source.glob("*.txt"))
        if not files:
            raise DataError(f"directory {source} holds no .txt files; put one document per .txt file there")
        return [f.name for f in files], [read_utf8(f) for f in files]
    if source.suffix in FILE_BUILDERS and not source.is_file():
        raise DataError(f"data file {source} does not exist; check data.source")
    if source.is_file() and source.suffix in (".txt", ".jsonl", ".json"):
        if not read_utf8(source).strip():
            raise DataError(f"data file {source} is empty; point data.source at a file with text")
    import datasets

    try:
        if source.is_file():
            builder = FILE_BUILDERS.get(source.suffix)
            if builder is None:
                raise DataError(f"data file {source} has an unsupported type; use .txt, .jsonl or .parquet")
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=str(source), split="train", **kwargs)
        else:
            ds = datasets.load_dataset(cfg.source, cfg.subset or None, split=cfg.split)
    except DataError:
        raise
    except Exception as e:  # datasets raises a zoo of types for a missing/offline/bad dataset
        raise DataError(f"cannot load dataset {cfg.source!r} ({e.__class__.__name__}: {str(e)[:200]}); "
                        "check data.source (a .txt/.jsonl/.parquet file, a directory of .txt, or a hub id)") from None
    if cfg.text_field not in ds.column_names:
        raise DataError(f"dataset {cfg.source!r} has no column {cfg.text_field!r} (columns: {ds.column_names}); "
                        "set data.text_field")
    texts = [t if isinstance(t, str) else "" for t in ds[cfg.text_field]]
    width = len(str(len(texts)))
    return [f"{source.name if source.is_file() else 'row'}-{i:0{width}d}" for i in range(len(texts))], texts


def read_utf8(path: Path) -> str:
    """The file's text; invalid UTF-8 is an error naming the file and the first bad byte (never
    silently replaced: the cache would then hold text that is not the user's)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path} is not valid UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}, line {line}); "
                        "convert it, e.g. iconv -f latin1 -t utf-8, or remove it from data.source") from None


def _choose_eval(names: list[str], cfg: DataConfig) -> set[str]:
    if cfg.eval_documents:
        unknown = [n for n in cfg.eval_documents if n not in names]
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise DataError(f"data.eval_documents names {unknown[0]!r}, which is not a document of "
                            f"{cfg.source!r}{hint}")
        if len(set(cfg.eval_documents)) == len(names):
            raise DataError("data.eval_documents holds out every document; leave some for training")
        return set(cfg.eval_documents)
    if cfg.eval_fraction <= 0 or len(names) < 2:
        return set()
    count = min(len(names) - 1, max(1, math.ceil(cfg.eval_fraction * len(names))))
    return set(names[-count:])
