"""LoRALinear on every supported architecture: exact start, gradients, freezing, options."""

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.lora.inject import lora_layers
from lorakit.lora.layer import LoRALinear

from tiny_models import tiny_model


def test_zero_B_gives_base_logits_exactly(arch, input_ids):
    model = tiny_model(arch)
    with torch.no_grad():
        base = model(input_ids).logits
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    assert len(list(lora_layers(model))) > 0
    with torch.no_grad():
        adapted = model(input_ids).logits
    assert torch.equal(base, adapted)


def test_phi3_fused_projections_are_adapted_whole():
    model = lorakit.add_lora(tiny_model("phi3"), lorakit.LoraConfig(r=4, target_modules=["qkv_proj", "gate_up_proj"]))
    attn = model.model.layers[0].self_attn.qkv_proj
    assert isinstance(attn, LoRALinear)
    assert attn.lora_B.weight.shape[0] == attn.base_layer.out_features  # one B over q, k and v rows


def test_gpt2_conv1d_is_wrapped_with_fan_in_fan_out(input_ids):
    model = lorakit.add_lora(tiny_model("gpt2"), lorakit.LoraConfig(r=4, target_modules=["c_attn"]))
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer.base_layer, Conv1D) and layer.fan_in_fan_out
    assert layer.lora_A.weight.shape == (4, 64) and layer.lora_B.weight.shape == (192, 4)


def test_init_A_kaiming_uniform_B_zero():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(256, 128), r=8, alpha=16)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)) bound = sqrt(6 / ((1 + 5) * fan_in))
    assert layer.lora_A.weight.abs().max() <= bound and layer.lora_A.weight.abs().max() > 0.9 * bound
    assert torch.count_nonzero(layer.lora_B.weight) == 0


@pytest.mark.parametrize("rslora,expected", [(False, 32 / 16), (True, 32 / 4)])
def test_scaling(rslora, expected):
    layer = LoRALinear(nn.Linear(8, 8), r=16, alpha=32, use_rslora=rslora)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(3, 8)
    want = layer.base_layer(x) + expected * x @ layer.lora_A.weight.T @ layer.lora_B.weight.T
    assert layer.scaling == expected
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


def test_dropout_applies_to_the_lora_branch_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4, alpha=4, dropout=0.5).train()
    x = torch.randn(4, 16)
    # With B = 0 the branch contributes nothing, so dropout must not touch the base output.
    assert torch.equal(layer(x), layer.base_layer(x))
    torch.nn.init.normal_(layer.lora_B.weight)
    outs = [layer(x) for _ in range(2)]
    assert not torch.equal(outs[0], outs[1])  # dropout active on the branch in train mode
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_adapter_dtype_and_output_dtype():
    base = nn.Linear(16, 8).to(torch.bfloat16)
    fp32_adapter = LoRALinear(base, r=4, alpha=8)
    assert fp32_adapter.lora_A.weight.dtype == torch.float32
    assert fp32_adapter(torch.randn(2, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model = lorakit.add_lora(tiny_model("llama", dtype=torch.bfloat16),
                             lorakit.LoraConfig(r=4, adapter_dtype="compute"))
    assert {l.lora_A.weight.dtype for _, l in lora_layers(model)} == {torch.bfloat16}


def _bf16_layer(branch_dtype, in_f=64, out_f=96, r=8):
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(in_f, out_f).to(torch.bfloat16), r=r, alpha=16, branch_dtype=branch_dtype)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    return layer


def test_branch_dtype_compute_and_adapter_math():
    """bf16 base, fp32 adapter weights. "compute": the branch runs in bf16 on bf16 copies of A and B,
    added by one addmm; "adapter": PEFT's fp32 branch, rounded once when added. Both give fp32
    gradients for A and B, and the two modes agree to bf16 precision."""
    x = torch.randn(5, 64).to(torch.bfloat16)
    fast, peft_like = _bf16_layer("compute"), _bf16_layer("adapter")
    A, B, s = fast.lora_A.weight, fast.lora_B.weight, fast.scaling
    base = fast.base_layer(x)
    assert torch.equal(fast(x), torch.addmm(base, x @ A.bfloat16().t(), B.bfloat16().t(), alpha=s))
    assert torch.equal(peft_like(x), base + ((x.float() @ A.t() @ B.t()) * s).bfloat16())
    g = torch.randn(5, 96).to(torch.bfloat16)
    for layer in (fast, peft_like):
        (layer(x).float() * g.float()).sum().backward()
        assert layer.lora_A.weight.grad.dtype == torch.float32 == layer.lora_B.weight.grad.dtype
    for name in ("lora_A", "lora_B"):
        got, want = getattr(fast, name).weight.grad, getattr(peft_like, name).weight.grad
        assert (got - want).abs().max() <= 2e-2 * want.abs().max(), name


def test_branch_dtype_compute_keeps_no_fp32_copy_of_the_input():
    """The point of "compute": autograd keeps the bf16 input it already has, never an fp32 copy of
    it (PEFT's branch keeps one per adapted layer: 2x the input's bytes)."""
    x = torch.randn(4, 32, 64).to(torch.bfloat16).requires_grad_(True)
    for mode, expect_fp32_copy in (("compute", False), ("adapter", True)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            _bf16_layer(mode)(x)
        fp32_inputs = [t for t in saved if t.dtype == torch.float32 and t.numel() == x.numel()]
        assert bool(fp32_inputs) == expect_fp32_copy, mode


def test_branch_dtype_is_checked_and_reaches_the_layers():
    with pytest.raises(lorakit.config.ConfigError, match="lora.branch_dtype='fp8'.*'compute', 'adapter'"):
        lorakit.LoraConfig(branch_dtype="fp8")
    with pytest.raises(ValueError, match="branch_dtype='fp8'"):
        LoRALinear(nn.Linear(4, 4), r=2, alpha=2, branch_dtype="fp8")
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=4, branch_dtype="adapter"))
    assert {l.branch_dtype for _, l in lora_layers(model)} == {"adapter"}


def test_only_lora_params_get_gradients_and_base_is_bit_identical_after_step(arch, input_ids):
    model = tiny_model(arch).train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8))
    for _, layer in lora_layers(model):  # non-zero B so that A also receives a gradient
        torch.nn.init.normal_(layer.lora_B.weight, std=0.02)
    model(input_ids, labels=input_ids).loss.backward()
    for name, p in model.named_parameters():
        is_lora = ".lora_A." in name or ".lora_B." in name
        assert p.requires_grad == is_lora, name
        assert (p.grad is not None) == is_lora, name
        if is_lora:
            assert p.grad.abs().sum() > 0, name
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    opt.step()
    after = dict(model.named_parameters())
    for name, value in before.items():
        wrapped = name if name in after else _wrapped_name(name)
        assert torch.equal(after[wrapped], value), name


def _wrapped_name(name: str) -> str:
    module, _, param = name.rpartition(".")
    return f"{module}.base_layer.{param}"


@pytest.mark.parametrize("mode", ["none", "lora_only", "all"])
def test_bias_modes(mode):
    model = tiny_model("qwen2", num_hidden_layers=1)  # Qwen2 has q/k/v biases
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj", "k_proj", "o_proj"], bias=mode))
    biases = [n for n, p in model.named_parameters() if n.endswith("bias") and p.requires_grad]
    expected = {"none": 0, "lora_only": 2, "all": 3}[mode]
    assert len(biases) == expected, biases


def test_modules_to_save_trains_a_copy_and_unload_restores(input_ids):
    model = tiny_model("llama")
    original_head = model.lm_head
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=("lm_head",)))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "lm_head.module.weight" in trainable and "lm_head.original_module.weight" not in trainable
    lorakit.unload(model)
    assert model.lm_head is original_head
    assert not any(isinstance(m, LoRALinear) for m in model.modules())


def test_count_parameters_reads_like_the_issue():
    model = nn.Sequential()
    model.add_module("proj", nn.Linear(4096, 4096, bias=False))
    lorakit.add_lora(model, lorakit.LoraConfig(r=8, target_modules=["proj"]))
    assert lorakit.count_parameters(model) == (65_536, 16_777_216)
    assert lorakit.format_trainable(model) == "trainable 65,536 of 16,777,216 (0.39%)"


def test_adding_twice_is_an_error():
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2))
    with pytest.raises(ValueError, match="already has LoRA"):
        lorakit.add_lora(model, lorakit.LoraConfig(r=2))
