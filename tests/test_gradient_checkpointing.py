"""train.gradient_checkpointing: the student's own checkpointing gives the same loss and gradients
as without it (float tolerance) while autograd keeps far fewer bytes for backward. The measured
peak on a whole run is compared with the planner in tests/test_memplan.py."""

import pytest
import torch

from pipeline.config import KDConfig
from stage2_student_train.objective import Trainable, Weights, batch_objective
from stage2_student_train.state import enable_checkpointing


def student(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=300, n_embd=32, n_layer=4, n_head=2, n_positions=64))
    return tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=96, num_hidden_layers=4,
                                              num_attention_heads=2, num_key_value_heads=1, use_cache=False))


def loss_grads_and_saved_bytes(model, ids, checkpointing: bool):
    if checkpointing:
        enable_checkpointing(model)
    model.train().zero_grad(set_to_none=True)
    torch.manual_seed(2)  # GPT-2's dropout draws the same masks (the recompute restores the RNG)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = batch_objective(Trainable(model), {"input_ids": ids}, KDConfig(mode="none"),
                              Weights(ce=1.0, kd=0.0, temperature=1.0, label_smoothing=0.0, feature=0.0),
                              chunk=37, backward=True)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out["loss"], grads, sum(saved)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_same_loss_and_gradients_with_fewer_saved_bytes(family):
    ids = torch.randint(0, 300, (4, 48), generator=torch.Generator().manual_seed(1))
    model = student(family)
    loss, grads, saved = loss_grads_and_saved_bytes(model, ids, checkpointing=False)
    loss_ck, grads_ck, saved_ck = loss_grads_and_saved_bytes(model, ids, checkpointing=True)
    assert abs(loss - loss_ck) < 1e-6 * max(1.0, abs(loss))
    assert grads.keys() == grads_ck.keys() and len(grads) > 5
    for name in grads:
        torch.testing.assert_close(grads_ck[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert saved_ck < 0.6 * saved, (saved_ck, saved)
