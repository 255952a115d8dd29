"""Packed documents that do not see each other (``data.document_mask``).

Stage 1 packs documents into sequences of ``seq_len`` tokens, joined by the end-of-document
token. Without a document mask a token attends to every earlier token of its sequence, including
those of the documents packed before it, so the teacher's cached distribution at a position
depends on whichever document happened to precede it. With the mask each token attends only to
earlier tokens of its own document, and position ids restart at 0 where a document starts (its
piece, when a document runs over from the previous sequence): every position computes exactly
what it computes when its document (its piece of this sequence, with its end-of-document token)
is run alone.

Segments come from per-token document ids (the cache's ``doc_id``: the end-of-document token
belongs to the document it ends): a segment is a run of equal ids. Both stages build the same
mask from them, stage 2 in the student's own tokens (``cross.py`` gives each student token the
document of the character it ends on).

How it reaches the model: an explicit 4-D mask ``[B, 1, L, L]`` and ``position_ids``, which every
decoder built on transformers' attention interface accepts (Llama, Qwen2/3, Qwen3-MoE, Mistral,
GPT-2; transformers passes a 4-D mask through unchanged): boolean (True = attend) for SDPA, an
additive float mask (0 / dtype minimum) for eager attention. Other attention implementations
(flash-attention, flex) are refused; a model that ignores the mask or the position ids is caught
by ``check_model`` (a packed pass against each piece alone) before any work.
"""

from __future__ import annotations

from typing import Callable

import torch

from .errors import ConfigError

SUPPORTED = ("sdpa", "eager")
CHECK_TOKENS = 12
"""Tokens per synthetic document in ``check_model``."""


def segment_starts(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] bool: True where a segment (a run of equal document ids) starts."""
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    return starts


def position_ids(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, L] int64 positions that restart at 0 where each segment starts."""
    idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    first = torch.where(segment_starts(doc_ids), idx, torch.zeros_like(idx)).cummax(dim=1).values
    return idx - first


def allowed(doc_ids: torch.Tensor) -> torch.Tensor:
    """[B, L, L] bool: query q may attend to key k when k <= q and both are in one segment."""
    seg = segment_starts(doc_ids).cumsum(dim=1)
    length = doc_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=doc_ids.device).tril()
    return (seg[:, :, None] == seg[:, None, :]) & causal


def implementation(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def attention_mask(doc_ids: torch.Tensor, impl: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4-D mask ``[B, 1, L, L]`` for attention implementation ``impl``."""
    ok = allowed(doc_ids)[:, None]
    if impl == "sdpa":
        return ok
    return torch.zeros(ok.shape, dtype=dtype, device=ok.device).masked_fill_(~ok, torch.finfo(dtype).min)


def require_supported(model, who: str) -> str:
    impl = implementation(model)
    if impl not in SUPPORTED:
        raise ConfigError(f"data.document_mask needs sdpa or eager attention, and {who} "
                          f"({type(model).__name__}) uses {impl!r}; load it with attn_implementation='sdpa' "
                          "or set data.document_mask=false")
    return impl


def forward_kwargs(model, doc_ids: torch.Tensor | None, dtype: torch.dtype | None = None) -> dict:
    """``attention_mask`` and ``position_ids`` for a forward of ``model`` (a causal LM or its
    decoder) over a packed batch with per-token ``doc_ids`` [B, L]; ``{}`` when ``doc_ids`` is None."""
    if doc_ids is None:
        return {}
    impl = require_supported(model, "the model")
    if dtype is None:
        dtype = next(model.parameters()).dtype
    return {"attention_mask": attention_mask(doc_ids, impl, dtype), "position_ids": position_ids(doc_ids)}


@torch.no_grad()
def check_model(model, hidden: Callable[..., torch.Tensor], vocab: int, who: str, tolerance: float) -> float:
    """Run two synthetic documents packed in one sequence, masked, and each alone; the largest
    difference of the last hidden states. Raises ``ConfigError`` (one line) when it exceeds
    ``tolerance``: the model's family ignores the mask or the position ids. ``hidden(ids, **kw)``
    gives the last hidden state [B, L, D]."""
    require_supported(model, who)
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (1, 2 * CHECK_TOKENS), generator=gen).to(device)
    docs = torch.tensor([[0] * CHECK_TOKENS + [1] * CHECK_TOKENS], device=device)
    packed = hidden(ids, **forward_kwargs(model, docs)).float()
    alone = torch.cat([hidden(ids[:, :CHECK_TOKENS]), hidden(ids[:, CHECK_TOKENS:])], dim=1).float()
    diff = float((packed - alone).abs().max())
    if not diff <= tolerance:
        raise ConfigError(f"{who} ({type(model).__name__}) does not keep packed documents apart with a 4-D "
                          f"attention mask and restarted position ids (difference {diff:.3g}); "
                          "set data.document_mask=false")
    return diff
