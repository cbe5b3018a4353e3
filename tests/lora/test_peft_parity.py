"""Adapters travel both ways between lorakit and PEFT with identical logits."""

import json

import pytest
import torch
from safetensors.torch import load_file

import lorakit
from lorakit.lora.inject import lora_layers

from tiny_models import tiny_model

peft = pytest.importorskip("peft")


def _randomize_lora(model, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"], "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]}


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_loads_our_adapter(arch, input_ids, tmp_path, rslora):
    model = lorakit.add_lora(tiny_model(arch), lorakit.LoraConfig(
        r=4, alpha=16, use_rslora=rslora, target_modules=tuple(TARGETS.get(arch, ["q_proj", "v_proj", "down_proj"]))))
    _randomize_lora(model)
    with torch.no_grad():
        ours = model(input_ids).logits
    lorakit.save_adapter(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).keys()
    assert all(k.startswith("base_model.model.") and k.endswith((".lora_A.weight", ".lora_B.weight")) for k in keys)
    theirs_model = peft.PeftModel.from_pretrained(tiny_model(arch), str(tmp_path / "adapter"))
    with torch.no_grad():
        theirs = theirs_model(input_ids).logits
    assert (ours - theirs).abs().max() <= 1e-5


def test_we_load_peft_adapter_all_linear_with_bias_and_modules_to_save(arch, input_ids, tmp_path):
    extra = {"modules_to_save": ["lm_head"], "bias": "lora_only"} if arch in ("llama", "qwen2") else {}
    cfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM", **extra)
    pm = peft.get_peft_model(tiny_model(arch), cfg)
    _randomize_lora(pm)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "modules_to_save" in name or (extra and name.endswith("bias") and p.requires_grad):
                p.add_(0.1)
        theirs = pm(input_ids).logits
    pm.save_pretrained(str(tmp_path / "peft"))
    model = lorakit.load_adapter(tiny_model(arch), tmp_path / "peft")
    assert len(list(lora_layers(model))) > 0
    with torch.no_grad():
        ours = model(input_ids).logits
    assert (ours - theirs).abs().max() <= 1e-5
    # and our save of what we loaded is what PEFT wrote
    lorakit.save_adapter(model, tmp_path / "again")
    a = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_config_field_warns_not_crashes(tmp_path, input_ids):
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "some_future_field": 1}))
    with pytest.warns(UserWarning, match="some_future_field"):
        lorakit.load_adapter(tiny_model("llama"), tmp_path / "a")


def test_unsupported_feature_is_an_error(tmp_path):
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    path = tmp_path / "a" / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "lora_bias": True}))
    with pytest.raises(ValueError, match="lora_bias"):
        lorakit.load_adapter(tiny_model("llama"), tmp_path / "a")


def test_wrong_base_shape_names_the_module(tmp_path):
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    other = tiny_model("llama", hidden_size=32, intermediate_size=64)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.lora_A\.weight.*shape"):
        lorakit.load_adapter(other, tmp_path / "a")


def test_wrong_base_missing_module_names_it(tmp_path):
    model = lorakit.add_lora(tiny_model("llama"), lorakit.LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path / "a")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj.*right base model"):
        lorakit.load_adapter(tiny_model("gpt2"), tmp_path / "a")


def test_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lorakit.load_adapter(tiny_model("llama"), tmp_path / "nope")
