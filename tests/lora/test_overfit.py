"""A tiny adapted model memorises one batch: the LoRA path learns."""

import torch

import lorakit

from tiny_models import tiny_model


def test_lora_overfits_one_batch(input_ids):
    torch.manual_seed(0)
    # A frozen head at the default init (std 0.02) caps the logit range; a wider init lets the
    # adapted layers alone move the logits far enough to memorise the batch.
    model = lorakit.add_lora(tiny_model("llama", initializer_range=0.2).train(), lorakit.LoraConfig(r=8, alpha=16))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(100):
        loss = model(input_ids, labels=input_ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] <= 0.1 * losses[0], (losses[0], losses[-1])
