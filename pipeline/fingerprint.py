"""Content hashes that decide whether two runs used the same inputs.

Stage 1 records them in the cache; stage 2 compares a student tokenizer's hash with the cache's
to choose the same-tokenizer or the cross-tokenizer path, and a checkpoint records the cache's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Iterable


def sha256_text(parts: Iterable[str]) -> str:
    h = hashlib.sha256()
    for p in parts:
        data = p.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def tokenizer_hash(tokenizer: Any) -> str:
    """Hash of what decides token ids: the full fast-tokenizer definition (vocab, merges,
    normalizer, pre-tokenizer) when there is one, else the vocabulary; plus the special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        definition = json.loads(backend.to_str())
        definition.pop("truncation", None)
        definition.pop("padding", None)
        special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
        return sha256_text([json.dumps(definition, sort_keys=True, ensure_ascii=False),
                            json.dumps(special, sort_keys=True)])[:16]
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return sha256_text([json.dumps(vocab, ensure_ascii=False), json.dumps(special, sort_keys=True)])[:16]
