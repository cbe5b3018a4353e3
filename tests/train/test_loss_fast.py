"""The fused head + cross-entropy fast path equals the general chunked path (loss and gradients)."""

import pytest
import torch

import lorakit
from lorakit.config import LoraConfig
from lorakit.data import collate
from lorakit.train import loss as loss_mod
from lorakit.train.loss import causal_lm_loss_sum

from tiny_models import make_examples, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [3, 256])
def test_fused_head_ce_matches_general_path(monkeypatch, dtype, rows):
    torch.manual_seed(0)
    model = lorakit.add_lora(tiny_model("qwen2").to(dtype), LoraConfig(r=4, alpha=8))
    for _, layer in lorakit.lora.inject.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    batch = collate(make_examples(3, seed=2), 0)
    assert loss_mod._fast_head(model, model.get_output_embeddings(), torch.zeros(1, dtype=dtype))
    monkeypatch.setattr(loss_mod, "_HEAD_ROWS", rows)
    results = []
    for fast in (True, False):
        monkeypatch.setattr(loss_mod, "_fast_head", lambda *a, fast=fast: fast)
        model.zero_grad()
        loss = causal_lm_loss_sum(model, batch, chunk_size=5)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(l1, l2, rtol=tol, atol=0)
    for name in g1:
        err = (g1[name] - g2[name]).abs().max() / g2[name].abs().max().clamp(min=1e-12)
        assert err < tol, (name, err)


def test_fused_head_not_used_for_trainable_or_capped_heads():
    model = tiny_model("qwen2")
    head = model.get_output_embeddings()
    h = torch.zeros(1, dtype=head.weight.dtype)
    head.weight.requires_grad_(True)
    assert not loss_mod._fast_head(model, head, h)
    head.weight.requires_grad_(False)
    assert loss_mod._fast_head(model, head, h)
    model.config.final_logit_softcapping = 30.0
    assert not loss_mod._fast_head(model, head, h)
