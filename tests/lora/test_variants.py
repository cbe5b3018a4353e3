"""DoRA, the inits and embedding LoRA on their own: the math, merging, conversion and tied heads."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.lora.dora import row_norm_lowrank, row_norm_reference
from lorakit.lora.embedding import LoRAEmbedding
from lorakit.lora.init import ResidualInit, residual_factors, residual_of
from lorakit.lora.inject import adapter_layers
from lorakit.lora.layer import LoRALinear
from lorakit.lora.merge import merged_weight

from tiny_models import tiny_model


def perturb(model, seed=5):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name:
                p.add_(torch.randn(p.shape, generator=g) * (0.05 if "magnitude" in name else 0.1))


# ---------------------------------------------------------------- DoRA


def test_lowrank_norm_equals_the_dense_reference():
    g = torch.Generator().manual_seed(0)
    w, a, b = torch.randn(48, 80, generator=g), torch.randn(6, 80, generator=g), torch.randn(48, 6, generator=g)
    ref = row_norm_reference(w, a, b, 1.7)
    fast = row_norm_lowrank(w.pow(2).sum(1), w @ a.t(), a, b, 1.7)
    assert torch.allclose(fast, ref, rtol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dora_layer_is_its_definition(dropout):
    """y = m * (W x + s B A x) / ||W + s B A||_row + bias; in training with dropout PEFT's form."""
    torch.manual_seed(0)
    base = torch.nn.Linear(32, 24)
    layer = LoRALinear(base, r=4, alpha=8, dropout=dropout, use_dora=True)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(1.1)
    x = torch.randn(5, 32)
    w_adapted = base.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight
    scale = layer.lora_magnitude_vector / torch.linalg.vector_norm(w_adapted, dim=1)
    layer.eval()
    assert torch.allclose(layer(x), (x @ w_adapted.t()) * scale + base.bias, atol=1e-6)
    layer.train()
    torch.manual_seed(1)
    y = layer(x)
    torch.manual_seed(1)
    xd = torch.nn.functional.dropout(x, dropout, training=True) if dropout else x
    want = base(x) + (scale - 1) * (xd @ base.weight.t()) + scale * layer.scaling * (xd @ (layer.lora_B.weight @ layer.lora_A.weight).t())
    assert torch.allclose(y, want, atol=1e-6)


def test_dora_norm_gets_no_gradient_and_magnitude_does():
    layer = LoRALinear(torch.nn.Linear(16, 8), r=2, alpha=4, use_dora=True)
    torch.nn.init.normal_(layer.lora_B.weight, std=0.1)
    layer(torch.randn(3, 16)).sum().backward()
    assert layer.lora_magnitude_vector.grad is not None and layer.lora_magnitude_vector.grad.abs().sum() > 0
    # the norm is a constant: B's gradient is that of m/n * (W x + s B A x) with n held fixed
    x = torch.randn(3, 16)
    layer.zero_grad()
    layer(x).sum().backward()
    with torch.no_grad():
        n = layer.dora_norm()
    b = layer.lora_B.weight.detach().clone().requires_grad_(True)
    w = layer.base_layer.weight
    y = (x @ w.t() + layer.scaling * x @ (b @ layer.lora_A.weight).t()) * (layer.lora_magnitude_vector / n) + layer.base_layer.bias
    y.sum().backward()
    assert torch.allclose(layer.lora_B.weight.grad, b.grad, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
@pytest.mark.parametrize("variant", [dict(use_dora=True), dict(use_dora=True, init="pissa"), dict(init="olora")])
def test_merge_is_exact(arch, variant, input_ids):
    emb = "wte" if arch == "gpt2" else "embed_tokens"
    targets = ("c_attn", "c_fc", emb) if arch == "gpt2" else ("q_proj", "v_proj", "down_proj", emb)
    model = lorakit.add_lora(tiny_model(arch), lorakit.LoraConfig(r=4, alpha=8, target_modules=targets, **variant))
    perturb(model)
    with torch.no_grad():
        want = model(input_ids).logits
    merged = lorakit.merge(model, verify=input_ids)
    assert not any(type(m).__module__.startswith("lorakit") for m in merged.modules())
    with torch.no_grad():
        assert (merged(input_ids).logits - want).abs().max() <= 1e-5
    assert merged.lorakit_merge_report.top1_agreement == 1.0


def test_merged_weight_is_one_function_of_plain_tensors():
    g = torch.Generator().manual_seed(1)
    w, a, b, m = torch.randn(8, 12, generator=g), torch.randn(2, 12, generator=g), torch.randn(8, 2, generator=g), torch.rand(8, generator=g)
    assert torch.allclose(merged_weight(w, a, b, 0.5), w + 0.5 * b @ a)
    d = w + 0.5 * b @ a
    assert torch.allclose(merged_weight(w, a, b, 0.5, m), d * (m / d.norm(dim=1))[:, None])


# ---------------------------------------------------------------- initialisations


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_6", "olora"])
def test_residual_plus_update_is_the_original_weight(init):
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    a, b = residual_factors(w, 4, 2.0, init, "layer")
    assert a.shape == (4, 24) and b.shape == (40, 4)
    assert torch.allclose(residual_of(w, a, b, 2.0) + 2.0 * b @ a, w, atol=1e-5)


def test_pissa_takes_the_principal_part():
    w = torch.randn(40, 24, generator=torch.Generator().manual_seed(2))
    a, b = residual_factors(w, 4, 1.0, "pissa")
    s = torch.linalg.svdvals(w)
    assert torch.allclose(torch.linalg.svdvals(b @ a)[:4], s[:4], rtol=1e-5)
    assert torch.allclose(torch.linalg.svdvals(residual_of(w, a, b, 1.0))[:20], s[4:], rtol=1e-4)


def test_pissa_niter_is_seeded_by_layer_and_leaves_the_rng_alone():
    w = torch.randn(64, 48, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(7)
    state = torch.get_rng_state()
    a1, _ = residual_factors(w, 4, 1.0, "pissa_niter_2", "model.layers.0.q_proj")
    assert torch.equal(torch.get_rng_state(), state)
    a2, _ = residual_factors(w, 4, 1.0, "pissa_niter_2", "model.layers.0.q_proj")
    a3, _ = residual_factors(w, 4, 1.0, "pissa_niter_2", "model.layers.1.q_proj")
    assert torch.equal(a1, a2) and not torch.equal(a1, a3)


def test_residual_init_model_starts_equal_to_its_base(input_ids):
    base = tiny_model("llama")
    with torch.no_grad():
        want = base(input_ids).logits
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=4, init="pissa", use_dora=True))
    with torch.no_grad():
        assert (model(input_ids).logits - want).abs().max() <= 1e-5


def test_gaussian_init_std_and_zero_b():
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=16, init="gaussian", target_modules=("q_proj",)))
    layer = model.model.layers[0].self_attn.q_proj
    assert torch.equal(layer.lora_B.weight, torch.zeros_like(layer.lora_B.weight))
    assert abs(layer.lora_A.weight.std().item() - 1 / 16) < 0.01


def test_pissa_on_a_tied_head_is_refused():
    with pytest.raises(ValueError, match="tied"):
        lorakit.add_lora(tiny_model("gpt2"), lorakit.LoraConfig(r=2, init="pissa", target_modules=("lm_head",)))


def test_bad_init_names_the_field():
    with pytest.raises(ValueError, match=r"lora.init='svd'.*pissa_niter_N"):
        lorakit.LoraConfig(init="svd")
    with pytest.raises(ValueError, match="lora.init"):
        lorakit.LoraConfig(init="pissa_niter_0")


# ---------------------------------------------------------------- conversion to plain LoRA


@pytest.mark.parametrize("variant", [dict(init="pissa"), dict(init="olora", use_rslora=True),
                                     dict(init="pissa", use_dora=True)])
def test_converted_adapter_is_a_plain_lora_of_the_original_base(variant, input_ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(
        r=4, alpha=8, target_modules=("q_proj", "down_proj", "embed_tokens"), **variant))
    perturb(model)
    with torch.no_grad():
        want = model(input_ids).logits
    lorakit.save_adapter(model, tmp_path / "a")
    primary = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    converted = json.loads((tmp_path / "a" / "as_lora" / "adapter_config.json").read_text())
    assert primary["init_lora_weights"] == variant["init"] and primary["r"] == 4
    assert converted["init_lora_weights"] is True and converted["r"] == 8
    tensors = load_file(str(tmp_path / "a" / "as_lora" / "adapter_model.safetensors"))
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (8, 64)
    # both load on the original base, in PEFT and in lorakit, and compute what the trained model does
    for loaded in (peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "a" / "as_lora")),
                   lorakit.load_adapter(tiny_model("llama"), tmp_path / "a" / "as_lora"),
                   lorakit.load_adapter(tiny_model("llama"), tmp_path / "a")):
        with torch.no_grad():
            assert (loaded(input_ids).logits - want).abs().max() <= 1e-5


def test_save_converted_false_writes_only_the_adapter(tmp_path):
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2, init="olora", save_converted=False))
    lorakit.save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a" / "as_lora").exists()


# ---------------------------------------------------------------- embeddings


@pytest.mark.parametrize("arch", ["gpt2", "gemma2"])  # both tie lm_head to the input embedding
def test_tied_head_keeps_the_original_table_and_merge_unties_it(arch, input_ids, tmp_path):
    emb_name = "wte" if arch == "gpt2" else "embed_tokens"
    model = lorakit.add_lora(tiny_model(arch), lorakit.LoraConfig(r=4, target_modules=(emb_name,)))
    emb = model.get_input_embeddings()
    assert isinstance(emb, LoRAEmbedding) and model.lm_head.weight is emb.base_layer.weight
    original = emb.base_layer.weight.detach().clone()
    perturb(model)
    with torch.no_grad():
        want = model(input_ids).logits
    merged = lorakit.merge(model)
    assert torch.equal(merged.lm_head.weight, original)                     # the head reads the original table
    assert not torch.equal(merged.get_input_embeddings().weight, original)  # the embedding holds W + delta
    assert merged.config.tie_word_embeddings is False
    with torch.no_grad():
        assert (merged(input_ids).logits - want).abs().max() <= 1e-5
    merged.save_pretrained(tmp_path / "m")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        assert (reloaded(input_ids).logits - want).abs().max() <= 1e-5


def test_embedding_update_gets_the_embed_scale(input_ids):
    """Gemma scales its embedding output by sqrt(hidden); the update is scaled the same way. (The
    scale sits in the embedding module in newer transformers; 5.1 multiplies in the model's forward,
    after the layer, which scales base and update alike: then the layer itself applies none.)"""
    model = lorakit.add_lora(tiny_model("gemma2"), lorakit.LoraConfig(r=4, target_modules=("embed_tokens",)))
    layer = model.get_input_embeddings()
    perturb(model)
    with torch.no_grad():
        got = layer(input_ids)
        table = layer.base_layer.weight + layer.delta_weight()
        want = torch.nn.functional.embedding(input_ids, table) * getattr(layer.base_layer, "embed_scale", 1.0)
    assert torch.allclose(got, want, atol=1e-5)


def test_unload_restores_the_base_modules():
    model = tiny_model("llama")
    emb = model.get_input_embeddings()
    lorakit.add_lora(model, lorakit.LoraConfig(r=2, target_modules=("embed_tokens", "q_proj"), use_dora=True))
    assert len(list(adapter_layers(model))) == 3
    lorakit.unload(model)
    assert model.get_input_embeddings() is emb and not list(adapter_layers(model))


def test_count_parameters_excludes_adapter_tensors_from_the_total():
    base_total = sum(p.numel() for p in tiny_model("llama").parameters())
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2, target_modules=("embed_tokens", "q_proj"),
                                                                     use_dora=True))
    trainable, total = lorakit.count_parameters(model)
    assert total == base_total
    assert trainable == 2 * (160 + 64) + 64 + 2 * (2 * (64 + 64) + 64)  # embedding A, B, m; two q_proj A, B, m


def test_residual_init_object_selects_linear_targets_only():
    init = ResidualInit(lorakit.LoraConfig(r=2, init="pissa", target_modules=("embed_tokens", "q_proj")))
    assert init.select(tiny_model("llama")) == {"model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"}


def test_dora_in_bf16_sees_small_magnitude_changes():
    """m/n ~ 1 rounds to steps of 2^-7 in bf16; the layer applies m/n - 1, so a 0.3% change of m
    moves the output by ~0.3% (a bf16 m/n would stay exactly 1.0 and not move it at all)."""
    torch.manual_seed(0)
    layer = LoRALinear(torch.nn.Linear(64, 32, bias=False).bfloat16(), r=4, alpha=8, use_dora=True)
    x = torch.randn(8, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        y0 = layer(x).float()
        layer.lora_magnitude_vector.mul_(1.003)
        y1 = layer(x).float()
    assert torch.tensor(1.003, dtype=torch.bfloat16).item() == 1.0
    ratio = (y1.norm() / y0.norm()).item()
    assert 1.002 < ratio < 1.004, ratio
