"""Chat / instruction rows -> text rendered with the teacher's chat template, and the character
spans the loss counts (the assistant's turns, or the completion).

A row is a chat row when it has ``messages`` (a list of ``{"role", "content"}``, the common
Hugging Face layout) or ``prompt`` and ``completion`` (strings: one user turn and one assistant
turn; or lists of messages, joined). The text is rendered once with the teacher tokenizer's
``chat_template``; each assistant turn's span is found by rendering the conversation up to that
turn twice: with ``add_generation_prompt=True`` before it (where the assistant starts to speak)
and including it (where its turn, end-of-turn marker included, ends). The template must render a
conversation's prefixes as prefixes of the whole (every common template does); one that does not
is refused with a one-line ``DataError``.

A token is a target (loss mask 1) when its last character lies in a span; ``token_mask`` and
the student side (``stage2_student_train/cross.py``) use that one rule.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from pipeline.errors import DataError

CHAT_COLUMNS = (("messages",), ("prompt", "completion"))
"""The column sets that make a row a chat row, in the order they are looked for."""


def chat_columns(columns, text_field: str, fmt: str) -> tuple[str, ...] | None:
    """Which columns a row source is read from: None for plain text (``text_field``), else one
    of ``CHAT_COLUMNS``. ``fmt``: data.format (auto: text when ``text_field`` is a column)."""
    columns = set(columns)
    if fmt == "text" or fmt == "auto" and text_field in columns:
        return None
    for group in CHAT_COLUMNS:
        if set(group) <= columns:
            return group
    return None


def chat_template_hash(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    return hashlib.sha256(template.encode("utf-8")).hexdigest()[:16]


def as_messages(record: dict[str, Any], where: str) -> list[dict[str, str]]:
    """The conversation of a chat row (``messages``, or ``prompt`` + ``completion``)."""
    if "messages" in record:
        messages = record["messages"]
    else:
        prompt, completion = record.get("prompt"), record.get("completion")
        messages = (_turns(prompt, "user", where) or []) + (_turns(completion, "assistant", where) or [])
    if not isinstance(messages, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages):
        raise DataError(f"{where}: a chat row needs a list of {{'role': str, 'content': str}} messages; "
                        "fix the row or set data.format=text")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _turns(value, role: str, where: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    if isinstance(value, list):
        return value
    raise DataError(f"{where}: prompt/completion must be a string or a list of messages, got {type(value).__name__}")


def render(tokenizer, messages: list[dict[str, str]], where: str) -> tuple[str, tuple[tuple[int, int], ...]]:
    """(text, spans): the conversation rendered with the tokenizer's chat template, and the
    character spans [start, end) of its assistant turns (end-of-turn marker included)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise DataError(f"{where} is a chat row, but the teacher's tokenizer has no chat template; use an "
                        "instruction-tuned teacher, or plain text rows (data.format=text)")

    def text_of(turns, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises its own types (e.g. a template that wants alternating roles)
            raise DataError(f"{where}: the teacher's chat template cannot render this conversation "
                            f"({e.__class__.__name__}: {str(e)[:120]}); fix the row") from None

    text = text_of(messages, False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = text_of(messages[:i], True), text_of(messages[:i + 1], False)
        start, end = len(before), len(through)
        if not text.startswith(before) or not text.startswith(through) or end <= start:
            raise DataError(f"{where}: the teacher's chat template does not render a conversation's turns as "
                            "prefixes of the whole, so the assistant's tokens cannot be found; use plain text rows")
        spans.append((start, end))
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained on; "
                        "add one or drop the row")
    return text, tuple(spans)


def char_mask(length: int, spans) -> np.ndarray:
    """[length] bool: which characters of a text lie in ``spans``."""
    mask = np.zeros(length, bool)
    for start, end in spans:
        mask[start:end] = True
    return mask


def token_mask(ends: np.ndarray, chars: np.ndarray) -> np.ndarray:
    """A token is a target when its last character (``end - 1``) is a masked character ``chars``;
    a token ending at 0 covers no character and is not."""
    ends = np.asarray(ends, np.int64)
    out = np.zeros(len(ends), bool)
    ok = ends > 0
    out[ok] = chars[np.minimum(ends[ok], len(chars)) - 1]
    return out
