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
    character spans [start, end) of its assistant turns (end-of-turn marker included).

    A span is [len(render(turns before it) + generation prompt), len(render(turns through it))).
    Rendering every prefix is quadratic in the turns, so the spans are first read off one
    render with each content replaced by a marker (``_marked_spans``), linear; they are used
    when they agree with the exact prefix renders of the first and last assistant turns, else
    (a template that rewrites contents or is not turn by turn) every prefix is rendered."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        raise DataError(f"{where} is a chat row, but the teacher's tokenizer has no chat template; use an "
                        "instruction-tuned teacher, or plain text rows (data.format=text)")

    def text_of(turns, generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as e:  # jinja raises its own types (e.g. a template that wants alternating roles)
            raise DataError(f"{where}: the teacher's chat template cannot render this conversation "
                            f"({e.__class__.__name__}: {str(e)[:120]}); fix the row") from None

    def exact(i: int) -> tuple[int, int]:
        before, through = text_of(messages[:i], True), text_of(messages[:i + 1], False)
        start, end = len(before), len(through)
        if not text.startswith(before) or not text.startswith(through) or end <= start:
            raise DataError(f"{where}: the teacher's chat template does not render a conversation's turns as "
                            "prefixes of the whole, so the assistant's tokens cannot be found; use plain text rows")
        return start, end

    text = text_of(messages, False)
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    if not turns:
        raise DataError(f"{where}: the conversation has no assistant turn, so nothing would be trained on; "
                        "add one or drop the row")
    checked = {i: exact(i) for i in (turns[0], turns[-1])}
    fast = _marked_spans(text_of, messages, text, turns) if len(turns) > 2 else None
    if fast is not None and all(fast[i] == span for i, span in checked.items()):
        return text, tuple(fast[i] for i in turns)
    return text, tuple(checked[i] if i in checked else exact(i) for i in turns)


MARK = "\ue000{}\ue001"  # private-use characters: no template treats them specially


def _marked_spans(text_of, messages, text: str, turns: list[int]) -> dict[int, tuple[int, int]] | None:
    """Every assistant turn's span from a few renders (None when the template does not fit).

    One render with content i replaced by the marker i gives where each content sits; where a
    turn's rendering ends (its end-of-turn text after the content) is learnt once per role from
    one prefix render; the generation prompt once. Positions map back to ``text`` by the length
    difference of the contents before them; the real text must equal the marked one with the
    contents put back (a template that rewrites contents, e.g. trims them, does not fit)."""
    if any("\ue000" in m["content"] for m in messages):
        return None
    marks = [MARK.format(i) for i in range(len(messages))]
    marked = [{**m, "content": marks[i]} for i, m in enumerate(messages)]
    s = text_of(marked, False)
    at, pos, pieces = [], 0, []
    for i, mark in enumerate(marks):
        p = s.find(mark, pos)
        if p < 0:
            return None
        pieces += [s[pos:p], messages[i]["content"]]
        at.append(p)
        pos = p + len(mark)
    if "".join(pieces) + s[pos:] != text:
        return None
    shift = [0]  # real position - marked position, after content i-1
    for i, m in enumerate(messages):
        shift.append(shift[-1] + len(m["content"]) - len(marks[i]))
    tail: dict[str, int] = {}  # role -> characters its turn renders after its content
    for k, m in enumerate(messages):
        if m["role"] not in tail:
            prefix = text_of(marked[:k + 1], False)
            if not s.startswith(prefix) or len(prefix) < at[k] + len(marks[k]):
                return None
            tail[m["role"]] = len(prefix) - at[k] - len(marks[k])

    def end_of(i: int) -> int:  # len(render(messages[:i + 1])), in real positions
        return at[i] + len(marks[i]) + tail[messages[i]["role"]] + shift[i + 1]

    first = turns[0]
    before = text_of(marked[:first], True)
    head = text_of(marked[:first], False)
    if not before.startswith(head):
        return None
    prompt = before[len(head):]
    spans = {}
    for i in turns:
        start = (end_of(i - 1) if i else len(text_of([], False))) + len(prompt)
        end = end_of(i)
        if text[start - len(prompt):start] != prompt or end <= start:
            return None
        spans[i] = (start, end)
    return spans


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
