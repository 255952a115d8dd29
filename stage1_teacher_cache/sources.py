"""``data.source`` -> a stream of raw ``(name, text)`` documents, read lazily, one at a time.

Accepted sources (checked in this order):

- a ``datasets.save_to_disk`` directory (``state.json``, or ``dataset_dict.json`` + ``data.split``):
  each row is a document, named ``row-<i>``; its Arrow files are read batch by batch;
- a directory of ``.txt`` files (one document each, named by file name), else of ``.jsonl`` /
  ``.json`` / ``.parquet`` files (each row a document, named ``<file>-<row>``); files in name order;
- a glob pattern (``data/*.jsonl``, ``corpus/**/*.txt``): the matching files in path order, each
  read by its suffix as above (names relative to the pattern's fixed leading folder);
- a single ``.txt`` (one document), ``.jsonl`` / ``.json`` / ``.parquet`` file (one document a row);
- anything else is a hub dataset id, read with ``datasets.load_dataset(..., streaming=True)``
  (``data.subset``, ``data.split``), rows named ``row-<i>``.

Rows with ``messages`` or ``prompt``/``completion`` (``data.format``, ``chat.py``) come out as a
dict of those fields instead of a string; ``documents.iter_documents`` renders them.

Nothing holds more than one document (or one Arrow/parquet record batch) at a time. Every
problem is a ``DataError`` with a one-line message naming the file or source.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path
from typing import Iterator, NamedTuple

from pipeline.config import DataConfig
from pipeline.errors import DataError

from .chat import CHAT_COLUMNS, chat_columns

ROW_SUFFIXES = (".jsonl", ".json", ".parquet")
SUFFIXES = (".txt",) + ROW_SUFFIXES
BATCH_ROWS = 256


class Source:
    """A resolved ``data.source``: how to read it, and what identifies its current content."""

    def __init__(self, cfg: DataConfig):
        self.cfg = cfg
        self.kind, self.files, self.root = _resolve(cfg)
        txt = next((f for f in self.files if f.suffix == ".txt"), None)
        if cfg.format == "chat" and txt is not None:  # a .txt is plain text: it has no turns to mask
            raise DataError(f"data.format=chat, but {txt} is a .txt file (plain text, no messages); chat data comes "
                            "as .jsonl/.json/.parquet rows with 'messages' or 'prompt'/'completion', or set "
                            "data.format=auto")

    def document_names(self) -> list[str] | None:
        """Every document name, when known without reading (one ``.txt`` per document)."""
        if self.files and all(f.suffix == ".txt" for f in self.files):
            return [self._name(f) for f in self.files]
        return None

    def signature(self) -> str:
        """Identifies the source's content without reading it: the path, size and mtime of every
        local file (a changed, added or removed file changes it); for a hub id, the id itself."""
        h = hashlib.sha256(json.dumps([self.kind, self.cfg.source, self.cfg.subset, self.cfg.split]).encode())
        for f in self.files:
            st = f.stat()
            h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    def __iter__(self) -> Iterator[tuple[str, str | dict]]:
        if self.kind == "hub":
            yield from _hub_rows(self.cfg)
        elif self.kind == "saved":
            yield from _saved_rows(self.cfg, self.root)
        else:
            for f in self.files:
                if f.suffix == ".txt":
                    yield self._name(f), read_utf8(f)
                else:
                    yield from ((f"{self._name(f)}-{i}", t) for i, t in _file_rows(f, self.cfg))

    def _name(self, f: Path) -> str:
        return f.name if self.root is None else f.relative_to(self.root).as_posix()


def _resolve(cfg: DataConfig) -> tuple[str, list[Path], Path | None]:
    text = cfg.source
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"data.source pattern {text!r} matches no file; check the pattern and the folder")
        bad = [f for f in files if f.suffix not in SUFFIXES]
        if bad:
            raise DataError(f"data.source pattern {text!r} matches {bad[0]}, an unsupported type; "
                            "match only .txt, .jsonl, .json or .parquet files")
        fixed = Path(*[p for p in Path(text).parts[:next(i for i, p in enumerate(Path(text).parts)
                                                         if any(c in p for c in "*?["))]] or ["."])
        return "files", files, fixed
    source = Path(text)
    if source.is_dir():
        if (source / "state.json").is_file() or (source / "dataset_dict.json").is_file():
            return "saved", [f for f in sorted(source.rglob("*")) if f.is_file()], source
        for group in ((".txt",), ROW_SUFFIXES):
            files = sorted(f for f in source.iterdir() if f.is_file() and f.suffix in group)
            if files:
                return "files", files, source
        raise DataError(f"directory {source} holds no .txt, .jsonl, .json or .parquet files and is not a "
                        "datasets.save_to_disk dataset; put documents there or point data.source elsewhere")
    if source.suffix in SUFFIXES:
        if not source.is_file():
            raise DataError(f"data file {source} does not exist; check data.source")
        if source.suffix in (".txt", ".jsonl", ".json") and not read_utf8(source).strip():
            raise DataError(f"data file {source} is empty; point data.source at a file with text")
        return "files", [source], None
    if source.is_file():
        raise DataError(f"data file {source} has an unsupported type; use .txt, .jsonl or .parquet")
    return "hub", [], None


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


def _as_text(value) -> str:
    return value if isinstance(value, str) else ""


def _row_text(record: dict, field: str, where: str) -> str:
    """The text of a JSON row; a row whose field is missing, null, a number or a list is an error
    naming the line (never dropped silently: the cache would hold fewer documents than the file)."""
    value = record.get(field)
    if isinstance(value, str):
        return value
    what = f"has no {field!r}" if field not in record else f"has {field!r} = {json.dumps(value)[:40]}, not a string"
    raise DataError(f"{where} {what}; fix or remove that row (or set data.text_field)")


def _missing_column(what, field: str, columns) -> DataError:
    return DataError(f"{what} has no column {field!r} (columns: {list(columns)}); set data.text_field")


class RowLayout(NamedTuple):
    """What a row source is read from: ``(text_field,)``, or a chat set (``chat.py``), and which
    of the two it is (a text column may be named like a chat one: ``data.text_field=messages``)."""

    columns: tuple[str, ...]
    chat: bool


def _row_layout(what, cfg: DataConfig, columns) -> RowLayout:
    chat = chat_columns(columns, cfg.text_field, cfg.format)
    if chat is not None:  # every chat column the source has: a file may mix the two layouts
        return RowLayout(tuple(c for group in CHAT_COLUMNS for c in group if c in set(columns)), True)
    if cfg.format == "chat":
        raise DataError(f"{what} has neither a 'messages' column nor 'prompt' and 'completion' (columns: "
                        f"{list(columns)}); data.format=chat needs them")
    if cfg.text_field not in columns:
        raise _missing_column(what, cfg.text_field, columns)
    return RowLayout((cfg.text_field,), False)


def _row_value(record: dict, layout: RowLayout, where: str | None = None) -> str | dict:
    """A row's text, or (a chat row) its chat fields. With ``where`` (a JSON row, whose values
    have no declared type) a text that is not a string is an error naming ``where``."""
    if layout.chat:  # any chat layout a row has (a file may mix the two)
        return {c: record[c] for group in CHAT_COLUMNS for c in group if record.get(c) is not None}
    field = layout.columns[0]
    return _as_text(record.get(field)) if where is None else _row_text(record, field, where)


def _file_rows(path: Path, cfg: DataConfig) -> Iterator[tuple[int, str | dict]]:
    if path.suffix == ".parquet":
        yield from _parquet_rows(path, cfg)
        return
    with open(path, "rb") as f:
        first = f.read(1)
        f.seek(0)
        if path.suffix == ".json" and first == b"[":  # a JSON array: read whole (not streamable)
            try:
                rows = json.loads(f.read().decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path} is not valid JSON ({e}); fix it or convert it to JSON lines") from None
            for i, r in enumerate(rows):
                if not isinstance(r, dict):  # never dropped silently: the cache would hold fewer rows
                    raise DataError(f"{path} row {i} is not a JSON object; one object per row is expected")
            if rows:
                layout = _row_layout(path, cfg, rows[0])
                yield from ((i, _row_value(r, layout, f"{path} row {i}")) for i, r in enumerate(rows))
            return
        row, layout = 0, None
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise DataError(f"{path} line {number} is not valid JSON ({e.__class__.__name__}: "
                                f"{str(e)[:80]}); fix or remove that line") from None
            if not isinstance(record, dict):
                raise DataError(f"{path} line {number} is not a JSON object; one object per line is expected")
            if row == 0:
                layout = _row_layout(path, cfg, record)
            yield row, _row_value(record, layout, f"{path} line {number}")
            row += 1


def _parquet_rows(path: Path, cfg: DataConfig) -> Iterator[tuple[int, str | dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"{path} is not a readable parquet file ({e.__class__.__name__}: {str(e)[:120]})") from None
    layout = _row_layout(path, cfg, pf.schema_arrow.names)
    row = 0
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=list(layout.columns)):
        for record in batch.to_pylist():  # a null text is refused, naming the row (as in .jsonl)
            yield row, _row_value(record, layout, f"{path} row {row}")
            row += 1


def _saved_rows(cfg: DataConfig, root: Path) -> Iterator[tuple[str, str | dict]]:
    """A ``save_to_disk`` dataset: its Arrow stream files read batch by batch (no memory map, so
    resident memory does not grow with the files read)."""
    import datasets
    import pyarrow as pa

    try:
        ds = datasets.load_from_disk(str(root))
    except Exception as e:  # datasets raises many types for a damaged directory
        raise DataError(f"cannot load the saved dataset {root} ({e.__class__.__name__}: {str(e)[:160]}); "
                        "point data.source at a datasets.save_to_disk directory") from None
    if isinstance(ds, datasets.DatasetDict):
        if cfg.split not in ds:
            raise DataError(f"saved dataset {root} has no split {cfg.split!r} (splits: {list(ds)}); set data.split")
        ds = ds[cfg.split]
    layout = _row_layout(f"saved dataset {root}", cfg, ds.column_names)
    columns = list(layout.columns)
    row = 0
    if ds._indices is None and ds.cache_files:
        for entry in ds.cache_files:
            with pa.OSFile(entry["filename"]) as f:
                for batch in pa.ipc.open_stream(f):
                    for record in batch.select(columns).to_pylist():
                        yield f"row-{row}", _row_value(record, layout)
                        row += 1
        return
    for batch in ds.select_columns(columns).iter(batch_size=BATCH_ROWS):
        for i in range(len(batch[columns[0]])):
            yield f"row-{row}", _row_value({c: batch[c][i] for c in columns}, layout)
            row += 1


def _hub_rows(cfg: DataConfig) -> Iterator[tuple[str, str | dict]]:
    """A hub dataset (or any id ``datasets.load_dataset`` resolves), streamed: rows arrive as
    they are downloaded, nothing is materialised."""
    import datasets

    what = f"dataset {cfg.source!r}"
    hint = "check data.source (a .txt/.jsonl/.parquet file, a folder of them, a glob, a save_to_disk folder or a hub id)"
    try:
        ds = datasets.load_dataset(cfg.source, cfg.subset or None, split=cfg.split, streaming=True)
        columns = ds.column_names
        if columns is None:
            columns = list(next(iter(ds.take(1)), {}).keys())
    except Exception as e:  # datasets raises a zoo of types for a missing/offline/bad dataset
        raise DataError(f"cannot load {what} ({e.__class__.__name__}: {str(e)[:200]}); {hint}") from None
    layout = _row_layout(what, cfg, columns)
    rows = iter(ds)
    row = 0
    while True:
        try:
            record = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise DataError(f"reading {what} failed at row {row} ({e.__class__.__name__}: {str(e)[:160]}); "
                            "rerun, or check the dataset") from None
        yield f"row-{row}", _row_value(record, layout)
        row += 1
