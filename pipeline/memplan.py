"""Memory planner: the peak device memory of stage 1 and stage 2 for a config, from the model
configs alone (no weights loaded), and the largest batch that fits a budget.

    python -m pipeline doctor --config FILE [--device-memory 16GiB] [--card p100 | --compute-capability 6.0]
                              [--teacher-config DIR] [--student-config DIR] [--json]

Model sizes come from ``transformers`` configs (the teacher's from its source, the student's
built from ``[student]`` exactly as stage 2 builds it), and parameter counts from instantiating
the architecture on the ``meta`` device (no memory, tied weights counted once). ``pipeline``
imports no stage: everything here is arithmetic on those dimensions.

Notation: ``T = batch x seq_len`` tokens, ``D`` hidden size, ``I`` MLP width, ``V`` vocabulary,
``kvd`` = key/value width (kv heads x head dim), ``qd`` = query width (heads x head dim; Qwen3:
not ``D``), ``P`` parameters, ``a`` bytes per activation
element (2 under fp16/bf16, 4 in fp32), ``C`` the chunk of positions of the head.

Stage 1 (inference, ``teacher.batch_size``, ``data.seq_len``, ``teacher.logits_chunk``):

- weights: ``P_t x b_t`` (b_t: 2 for fp16/bf16, 4 for fp32);
- the fp32 head (``Fp32Head``): nothing for an fp32 teacher; ``V x D x 4`` when it is cached
  (``D <= logits_chunk``); one fp32 slab ``slab_rows x D x 4`` otherwise;
- body activations, the peak inside one decoder layer (inference frees each tensor after its
  last use): residual, normed input and attention output ``3 T D``, q/k/v ``T (D + 2 kvd)``, and
  in the MLP gate/up/act(gate) ``3 T I`` at once: ``a T (4 D + 2 kvd + 3 I)`` (sdpa's fused
  kernels hold no ``S x S`` score matrix). A MoE layer (Qwen2/3-MoE, Mixtral) replaces the MLP's
  ``3 T I`` by its routed experts: router logits and fp32 probabilities ``T E (a + 4)`` and, per
  routed (token, expert) row (``T k``, k = ``num_experts_per_tok``), the gathered input, gate+up,
  act and product ``a (D + 4 I_moe)`` (transformers' grouped experts path); the peak layer is the
  larger of a dense and a sparse one;
- the head chunk: the ``[C, V]`` fp32 logits (logZ is computed in place) plus, in slab mode, one
  ``[C, slab_rows]`` product; beside it the kept last hidden state ``a T D`` and its fp32 copy.

Stage 2 (training, ``train.batch_size``, ``train.loss_chunk_size``), the largest of three moments:

- during forward/backward: weights ``4P``, AdamW moments ``8P`` and the EMA ``4P`` (fp32), the
  extras (feature map, projector/router: ``20`` bytes per parameter with their grads and states),
  the stored teacher head for ``union`` (``V_t D_t x 4``), the autocast weight copies (``2P``
  under fp16/bf16; autocast keeps them for backward), the head's gradient ``4 V D`` plus its
  per-chunk temporary ``a V D``, the saved activations, and the chunk's ``[C, V]`` tensors in
  its backward: the fp32 log-softmax, its gradient and the logits' gradient, ``12 C V`` bytes
  (the logits are freed once the chunk's loss is built);
- the optimizer step: ``20P`` (weights, grads, moments, EMA) plus its temporaries (CUDA: none,
  AdamW is fused and in place; CPU runs AdamW per tensor: the largest parameter);
- eval with EMA: the weights are copied into a second model (``+4P``) beside ``20P``, and the
  eval chunk holds logits and log-softmax (``8 C V``).

Saved activations per decoder layer, in elements per token, counted on the HF Llama graph under
sdpa (what autograd keeps for backward): the two RMSNorms keep their fp32 input and normalised
output (``2 x 2 D`` in fp32), q/k/v and their rotary copies ``2 (D + 2 kvd)``, the grouped k/v
expanded to all heads for sdpa ``2 D`` (GQA), the sdpa output and o_proj input ``2 D``, the MLP
input ``D`` and gate, up, act(gate) and their product ``4 I``, plus the residual ``D``. Total
``a (8 D + 4 kvd + 4 I) + 4 (4 D)`` bytes per token per layer; the final norm, the head input and
its gradient add ``(4 + a) D + 4 D`` per token. A MoE student's sparse layers keep, instead of
``4 I``, the router's ``E (a + 4)`` and per routed row ``a (2 D + 4 I_moe)`` (not measured yet).
With ``train.gradient_checkpointing`` each layer keeps only its fp32 input ``4 D``; in backward one
layer's activations are alive again with their gradients (twice one layer's bytes).

What a KD mode adds (trained modules, the teacher's head on the device) comes from stage 2's
mode registry through ``mode_memory`` (``doctor`` looks it up by module path), never from here.

Measured peaks are compared with these estimates on the CPU in ``tests/test_memplan.py`` (within
25%: dense and MoE teachers, students with and without gradient checkpointing); on a GPU ``make bench-gpu`` compares them with ``torch.cuda.max_memory_allocated``. A GPU
also needs ~0.3-0.5 GiB for the CUDA context outside torch's allocator and some fragmentation
slack: ``fits`` keeps ``RESERVE_BYTES`` and ``SLACK`` of the budget free.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from .config import Config

GIB = 2**30
RESERVE_BYTES = GIB // 2
"""CUDA context and library workspaces, outside torch's allocator (CPU: none)."""
SLACK = 0.10
"""Fraction of the budget kept free for allocator fragmentation."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class ModelDims:
    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    params: int
    largest_param: int
    experts: int = 0
    """Routed experts per sparse MLP (0: a dense model)."""
    experts_per_token: int = 0
    moe_intermediate: int = 0
    moe_layers: int = 0
    """Decoder layers whose MLP is the routed experts (the others are dense)."""

    @property
    def kvd(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def qd(self) -> int:
        """Query/attention-output width (Qwen3: heads x head_dim != hidden)."""
        return self.heads * self.head_dim

    @property
    def routed(self) -> int:
        """(token, expert) rows per token in a sparse layer: what the experts' activations scale with."""
        return self.experts_per_token if self.experts else 0


def moe_layout(hf) -> tuple[int, int, int, int]:
    """(experts, experts per token, expert MLP width, sparse layers) of a config; zeros when dense.
    Qwen2/3-MoE: ``num_experts``, ``decoder_sparse_step``, ``mlp_only_layers``; Mixtral:
    ``num_local_experts`` (every layer sparse, experts as wide as ``intermediate_size``)."""
    experts = int(getattr(hf, "num_experts", None) or getattr(hf, "num_local_experts", None) or 0)
    per_token = int(getattr(hf, "num_experts_per_tok", None) or 0)
    if experts <= 0 or per_token <= 0:
        return 0, 0, 0, 0
    width = int(getattr(hf, "moe_intermediate_size", None) or hf.intermediate_size)
    step = int(getattr(hf, "decoder_sparse_step", None) or 1)
    dense_only = set(getattr(hf, "mlp_only_layers", None) or ())
    layers = sum(1 for i in range(int(hf.num_hidden_layers)) if i not in dense_only and (i + 1) % step == 0)
    return experts, per_token, width, layers


def dims_from_hf_config(hf) -> ModelDims:
    """Dimensions of a decoder-only LM from its ``transformers`` config; parameters counted by
    building the architecture on the meta device (no memory; tied weights once)."""
    import torch
    from transformers import AutoModelForCausalLM

    from .hf_shape import check_hf_shape

    check_hf_shape(hf, f"the {getattr(hf, 'model_type', '')} config".replace("the  ", "the "))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf)
    params = list(model.parameters())
    heads = int(getattr(hf, "num_attention_heads"))
    hidden = int(hf.hidden_size)
    head_dim = int(getattr(hf, "head_dim", None) or hidden // heads)
    experts, per_token, moe_width, moe_layers = moe_layout(hf)
    return ModelDims(vocab=int(hf.vocab_size), hidden=hidden, layers=int(hf.num_hidden_layers), heads=heads,
                     kv_heads=int(getattr(hf, "num_key_value_heads", None) or heads), head_dim=head_dim,
                     intermediate=int(getattr(hf, "intermediate_size", None) or 4 * hidden),
                     params=sum(p.numel() for p in params), largest_param=max(p.numel() for p in params),
                     experts=experts, experts_per_token=per_token, moe_intermediate=moe_width, moe_layers=moe_layers)


from .hf_shape import local_hf_config  # noqa: E402  (planning from a local config.json)


def teacher_dims(cfg: Config, config_path: str | None = None) -> ModelDims:
    from .models import load_hf_config, teacher_files

    if config_path:
        return dims_from_hf_config(local_hf_config(config_path))
    return dims_from_hf_config(load_hf_config(*teacher_files(cfg.teacher.model, cfg.teacher.gguf_file)))


def student_hf_config(cfg: Config, vocab: int, max_positions: int, config_path: str | None = None):
    """The student's config exactly as stage 2 builds it (``student.py: build_student``)."""
    if config_path:
        return local_hf_config(config_path)
    if cfg.student.model:
        from transformers import AutoConfig
        return AutoConfig.from_pretrained(cfg.student.model)
    from transformers import LlamaConfig
    s = cfg.student
    return LlamaConfig(vocab_size=vocab, hidden_size=s.hidden_size, intermediate_size=s.intermediate_size,
                       num_hidden_layers=s.num_layers, num_attention_heads=s.num_heads,
                       num_key_value_heads=s.num_kv_heads, max_position_embeddings=max_positions,
                       tie_word_embeddings=True, use_cache=False)


# ---------------------------------------------------------------- stage 1


def fp32_head_bytes(d: ModelDims, dtype_bytes: int, logits_chunk: int) -> tuple[str, int, int]:
    """(mode, bytes of the fp32 head copy or slab, slab rows), as ``Fp32Head`` chooses them."""
    if dtype_bytes == 4:
        return "native-fp32", 0, d.vocab
    if d.hidden <= logits_chunk:
        return "cached", d.vocab * d.hidden * 4, d.vocab
    rows = min(d.vocab, max(1024, logits_chunk * d.vocab // (4 * d.hidden)))
    return "slabs", rows * d.hidden * 4, rows


def moe_block_bytes_per_token(d: ModelDims, a: int) -> int:
    """Inference peak of a routed MLP per token (transformers' grouped experts path): the router's
    logits and fp32 probabilities (E each), then per routed (token, expert) row the gathered input
    ``D``, gate+up ``2 I``, act(gate) and the gated product ``2 I`` at once; int64 sort indices."""
    return d.experts * (a + 4) + d.routed * (a * (d.hidden + 4 * d.moe_intermediate) + 3 * 8)


def stage1_terms(d: ModelDims, *, batch: int, seq_len: int, logits_chunk: int, dtype_bytes: int,
                 top_k: int) -> dict[str, int]:
    """Stage 1's peak, term by term (bytes). ``peak`` = weights + head copy + the larger of the
    body's layer peak and the head chunk with what it keeps beside it. The body's layer is the
    larger of a dense one and, for a MoE, one with routed experts."""
    t, a, c = batch * seq_len, dtype_bytes, min(logits_chunk, batch * seq_len)
    mode, head_copy, rows = fp32_head_bytes(d, a, logits_chunk)
    weights = d.params * a
    attention = a * (3 * d.hidden + d.qd + 2 * d.kvd)
    dense = attention + a * 3 * d.intermediate if d.moe_layers < d.layers else 0
    sparse = attention + moe_block_bytes_per_token(d, a) if d.moe_layers else 0
    body = t * max(dense, sparse)
    chunk = 4 * c * d.vocab + (4 * c * rows if mode == "slabs" else 0)
    kept = t * d.hidden * (a + 4) + t * top_k * (8 + 4 + 4) + t * 4 * 3
    return {"weights": weights, "fp32_head": head_copy, "activations": body, "logits_chunk": chunk,
            "outputs": kept, "peak": weights + head_copy + max(body + t * d.hidden * a, chunk + kept)}


# ---------------------------------------------------------------- stage 2


def activation_bytes_per_token(d: ModelDims, a: int, sparse: bool = False) -> int:
    """Saved activations of one decoder layer per token (see the module docstring); ``sparse``:
    a layer with routed experts, whose MLP keeps the router's logits and probabilities and, per
    routed (token, expert) row, its input and output ``2 D`` and gate, up, act, product ``4 I``."""
    attention = a * (2 * d.hidden + 6 * d.qd + 4 * d.kvd) + 4 * 4 * d.hidden
    if not sparse:
        return attention + a * 4 * d.intermediate
    return attention + d.experts * (a + 4) + d.routed * (a * (2 * d.hidden + 4 * d.moe_intermediate) + 3 * 8)


def body_activation_bytes(d: ModelDims, a: int, checkpointing: bool = False) -> int:
    """Per token, what the decoder keeps for backward. With gradient checkpointing each layer
    keeps only its fp32 input (``4 D``); in backward one layer at a time is recomputed, and its
    activations and their gradients (about as many bytes again) exist together."""
    dense = activation_bytes_per_token(d, a)
    sparse = activation_bytes_per_token(d, a, sparse=True) if d.moe_layers else 0
    if checkpointing:
        return d.layers * 4 * d.hidden + 2 * max(dense if d.moe_layers < d.layers else 0, sparse)
    return (d.layers - d.moe_layers) * dense + d.moe_layers * sparse


def stage2_terms(d: ModelDims, *, batch: int, seq_len: int, loss_chunk: int, autocast_bytes: int, cuda: bool,
                 ema: bool = True, extra_params: int = 0, union_head: int = 0,
                 checkpointing: bool = False) -> dict[str, int]:
    """Stage 2's peak, term by term (bytes): the largest of forward/backward, optimizer step, eval.
    ``union_head``: bytes a KD mode keeps on the device beside the student (the teacher's head)."""
    a, p = autocast_bytes, d.params
    t = batch * seq_len
    c = min(loss_chunk, batch * (seq_len - 1))
    head = d.vocab * d.hidden
    static = 4 * p + 8 * p + (4 * p if ema else 0) + 20 * extra_params + union_head
    autocast_copies = 2 * p if a == 2 else 0
    acts = t * (body_activation_bytes(d, a, checkpointing) + (4 + a) * d.hidden + 4 * d.hidden)
    # backward of one chunk: fp32 logp, its gradient and the logits' gradient (the logits themselves
    # are freed when the chunk's loss is built: objective._chunk_loss)
    chunk = 12 * c * d.vocab
    fwd_bwd = static + autocast_copies + 4 * head + a * head + acts + chunk
    opt_tmp = 0 if cuda else 4 * d.largest_param  # CUDA: fused AdamW, in place; CPU: one tensor at a time
    opt = static + 4 * p + opt_tmp
    evaluation = static + 4 * p + 4 * p + 8 * c * d.vocab + t * d.hidden * a * 4
    return {"weights": 4 * p, "grads": 4 * p, "adamw": 8 * p, "ema": 4 * p if ema else 0,
            "extras": 20 * extra_params, "union_head": union_head, "autocast_copies": autocast_copies,
            "activations": acts, "loss_chunk": chunk, "forward_backward": fwd_bwd, "optimizer_step": opt,
            "eval": evaluation, "peak": max(fwd_bwd, opt, evaluation)}


# ---------------------------------------------------------------- the plan for a config


def parse_bytes(text: str) -> int:
    """'16GiB', '16 GB', '800MiB', '1.5e9' -> bytes (GB/MB are decimal, GiB/MiB binary)."""
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([KMGT]?i?B?)?\s*", text)
    if not m:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 16GiB or 800MB")
    unit = (m.group(2) or "").upper()
    scale = {"": 1, "B": 1, "KB": 1e3, "MB": 1e6, "GB": 1e9, "TB": 1e12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "K": 2**10, "M": 2**20, "G": 2**30}
    if unit not in scale:
        raise ValueError(f"unknown memory unit in {text!r}; use B, MB, GB, MiB or GiB")
    return int(float(m.group(1)) * scale[unit])


def fits(peak: int, budget: int, cuda: bool) -> bool:
    return peak <= (budget - (RESERVE_BYTES if cuda else 0)) * (1 - SLACK)


def largest_batch(peak_of, budget: int, cuda: bool, limit: int = 1 << 16) -> int:
    """The largest batch b (0 if none) with ``fits(peak_of(b))``; peak_of grows with b."""
    if not fits(peak_of(1), budget, cuda):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(peak_of(hi), budget, cuda):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(peak_of(mid), budget, cuda) else (lo, mid)
    return lo


CARDS: dict[str, tuple[tuple[int, int], int]] = {
    "p100": ((6, 0), 16 * GIB), "t4": ((7, 5), 15 * GIB), "v100": ((7, 0), 16 * GIB),
    "a10g": ((8, 6), 22 * GIB), "l4": ((8, 9), 22 * GIB), "a100": ((8, 0), 40 * GIB),
    "a100-80gb": ((8, 0), 80 * GIB), "h100": ((9, 0), 80 * GIB),
}
"""``doctor --card NAME``: compute capability and the memory torch reports for the card (a T4's
16 GB is ~15 GiB usable; a P100's 16 GiB)."""


def precision_bytes(requested: str, cuda: bool, capability: tuple[int, int] | None) -> int:
    """Bytes per element the precision policy (``device.choose_precision``) gives on the target:
    fp32 on a CPU unless asked; on CUDA the policy at ``capability`` (unknown: Ampere's)."""
    import torch

    from .device import choose_precision

    if not cuda:
        return DTYPE_BYTES.get(requested, 4)
    chosen = choose_precision(torch.device("cuda"), requested, capability=capability or (8, 0))
    return torch.finfo(chosen.dtype).bits // 8


def no_mode_memory(cfg: Config, teacher: ModelDims, student: ModelDims) -> dict[str, int]:
    return {"extra_params": 0, "device_bytes": 0}


def plan(cfg: Config, *, budget: int | None = None, cuda: bool | None = None,
         capability: tuple[int, int] | None = None, teacher: ModelDims | None = None,
         student: ModelDims | None = None, mode_memory=no_mode_memory, teacher_config: str | None = None,
         student_config: str | None = None) -> dict:
    """The memory plan of ``cfg``: per-stage terms, peaks, and the largest batches that fit.

    ``budget``/``cuda``/``capability`` default to the device this process sees (CUDA: its total
    memory; CPU: MemAvailable); give them to plan for another card. Dimensions default to those
    read from the configs (``teacher_config``/``student_config``: a local config.json instead).
    ``mode_memory(cfg, teacher, student)`` gives what the KD mode adds: ``extra_params`` trained
    beside the student and ``device_bytes`` held on the device (stage 2 owns it; ``pipeline``
    names no mode)."""
    import torch

    if cuda is None:
        cuda = torch.cuda.is_available()
    if budget is None:
        budget = device_budget(cuda)
    if cuda and capability is None and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
    td = teacher or teacher_dims(cfg, teacher_config)
    t_bytes = precision_bytes(cfg.teacher.dtype, cuda, capability)
    s_bytes = precision_bytes(cfg.train.precision, cuda, capability)
    sd = student or dims_from_hf_config(student_hf_config(cfg, td.vocab, cfg.data.seq_len, student_config))
    extras = mode_memory(cfg, td, sd)

    def s1(b: int) -> dict:
        return stage1_terms(td, batch=b, seq_len=cfg.data.seq_len, logits_chunk=cfg.teacher.logits_chunk,
                            dtype_bytes=t_bytes, top_k=cfg.cache.top_k)

    def s2(b: int, ckpt: bool = cfg.train.gradient_checkpointing) -> dict:
        return stage2_terms(sd, batch=b, seq_len=cfg.data.seq_len, loss_chunk=cfg.train.loss_chunk_size,
                            autocast_bytes=s_bytes, cuda=cuda, ema=cfg.train.ema_decay > 0,
                            extra_params=extras["extra_params"], union_head=extras["device_bytes"],
                            checkpointing=ckpt)

    stage1, stage2 = s1(cfg.teacher.batch_size), s2(cfg.train.batch_size)
    both = {f"{name}_{'checkpointing' if ckpt else 'no_checkpointing'}": value
            for ckpt in (False, True)
            for name, value in (("peak", s2(cfg.train.batch_size, ckpt)["peak"]),
                                ("largest_batch", largest_batch(lambda b: s2(b, ckpt)["peak"], budget, cuda)))}
    return {
        "device": "cuda" if cuda else "cpu", "budget_bytes": budget,
        "capability": ".".join(map(str, capability)) if cuda and capability else None,
        "usable_bytes": int((budget - (RESERVE_BYTES if cuda else 0)) * (1 - SLACK)),
        "teacher": dataclasses.asdict(td), "student": dataclasses.asdict(sd),
        "stage1": {"batch_size": cfg.teacher.batch_size, "dtype_bytes": t_bytes,
                   "head_mode": fp32_head_bytes(td, t_bytes, cfg.teacher.logits_chunk)[0], **stage1,
                   "fits": fits(stage1["peak"], budget, cuda),
                   "largest_batch": largest_batch(lambda b: s1(b)["peak"], budget, cuda)},
        "stage2": {"batch_size": cfg.train.batch_size, "autocast_bytes": s_bytes,
                   "gradient_checkpointing": cfg.train.gradient_checkpointing, **stage2,
                   "fits": fits(stage2["peak"], budget, cuda),
                   "largest_batch": largest_batch(lambda b: s2(b)["peak"], budget, cuda), **both},
    }


def device_budget(cuda: bool) -> int:
    import torch

    if cuda:
        return torch.cuda.mem_get_info()[1]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 * GIB
