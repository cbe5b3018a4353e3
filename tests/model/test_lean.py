"""model/lean.py: the lean gated MLP and RMSNorm keep fewer tensors for backward and change no
forward value (the MLP no gradient either)."""

import pytest
import torch

import lorakit
from lorakit.config import LoraConfig
from lorakit.data import collate
from lorakit.model.lean import LeanGatedMLP, LeanRMSNorm, install_lean, remove_lean
from lorakit.train.step import TrainStep

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
    loss, _ = TrainStep(model)(batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def _live_bytes_after_forward(model, batch) -> int:
    """Bytes allocated and still held after the forward pass (what autograd keeps for backward)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        loss, _ = TrainStep(model)(batch)
    held = sum(e.self_cpu_memory_usage for e in prof.key_averages())
    loss.backward()
    return held


@pytest.mark.parametrize("arch", GATED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_mlp_gives_the_same_loss_and_gradients_bit_for_bit(arch, dtype):
    batch = collate(make_examples(3, seed=1), 0)
    plain = _adapted(arch, dtype)
    lean = _adapted(arch, dtype)
    assert install_lean(lean, norms=False) == {"mlp": plain.config.num_hidden_layers, "norm": 0}
    (l1, g1), (l2, g2) = _loss_and_grads(plain, batch), _loss_and_grads(lean, batch)
    assert torch.equal(l1, l2)
    assert g1.keys() == g2.keys()
    for name in g1:
        assert torch.equal(g1[name], g2[name]), name


@pytest.mark.parametrize("arch", ["qwen2", "phi3"])
def test_lean_mlp_keeps_two_fewer_intermediate_tensors_per_layer(arch):
    batch = collate(make_examples(2, seed=3, min_len=12, max_len=12), 0)  # [2, 12]
    plain, lean = _adapted(arch, torch.float32), _adapted(arch, torch.float32)
    install_lean(lean, norms=False)
    cfg = plain.config
    saved = 2 * cfg.num_hidden_layers * batch["input_ids"].numel() * cfg.intermediate_size * 4  # act(g), p
    diff = _live_bytes_after_forward(plain, batch) - _live_bytes_after_forward(lean, batch)
    assert diff == saved, (diff, saved)


def test_lean_mlp_under_checkpointing_matches_and_unknown_forms_are_left_alone(monkeypatch):
    from lorakit.model import lean as lean_mod
    from lorakit.train.setup import enable_gradient_checkpointing

    batch = collate(make_examples(3, seed=1), 0)
    plain, lean = _adapted("llama", torch.float32), _adapted("llama", torch.float32)
    for m in (plain, lean):
        enable_gradient_checkpointing(m)
    install_lean(lean, norms=False)  # under checkpointing: the down projection's input is not rebuilt
    assert all(not m.rebuild for m in lean.modules() if isinstance(m, LeanGatedMLP))
    (l1, g1), (l2, g2) = _loss_and_grads(plain, batch), _loss_and_grads(lean, batch)
    assert torch.equal(l1, l2)
    assert all(torch.equal(g1[n], g2[n]) for n in g1)
    # a class whose forward no longer reads as expected keeps its own forward
    args, body = lean_mod.FORMS["gate_up"]
    monkeypatch.setitem(lean_mod.FORMS, "gate_up", (args, body.replace("self.up_proj(x)", "self.up_proj(x) + 1")))
    lean_mod._form_of_function.cache_clear()
    assert install_lean(_adapted("qwen2", torch.float32), norms=False) == {"mlp": 0, "norm": 0}
    monkeypatch.undo()
    lean_mod._form_of_function.cache_clear()
    assert install_lean(tiny_model("gpt2")) == {"mlp": 0, "norm": 0}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "phi3"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_norms_same_loss_and_gradients_to_rounding(arch, dtype):
    batch = collate(make_examples(3, seed=1), 0)
    plain, lean = _adapted(arch, dtype), _adapted(arch, dtype)
    layers = plain.config.num_hidden_layers
    assert install_lean(lean, mlp=False) == {"mlp": 0, "norm": 2 * layers + 1}  # two per layer + the final norm
    (l1, g1), (l2, g2) = _loss_and_grads(plain, batch), _loss_and_grads(lean, batch)
    assert torch.equal(l1, l2)  # the forward pass is the same, op for op
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    for name in g1:
        err = (g1[name].float() - g2[name].float()).abs().max() / g1[name].float().abs().max()
        assert err < tol, (name, float(err))


def test_lean_norm_weight_gradient_when_it_trains():
    torch.manual_seed(0)
    norm = tiny_model("qwen2").model.norm
    x = torch.randn(3, 5, norm.weight.shape[0], dtype=torch.float64).float().requires_grad_()
    norm.weight.data.uniform_(0.5, 1.5)
    norm.weight.requires_grad_(True)
    y = torch.randn(3, 5, norm.weight.shape[0])
    ref = (norm(x) * y).sum()
    gx, gw = torch.autograd.grad(ref, (x, norm.weight))
    holder = torch.nn.ModuleDict({"norm": norm})
    install_lean(holder)
    assert isinstance(holder["norm"], LeanRMSNorm) and holder["norm"].weight is norm.weight
    out = (holder["norm"](x) * y).sum()
    lx, lw = torch.autograd.grad(out, (x, norm.weight))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(lw, gw, rtol=1e-5, atol=1e-6)


def test_lean_norms_keep_the_bf16_input_instead_of_an_fp32_copy():
    batch = collate(make_examples(2, seed=3, min_len=12, max_len=12), 0)  # [2, 12]
    plain, lean = _adapted("qwen2", torch.bfloat16), _adapted("qwen2", torch.bfloat16)
    install_lean(lean, mlp=False)
    cfg = plain.config
    # every norm whose input needs a gradient (not layer 0's first: it reads the frozen embeddings)
    norms = 2 * cfg.num_hidden_layers - 1 + 1
    saved = norms * batch["input_ids"].numel() * cfg.hidden_size * (4 - 2)
    diff = _live_bytes_after_forward(plain, batch) - _live_bytes_after_forward(lean, batch)
    assert diff == saved, (diff, saved)


def test_lean_modules_are_swapped_in_visibly_and_swapped_back_by_merge_and_unload():
    plain = tiny_model("llama")
    keys = list(plain.state_dict())
    model = tiny_model("llama")
    counts = install_lean(model)
    assert counts == {"mlp": 2, "norm": 5}
    assert list(model.state_dict()) == keys  # the same names: checkpoints, LoRA targets and PEFT keys unchanged
    assert "LeanGatedMLP" in repr(model) and "LeanRMSNorm" in repr(model)
    lorakit.add_lora(model, LoraConfig(r=4, alpha=8))
    assert isinstance(model.model.layers[0].mlp, LeanGatedMLP)
    assert isinstance(model.model.layers[0].mlp.gate_proj, lorakit.LoRALinear)
    merged = lorakit.merge(model)
    assert type(merged.model.layers[0].mlp).__name__ == "LlamaMLP"  # the model's own class again
    assert type(merged.model.norm).__name__ == "LlamaRMSNorm"
    assert not any(isinstance(m, (LeanGatedMLP, LeanRMSNorm)) for m in merged.modules())
    assert list(merged.state_dict()) == keys
    other = tiny_model("llama")
    install_lean(other)
    lorakit.add_lora(other, LoraConfig(r=4))
    lorakit.unload(other)
    assert not any(isinstance(m, (LeanGatedMLP, LeanRMSNorm, lorakit.LoRALinear)) for m in other.modules())
    assert remove_lean(other) == 0


def test_a_forward_installed_by_someone_else_is_kept():
    model = tiny_model("llama")
    mlp = model.model.layers[0].mlp
    mlp.forward = lambda x: x  # e.g. accelerate's hooks, Liger, `kernels` replaced it on the instance
    counts = install_lean(model)
    assert counts["mlp"] == 1 and model.model.layers[0].mlp is mlp
