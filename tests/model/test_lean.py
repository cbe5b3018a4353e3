"""model/lean.py: the lean gated MLP keeps fewer tensors for backward and changes no value."""

import pytest
import torch

import lorakit
from lorakit.config import LoraConfig
from lorakit.data import collate
from lorakit.model.lean import lean_activations
from lorakit.train.loss import causal_lm_loss_sum

from tiny_models import make_examples, tiny_model

GATED = ["llama", "qwen2", "mistral", "gemma2", "phi3"]


def _adapted(arch, dtype):
    torch.manual_seed(0)
    model = lorakit.add_lora(tiny_model(arch).to(dtype), LoraConfig(r=4, alpha=8))
    for _, layer in lorakit.lora.inject.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.train()
    return model


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = causal_lm_loss_sum(model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _live_bytes_after_forward(model, batch) -> int:
    """Bytes allocated and still held after the forward pass (what autograd keeps for backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss = causal_lm_loss_sum(model, batch)
    held = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    loss.backward()
    return held


@pytest.mark.parametrize("arch", GATED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_mlp_gives_the_same_loss_and_gradients_bit_for_bit(arch, dtype):
    batch = collate(make_examples(3, seed=1), 0)
    plain = _adapted(arch, dtype)
    lean = _adapted(arch, dtype)
    assert lean_activations(lean) == plain.config.num_hidden_layers
    (l1, g1), (l2, g2) = _loss_and_grads(plain, batch), _loss_and_grads(lean, batch)
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_lean_mlp_keeps_two_fewer_intermediate_tensors_per_layer(arch):
    batch = collate(make_examples(2, seed=3, min_len=12, max_len=12), 0)  # [2, 12]
    plain, lean = _adapted(arch, torch.float32), _adapted(arch, torch.float32)
    lean_activations(lean)
    cfg = plain.config
    saved = 2 * cfg.num_hidden_layers * batch["input_ids"].numel() * cfg.intermediate_size * 4  # act(g), p
    diff = _live_bytes_after_forward(plain, batch) - _live_bytes_after_forward(lean, batch)
    assert diff == saved, (diff, saved)


def test_lean_mlp_under_checkpointing_matches_and_unknown_forms_are_left_alone(monkeypatch):
    from lorakit.model import lean as lean_mod
    from lorakit.model.load import enable_gradient_checkpointing

    batch = collate(make_examples(3, seed=1), 0)
    plain, lean = _adapted("llama", torch.float32), _adapted("llama", torch.float32)
    for m in (plain, lean):
        enable_gradient_checkpointing(m)
    lean_activations(lean)
    (l1, g1), (l2, g2) = _loss_and_grads(plain, batch), _loss_and_grads(lean, batch)
    assert torch.equal(l1, l2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    # a listed class whose forward no longer reads as expected keeps its own forward
    monkeypatch.setitem(lean_mod._EXPECTED_SOURCE, "gate_up", ("self.down_proj(something_else)",))
    assert lean_activations(_adapted("qwen2", torch.float32)) == 0
    assert lean_activations(tiny_model("gpt2")) == 0
