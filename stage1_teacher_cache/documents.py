"""Raw documents -> named documents, each assigned whole to train or held-out eval, as a stream.

The held-out rule needs no second look at the corpus:

- ``data.eval_documents``: exactly the named documents (a name never met is an error, with the
  closest name met as a hint);
- otherwise ``data.eval_fraction = f``: document ``i`` (0-based, in reading order, counting only
  non-empty documents) is held out when ``ceil(i * f) > ceil((i - 1) * f)`` for ``i >= 1``:
  document 1, then about every ``1/f``-th. Of the first ``n`` documents exactly
  ``ceil((n - 1) * f)`` are held out: at least one when ``n >= 2`` and ``f > 0``, never the first.
  Appending documents never changes the split of those before them.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

from pipeline.config import DataConfig
from pipeline.errors import DataError

from .chat import as_messages
from .sources import Source

Render = Callable[[list, str], tuple[str, tuple[tuple[int, int], ...]]]
"""(messages, where) -> (text, assistant spans): ``chat.render`` with the teacher's tokenizer."""


@dataclass(frozen=True)
class Document:
    doc_id: int
    name: str
    text: str
    split: str  # "train" | "eval"
    spans: tuple[tuple[int, int], ...] | None = None
    """A chat document: the character spans [start, end) of ``text`` that are targets (the
    assistant's turns); None: plain text, every token a target."""


def held_out_by_fraction(index: int, fraction: float) -> bool:
    """The ``eval_fraction`` rule (module docstring): is document ``index`` held out?"""
    return index >= 1 and fraction > 0 and math.ceil(index * fraction - 1e-9) > math.ceil((index - 1) * fraction - 1e-9)


class EvalChooser:
    """Assigns each document, as it arrives, to train or eval, and says when every named eval
    document has been met. Keeps O(len(eval_documents)) state, whatever the corpus size."""

    def __init__(self, cfg: DataConfig, known_names: list[str] | None = None):
        self.cfg = cfg
        self.named = set(cfg.eval_documents)
        self.unseen = set(self.named)
        self.best: dict[str, tuple[float, str]] = {}  # unseen name -> (similarity, closest name met)
        self.known_names = known_names

    def _check_known(self) -> None:
        """Names known up front (a folder of .txt): checked at the first non-empty document, so
        a typo fails before any real work, yet an all-empty corpus still says it is empty."""
        names, self.known_names = self.known_names, None
        unknown = sorted(self.named - set(names))
        if unknown:
            close = difflib.get_close_matches(unknown[0], names, n=1)
            raise self._unknown_error(unknown[0], close[0] if close else None)
        if len(self.named) >= len(set(names)):
            raise DataError("data.eval_documents holds out every document; leave some for training")

    def split_of(self, index: int, name: str) -> str:
        if self.named and self.known_names is not None:
            self._check_known()
        if self.named:
            if name in self.named:
                self.unseen.discard(name)
                return "eval"
            for want in self.unseen:  # the closest name met, for the error if ``want`` never shows up
                m = difflib.SequenceMatcher(None, want, name)
                if m.real_quick_ratio() >= 0.6 and m.quick_ratio() >= 0.6:
                    r = m.ratio()
                    if r >= 0.6 and r > self.best.get(want, (0.0, ""))[0]:
                        self.best[want] = (r, name)
            return "train"
        return "eval" if held_out_by_fraction(index, self.cfg.eval_fraction) else "train"

    @property
    def all_named_seen(self) -> bool:
        return bool(self.named) and not self.unseen

    def finish(self, complete: bool) -> None:
        """After the stream: every named document must have been met (``complete``: the whole
        source was read; after an early stop an unseen name may lie beyond the stop)."""
        if self.unseen and complete:
            want = sorted(self.unseen)[0]
            raise self._unknown_error(want, self.best.get(want, (0, None))[1])

    def _unknown_error(self, name: str, close: str | None) -> DataError:
        hint = f" (did you mean {close!r}?)" if close else ""
        return DataError(f"data.eval_documents names {name!r}, which is not a document of {self.cfg.source!r}{hint}; "
                         "name documents of this source, or pass data.eval_documents=[] to hold out every "
                         "~1/data.eval_fraction-th document instead")


def iter_documents(cfg: DataConfig, source: Source | None = None,
                   chooser: EvalChooser | None = None, render: Render | None = None) -> Iterator[Document]:
    """The non-empty documents of ``cfg.source`` in reading order, numbered and split; chat rows
    are rendered by ``render`` (stage 1: the teacher's chat template).

    Raises ``DataError`` at the end when the source held no non-empty text or an
    ``eval_documents`` name was never met (only if the caller read the stream to its end)."""
    source = source or Source(cfg)
    chooser = chooser or EvalChooser(cfg, source.document_names())
    index = 0
    for name, value in source:
        spans = None
        if isinstance(value, dict):
            if render is None:
                raise DataError(f"{cfg.source!r} holds chat rows; they are rendered with the teacher's chat template "
                                "in stage 1 (cache-teacher)")
            value, spans = render(as_messages(value, f"{cfg.source} {name}"), f"{cfg.source} {name}")
        if not value.strip():
            continue
        yield Document(index, name, value, chooser.split_of(index, name), spans)
        index += 1
    if index == 0:
        raise DataError(f"dataset {cfg.source!r} holds no non-empty text; point data.source at real text")
    chooser.finish(complete=True)


def load_documents(cfg: DataConfig) -> list[Document]:
    """Every document in memory: for small corpora and tests (stage 1 streams ``iter_documents``)."""
    return list(iter_documents(cfg))


def documents_of(items: Iterable[tuple[str, str, str]]) -> Iterator[Document]:
    """Documents from ``(name, text, split)`` triples (tests, tools)."""
    for i, (name, text, split) in enumerate(items):
        yield Document(i, name, text, split)
