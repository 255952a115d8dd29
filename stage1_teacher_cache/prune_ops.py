"""Importance scores and the slicing that turns a Llama-family teacher into a smaller student.

Depth: each decoder layer's Block Influence (ShortGPT), ``BI = 1 - mean cos(x_in, x_out)`` over
the calibration tokens, the angular change the layer makes to the residual stream; the layers
with the lowest BI are dropped (a layer whose output equals its input scores 0).

Width (Minitron-style activation importance, measured on the depth-pruned model):

- residual channels: sum over layers of the mean |output| of both RMSNorms (one index set for
  the whole residual stream: embeddings, every projection's input and output, the final norm);
- MLP neurons: mean |input of down_proj| per neuron, chosen per layer;
- attention heads: mean L2 norm of each query head's slice of the input of o_proj, chosen per
  layer and per key/value group (the same number of query heads kept in every group, so the
  grouped-query mapping head -> kv head stays ``h // heads_per_group``).

Kept indices are always sorted, so keeping everything is the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Shape:
    """The student's shape: decoder layers, residual width, MLP width, query heads."""

    layers: int
    hidden: int
    intermediate: int
    heads: int


@dataclass
class Selection:
    """What the student keeps of the teacher: layer ids, residual channels, and per kept layer
    its MLP neurons and query heads."""

    layers: list[int]
    hidden: torch.Tensor
    intermediate: list[torch.Tensor]
    heads: list[torch.Tensor]


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def _tensor(x) -> torch.Tensor:
    return x[0] if isinstance(x, (tuple, list)) else x


def _run(model, batches: list[torch.Tensor]) -> int:
    """Forward every batch (no grad); returns the number of tokens seen."""
    tokens = 0
    with torch.inference_mode():
        for ids in batches:
            model(input_ids=ids, use_cache=False)
            tokens += ids.numel()
    return tokens


def block_influence(model, batches: list[torch.Tensor]) -> np.ndarray:
    """[num_layers] ``1 - mean cosine(layer input, layer output)`` over every calibration token."""
    layers = decoder_layers(model)
    sums = torch.zeros(len(layers), dtype=torch.float64)

    def hook(i):
        def record(module, args, kwargs, output):
            x_in = (args[0] if args else kwargs["hidden_states"]).double()
            x_out = _tensor(output).double()
            sums[i] += torch.nn.functional.cosine_similarity(x_in, x_out, dim=-1).sum()
        return record

    handles = [layer.register_forward_hook(hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        tokens = _run(model, batches)
    finally:
        for h in handles:
            h.remove()
    return (1.0 - sums / tokens).numpy()


def choose_layers(scores: np.ndarray, keep: int) -> list[int]:
    """The ``keep`` layers of highest importance, in model order (ties: the earlier layer)."""
    order = np.argsort(-scores, kind="stable")
    return sorted(int(i) for i in order[:keep])


def width_importance(model, batches: list[torch.Tensor]) -> dict:
    """Activation magnitudes: ``hidden`` [D], ``intermediate`` [L, I], ``heads`` [L, H]."""
    cfg = model.config
    layers, hd = decoder_layers(model), head_dim_of(cfg)
    hidden = torch.zeros(cfg.hidden_size, dtype=torch.float64)
    inter = torch.zeros(len(layers), cfg.intermediate_size, dtype=torch.float64)
    heads = torch.zeros(len(layers), cfg.num_attention_heads, dtype=torch.float64)

    def norm_hook(module, args, output):
        hidden.add_(_tensor(output).double().abs().flatten(0, -2).sum(0))

    def down_hook(i):
        def record(module, args):
            inter[i] += args[0].double().abs().flatten(0, -2).sum(0)
        return record

    def o_hook(i):
        def record(module, args):
            x = args[0].double().flatten(0, -2)
            heads[i] += x.view(x.shape[0], -1, hd).norm(dim=-1).sum(0)
        return record

    handles = []
    for i, layer in enumerate(layers):
        handles += [layer.input_layernorm.register_forward_hook(norm_hook),
                    layer.post_attention_layernorm.register_forward_hook(norm_hook),
                    layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)),
                    layer.self_attn.o_proj.register_forward_pre_hook(o_hook(i))]
    try:
        tokens = _run(model, batches)
    finally:
        for h in handles:
            h.remove()
    return {"hidden": hidden / tokens, "intermediate": inter / tokens, "heads": heads / tokens}


def top_sorted(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the ``keep`` largest scores, in increasing index order."""
    return torch.sort(torch.topk(scores, keep, sorted=False).indices).values


def top_heads(scores: torch.Tensor, keep: int, kv_heads: int) -> torch.Tensor:
    """``keep`` query heads, ``keep // kv_heads`` from each key/value group, by importance."""
    per_group = scores.shape[0] // kv_heads
    groups = scores.view(kv_heads, per_group)
    picked = [g * per_group + top_sorted(groups[g], keep // kv_heads) for g in range(kv_heads)]
    return torch.cat(picked)


def select_width(importance: dict, shape: Shape, kv_heads: int, layers: list[int]) -> Selection:
    """Turn importance scores (of the depth-pruned model) into a ``Selection``."""
    return Selection(layers=layers,
                     hidden=top_sorted(importance["hidden"], shape.hidden),
                     intermediate=[top_sorted(s, shape.intermediate) for s in importance["intermediate"]],
                     heads=[top_heads(s, shape.heads, kv_heads) for s in importance["heads"]])


def full_selection(config, layers: list[int]) -> Selection:
    """Every channel, neuron and head of ``layers``: depth pruning only."""
    n = len(layers)
    return Selection(layers=layers, hidden=torch.arange(config.hidden_size),
                     intermediate=[torch.arange(config.intermediate_size)] * n,
                     heads=[torch.arange(config.num_attention_heads)] * n)


def _rows_of_heads(heads: torch.Tensor, hd: int) -> torch.Tensor:
    return (heads[:, None] * hd + torch.arange(hd)).reshape(-1)


def _layer_slices(sel: Selection, j: int, hd: int) -> dict[str, tuple]:
    """parameter suffix -> (row index, column index) of new layer ``j`` (None: all)."""
    h, q, m = sel.hidden, _rows_of_heads(sel.heads[j], hd), sel.intermediate[j]
    return {"self_attn.q_proj": (q, h), "self_attn.k_proj": (None, h), "self_attn.v_proj": (None, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (m, h), "mlp.up_proj": (m, h), "mlp.down_proj": (h, m),
            "input_layernorm": (h, None), "post_attention_layernorm": (h, None)}


def _take(t: torch.Tensor, rows, cols) -> torch.Tensor:
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None and t.dim() == 2:
        t = t.index_select(1, cols)
    return t.clone()


def sliced_state(model, sel: Selection) -> dict[str, torch.Tensor]:
    """The teacher's parameters restricted to ``sel``, under the student's names (layer ``i`` of
    the teacher becomes layer ``j`` = its rank among the kept layers)."""
    hd = head_dim_of(model.config)
    state = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    base = "model."
    for name, t in state.items():
        if name.startswith(base + "layers."):
            i, rest = name[len(base + "layers."):].split(".", 1)
            if int(i) not in sel.layers:
                continue
            j = sel.layers.index(int(i))
            module, _ = rest.rsplit(".", 1)
            rows, cols = _layer_slices(sel, j, hd).get(module, (None, None))
            out[f"{base}layers.{j}.{rest}"] = _take(t, rows, cols)
        elif name in (base + "embed_tokens.weight", "lm_head.weight"):
            out[name] = _take(t, None, sel.hidden)
        elif name == base + "norm.weight":
            out[name] = _take(t, sel.hidden, None)
        elif "rotary_emb" not in name:
            out[name] = t.clone()
    return out


def student_config(config, shape: Shape, layers: list[int]):
    """The teacher's config at the student's shape (head_dim written out: it does not change)."""
    import copy

    cfg = copy.deepcopy(config)
    if hasattr(cfg, "quantization_config"):  # a GGUF teacher is dequantized on load; the student is plain fp32
        del cfg.quantization_config
    cfg.head_dim = head_dim_of(config)
    cfg.num_hidden_layers, cfg.hidden_size = shape.layers, shape.hidden
    cfg.intermediate_size, cfg.num_attention_heads = shape.intermediate, shape.heads
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [cfg.layer_types[i] for i in layers]
    return cfg


def build_pruned(model, sel: Selection, shape: Shape):
    """A new model of ``shape`` holding the teacher's weights restricted to ``sel``."""
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_config(student_config(model.config, shape, sel.layers), dtype=torch.float32)
    state = sliced_state(model, sel)
    missing, unexpected = student.load_state_dict(state, strict=False)
    tied = {"lm_head.weight"} if student.config.tie_word_embeddings else set()
    missing = [k for k in missing if k not in tied and "rotary_emb" not in k]
    if missing or unexpected:
        raise RuntimeError(f"pruned state does not fit the student: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if tied:
        student.tie_weights()
    return student.eval()
