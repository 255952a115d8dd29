"""The end-of-turn token of a chat student. A student trained on conversations rendered with the
teacher's chat template speaks that format; when its own tokenizer (cross-tokenizer mode) has no
single token for the template's end-of-turn marker (ChatML's ``<|im_end|>`` is seven GPT-2 tokens),
``generate()`` could never stop at the end of a turn. So the marker is added to the student's
tokenizer as a special token before training (the cached texts then re-tokenize with it as one
token, aligned with the teacher's), and the export lists its id among the generation stop ids."""

from __future__ import annotations

PROBE = "\ue000"  # a private-use character: where the assistant's content sits in a rendered turn


def end_of_turn(tokenizer) -> str | None:
    """The special token that ends an assistant turn in ``tokenizer``'s chat template: the first
    special or added token rendered after an assistant's content (None without a template or
    when the template renders none)."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": PROBE}],
                                             tokenize=False)
    except Exception:  # a template this probe does not fit: nothing to add
        return None
    if PROBE not in text:
        return None
    tail = text[text.index(PROBE) + 1:]
    names = set(getattr(tokenizer, "all_special_tokens", [])) | set(tokenizer.get_added_vocab())
    found = [(tail.find(n), -len(n), n) for n in names if n and n in tail]
    return min(found)[2] if found else None


def ensure_end_of_turn(student_tokenizer, teacher_tokenizer) -> None:
    """Give ``student_tokenizer`` the teacher template's end-of-turn token when it has no single
    token for it (recorded as ``kd_added_tokens`` for a pretrained student's embedding)."""
    marker = end_of_turn(teacher_tokenizer)
    if marker is None or len(student_tokenizer.encode(marker, add_special_tokens=False)) == 1:
        return
    student_tokenizer.add_tokens([marker], special_tokens=True)
    student_tokenizer.kd_added_tokens = getattr(student_tokenizer, "kd_added_tokens", 0) + 1


def end_of_turn_id(tokenizer) -> int | None:
    """The id of the end-of-turn token of ``tokenizer``'s own chat template, if it is one token."""
    marker = end_of_turn(tokenizer)
    if marker is None:
        return None
    ids = tokenizer.encode(marker, add_special_tokens=False)
    return int(ids[0]) if len(ids) == 1 else None


def stop_at_end_of_turn(model, tokenizer) -> None:
    """Add the end-of-turn id to the generation config's stop ids (eos first, as before)."""
    eot = end_of_turn_id(tokenizer)
    gen = getattr(model, "generation_config", None)
    if eot is None or gen is None:
        return
    eos = gen.eos_token_id
    stops = list(eos) if isinstance(eos, (list, tuple)) else ([] if eos is None else [eos])
    if eot not in stops:
        gen.eos_token_id = stops + [eot]
