"""prune-teacher: a student cut from the teacher's own weights.

A tiny random Llama teacher (4 layers, d=64, 4 query heads in 2 key/value groups) saved as a
Hugging Face directory; the calibration text is the shared test corpus.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import gpt2_tokenizer, stage1_overrides
from pipeline.cli import main as cli_main
from pipeline.config import load_config
from stage1_teacher_cache import prune_ops as ops
from stage1_teacher_cache.prune import prune_teacher


VOCAB, EOS = 50257, 50256  # GPT-2's


def tiny_llama(seed: int = 7):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.1, tie_word_embeddings=True, use_cache=False,
                         eos_token_id=EOS, bos_token_id=EOS)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("prune-teacher")
    tiny_llama().save_pretrained(out)
    gpt2_tokenizer().save_pretrained(out)
    return out


def config_for(teacher_dir, corpus_dir, tmp_path):
    return load_config(None, stage1_overrides(teacher_dir, corpus_dir, tmp_path / "cache"))


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(n: int = 2, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def test_full_shape_equals_the_teacher(teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "student"
    prune_teacher(config_for(teacher_dir, corpus_dir, tmp_path), out)
    from transformers import AutoTokenizer

    student, teacher = load(out), load(teacher_dir)
    text = "To be, or not to be"
    assert AutoTokenizer.from_pretrained(out).encode(text) == AutoTokenizer.from_pretrained(teacher_dir).encode(text)
    x = ids()
    with torch.inference_mode():
        assert torch.equal(student(input_ids=x).logits, teacher(input_ids=x).logits)
    info = json.loads((out / "prune.json").read_text())
    assert info["kept_layers"] == [0, 1, 2, 3] and len(info["block_influence"]) == 4


def test_pruned_layers_carry_the_teachers_weights(teacher_dir, corpus_dir, tmp_path):
    out = tmp_path / "student"
    info = prune_teacher(config_for(teacher_dir, corpus_dir, tmp_path), out, layers=2)
    student, teacher = load(out), load(teacher_dir)
    kept = info["kept_layers"]
    scores = info["block_influence"]
    assert len(kept) == 2 and student.config.num_hidden_layers == 2
    assert min(scores[i] for i in kept) >= max(s for i, s in enumerate(scores) if i not in kept)
    t, s = teacher.state_dict(), student.state_dict()
    for j, i in enumerate(kept):
        for name, value in t.items():
            if name.startswith(f"model.layers.{i}."):
                assert torch.equal(s[name.replace(f"layers.{i}.", f"layers.{j}.", 1)], value), name
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])


def test_block_influence_finds_an_identity_layer():
    model = tiny_llama(seed=3)
    layer = model.model.layers[2]
    with torch.no_grad():  # attention and MLP both add zero: the layer returns its input
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    batches = [ids(2, 24, seed=1), ids(2, 24, seed=2)]
    scores = ops.block_influence(model, batches)
    assert abs(scores[2]) < 1e-6 and min(scores[[0, 1, 3]]) > 1e-3
    assert ops.choose_layers(scores, 3) == [0, 1, 3]
    # float64 reference: each layer's input and output, from the model's own hidden states
    with torch.inference_mode():
        states = [torch.cat(z) for z in zip(*(model(input_ids=b, output_hidden_states=True).hidden_states
                                              for b in batches))]
    for i in range(3):  # the last entry is after the final norm, not layer 3's output
        cos = torch.nn.functional.cosine_similarity(states[i].double(), states[i + 1].double(), dim=-1)
        assert scores[i] == pytest.approx(1 - cos.mean().item(), abs=1e-6)


def reference_logits(w: dict, cfg, x: torch.Tensor, sel: ops.Selection) -> torch.Tensor:
    """A float64 Llama forward over the teacher's weights, sliced by hand to ``sel``."""
    hd, eps = cfg.head_dim, cfg.rms_norm_eps
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    hid, length = sel.hidden, x.shape[1]
    inv = 1.0 / cfg.rope_parameters["rope_theta"] ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = torch.cat([torch.outer(torch.arange(length, dtype=torch.float64), inv)] * 2, dim=-1)
    cos, sin = ang.cos(), ang.sin()

    def rms(h, weight):
        return h / torch.sqrt((h * h).mean(-1, keepdim=True) + eps) * weight[hid]

    def rope(t):
        return t * cos + torch.cat([-t[..., hd // 2:], t[..., :hd // 2]], dim=-1) * sin

    def head(name, h, n):  # rows n*hd:(n+1)*hd of a projection, input channels hid
        return h @ w[name][n * hd:(n + 1) * hd][:, hid].T

    mask = torch.full((length, length), -math.inf, dtype=torch.float64).triu(1)
    h = w["model.embed_tokens.weight"][x][..., hid]
    for j, i in enumerate(sel.layers):
        p = f"model.layers.{i}."
        a = rms(h, w[p + "input_layernorm.weight"])
        outs = []
        for q_head in sel.heads[j].tolist():
            kv = q_head // per_group
            q, k = rope(head(p + "self_attn.q_proj.weight", a, q_head)), rope(head(p + "self_attn.k_proj.weight", a, kv))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + mask, dim=-1)
            outs.append(att @ head(p + "self_attn.v_proj.weight", a, kv))
        cols = torch.cat([torch.arange(n * hd, (n + 1) * hd) for n in sel.heads[j].tolist()])
        h = h + torch.cat(outs, dim=-1) @ w[p + "self_attn.o_proj.weight"][hid][:, cols].T
        m, b = sel.intermediate[j], rms(h, w[p + "post_attention_layernorm.weight"])
        gate = b @ w[p + "mlp.gate_proj.weight"][m][:, hid].T
        up = b @ w[p + "mlp.up_proj.weight"][m][:, hid].T
        h = h + (torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"][hid][:, m].T
    return rms(h, w["model.norm.weight"]) @ w["model.embed_tokens.weight"][:, hid].T


def test_width_pruning_matches_a_hand_sliced_reference():
    model = tiny_llama(seed=5)
    g = torch.Generator().manual_seed(11)

    def subset(n, k):
        return torch.sort(torch.randperm(n, generator=g)[:k]).values

    heads = [torch.tensor([1, 2]), torch.tensor([0, 3]), torch.tensor([1, 3])]  # one per kv group
    sel = ops.Selection(layers=[0, 2, 3], hidden=subset(64, 32), intermediate=[subset(96, 40) for _ in range(3)],
                        heads=heads)
    student = ops.build_pruned(model, sel, ops.Shape(layers=3, hidden=32, intermediate=40, heads=2))
    x = ids(2, 20, seed=4)
    w = {k: v.double() for k, v in model.state_dict().items()}
    want = reference_logits(w, model.config, x, sel)
    with torch.inference_mode():
        got = student(input_ids=x).logits.double()
    assert (got - want).abs().max().item() < 1e-4 * want.abs().max().item()
    # keeping everything is the teacher, and a different channel set gives a different model
    full = ops.full_selection(model.config, [0, 1, 2, 3])
    want_full = reference_logits(w, model.config, x, full)
    with torch.inference_mode():
        assert (model(input_ids=x).logits.double() - want_full).abs().max() < 1e-4 * want_full.abs().max()
    other = ops.Selection(sel.layers, subset(64, 32), sel.intermediate, sel.heads)
    assert (reference_logits(w, model.config, x, other) - want).abs().max() > 1e-3 * want.abs().max()


def test_width_selection_keeps_the_most_active_channels():
    scores = torch.tensor([0.5, 3.0, 0.1, 2.0, 1.0, 0.2], dtype=torch.float64)
    assert ops.top_sorted(scores, 3).tolist() == [1, 3, 4]
    # 6 query heads in 2 kv groups of 3: the best 2 of each group, so every group keeps 2
    assert ops.top_heads(scores, 4, kv_heads=2).tolist() == [0, 1, 3, 4]


def test_cli_width_pruned_student_loads_and_runs(teacher_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "narrow"
    args = ["prune-teacher", "--out", str(out), "--layers", "3", "--hidden-size", "32",
            "--intermediate-size", "48", *stage1_overrides(teacher_dir, corpus_dir, tmp_path / "cache")]
    assert cli_main(args) == 0
    student = load(out)
    c = student.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim) == (3, 32, 48, 2, 2, 16)
    with torch.inference_mode():
        assert torch.isfinite(student(input_ids=ids()).logits).all()
    assert "wrote" in capsys.readouterr().out
    # bench.prune_distil's fresh arm: a stage-2 student of the pruned one's shape, parameter for parameter
    from bench.prune_distil import shape_overrides
    from stage2_student_train.student import build_student

    fresh = build_student(load_config(None, shape_overrides(out)), VOCAB, 256)
    assert ({n: tuple(p.shape) for n, p in fresh.named_parameters()}
            == {n: tuple(p.shape) for n, p in student.named_parameters()})


@pytest.mark.parametrize("extra, message", [
    (["--layers", "5"], "the teacher has 4 layers"),
    (["--hidden-size", "40"], "multiple of the head dim 16"),
    (["--hidden-size", "48"], "not a multiple of the 2 key/value heads"),
    (["--intermediate-size", "97"], "the teacher's is 96"),
])
def test_bad_shapes_fail_in_one_line_and_write_nothing(teacher_dir, corpus_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "student"
    rc = cli_main(["prune-teacher", "--out", str(out), *extra,
                   *stage1_overrides(teacher_dir, corpus_dir, tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and message in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / ".cache.plan").exists()


def test_a_non_empty_out_dir_is_refused_and_kept(teacher_dir, corpus_dir, tmp_path, capsys):
    out = tmp_path / "somebody-elses"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    rc = cli_main(["prune-teacher", "--out", str(out), *stage1_overrides(teacher_dir, corpus_dir, tmp_path / "cache")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not an empty directory" in err and len(err.splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["notes.txt"] and (out / "notes.txt").read_text() == "mine"


def test_a_gguf_teachers_quantization_config_is_not_inherited():
    """A GGUF teacher's config says quant_method=gguf; a student that inherits it loads as a
    "quantized" model that stage 2 then cannot save (found training the embedded teacher's)."""
    model = tiny_llama()
    model.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    cfg = ops.student_config(model.config, ops.Shape(2, 64, 96, 4), [0, 3])
    assert not hasattr(cfg, "quantization_config") and "quantization_config" not in cfg.to_dict()
    assert hasattr(model.config, "quantization_config")  # the teacher's own config is untouched
