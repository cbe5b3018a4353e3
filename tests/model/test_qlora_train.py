"""QLoRA end to end on a tiny model: LoRA on a 4-bit base trains, merges to a plain 16-bit
transformers model with the adapter model's logits, and that model saves and reloads in transformers."""

import pytest
import torch
from torch import nn

import lorakit
from lorakit.train.loss import count_supervised
from lorakit.train.step import TrainStep
from tiny_models import TINY, tiny_model

STEPS = 60
# Weights drawn with std 0.1 instead of transformers' 0.02: with the frozen lm_head at 0.02 every
# logit stays within about +-1.3 (|w| * |normed h| = 0.02 * 8 * 8), which caps how far the loss
# over 160 tokens can fall (~3.9 nats) whatever LoRA learns.
INIT_STD = 0.1


def _qlora_model(arch, folder, dtype=torch.float32, compute_dtype="fp32"):
    tiny_model(arch, dtype=dtype, initializer_range=INIT_STD).save_pretrained(folder)
    model, _ = lorakit.load_model(str(folder), quantization="nf4", compute_dtype=compute_dtype, load_tokenizer=False)
    torch.manual_seed(0)
    return lorakit.add_lora(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.0, target_modules="all-linear"))


def _batch_ids():
    return torch.randint(0, TINY["vocab_size"], (4, 16), generator=torch.Generator().manual_seed(2))


def _train(model, steps=STEPS, lr=1e-2):
    """Full-batch AdamW on one fixed batch; returns the per-token loss at every step."""
    ids = _batch_ids()
    batch = {"input_ids": ids, "labels": ids.clone()}
    n_tokens = count_supervised(batch["labels"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        loss = TrainStep(model)(batch)[0] / n_tokens
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    return losses


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(trained adapter model on a 4-bit llama base, its loss curve); trained once for the module."""
    model = _qlora_model("llama", tmp_path_factory.mktemp("llama"))
    return model, _train(model)


def test_lora_on_4bit_base_trains(trained):
    model, losses = trained
    assert losses[-1] < 0.25 * losses[0], losses  # measured: 5.2 -> 0.4 nats
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    base = [m.base_layer for m in model.modules() if isinstance(m, lorakit.LoRALinear)]
    assert len(base) == 14 and all(isinstance(b, lorakit.Linear4bit) for b in base)
    assert all(b.weight_packed.grad is None for b in base)


def test_merge_matches_unmerged_and_reloads_in_transformers(trained, tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model, _ = trained
    layers = {n: m for n, m in model.named_modules() if isinstance(m, lorakit.LoRALinear)}
    expected = {n: m.base_layer.dequantize(torch.float32) + m.scaling * (m.lora_B.weight @ m.lora_A.weight)
                for n, m in layers.items()}  # [out, in] fp32: dequantized base + B @ A
    unmerged = _logits(model, input_ids)
    merged = lorakit.merge(model, verify=input_ids)

    report = merged.lorakit_merge_report
    assert report.kl_divergence < 1e-6 and report.top1_agreement == 1.0  # fp32 rounding only
    assert not any(isinstance(m, (lorakit.Linear4bit, lorakit.LoRALinear)) for m in merged.modules())
    for name, weight in expected.items():
        layer = merged.get_submodule(name)
        assert type(layer) is nn.Linear and layer.weight.dtype == torch.float32  # the checkpoint's dtype
        torch.testing.assert_close(layer.weight, weight, atol=1e-6, rtol=0)
    torch.testing.assert_close(_logits(merged, input_ids), unmerged, atol=1e-4, rtol=1e-4)

    merged.save_pretrained(tmp_path)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert torch.equal(_logits(plain, input_ids), _logits(merged, input_ids))


def test_merge_of_bf16_checkpoint_gives_bf16_layers(tmp_path):
    model = _qlora_model("qwen2", tmp_path / "src", dtype=torch.bfloat16, compute_dtype="bf16")
    _train(model, steps=30)
    ids = _batch_ids()  # the trained batch: peaked predictions, so bf16 rounding cannot flip near-ties
    unmerged = _logits(model, ids)
    merged = lorakit.merge(model, verify=ids)  # raises if KL > 1e-3 or top-1 < 0.99
    assert merged.lorakit_merge_report.top1_agreement >= 0.99
    layer = merged.get_submodule("model.layers.0.mlp.up_proj")
    assert type(layer) is nn.Linear and layer.weight.dtype == torch.bfloat16
    torch.testing.assert_close(_logits(merged, ids), unmerged, atol=0.25, rtol=0.05)  # bf16 weights


def test_merge_of_bf16_checkpoint_loaded_in_fp32_runs(tmp_path, input_ids):
    model = _qlora_model("qwen2", tmp_path / "src", dtype=torch.bfloat16, compute_dtype="fp32")
    lorakit.merge(model, verify=input_ids)


def test_merged_4bit_gpt2_reloads_in_transformers(tmp_path, input_ids):
    from transformers import AutoModelForCausalLM

    model = _qlora_model("gpt2", tmp_path / "src")
    merged = lorakit.merge(model)
    merged.save_pretrained(tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    torch.testing.assert_close(_logits(plain, input_ids), _logits(merged, input_ids))
