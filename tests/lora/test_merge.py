"""Merging: W + scaling * B @ A in fp32 gives the unmerged logits and a plain transformers model."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.lora.inject import lora_layers
from lorakit.lora.layer import LoRALinear

from tiny_models import tiny_model


def _adapted(arch, **kw):
    model = lorakit.add_lora(tiny_model(arch), lorakit.LoraConfig(r=4, alpha=8, **kw))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    return model


def test_merged_equals_unmerged_and_reloads_in_plain_transformers(arch, input_ids, tmp_path):
    model = _adapted(arch)
    with torch.no_grad():
        unmerged = model(input_ids).logits
    merged = lorakit.merge(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert not any(type(m).__module__.startswith("lorakit") for m in merged.modules())
    with torch.no_grad():
        merged_logits = merged(input_ids).logits
    assert (merged_logits - unmerged).abs().max() <= 1e-4
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids).logits, merged_logits)


def test_merge_twice_is_a_noop(input_ids):
    merged = lorakit.merge(_adapted("llama"))
    state = {k: v.clone() for k, v in merged.state_dict().items()}
    again = lorakit.merge(merged)
    assert again is merged
    assert all(torch.equal(state[k], v) for k, v in again.state_dict().items())


def test_merge_in_place_and_unmerge_restore_base_exactly(input_ids):
    model = _adapted("llama")
    base_weights = {n: l.base_layer.weight.clone() for n, l in lora_layers(model)}
    with torch.no_grad():
        unmerged = model(input_ids).logits
        for _, layer in lora_layers(model):
            layer.merge_()
        merged = model(input_ids).logits
        for _, layer in lora_layers(model):
            layer.unmerge_()
        again = model(input_ids).logits
    assert (merged - unmerged).abs().max() <= 1e-4
    assert torch.equal(again, unmerged)
    assert all(torch.equal(l.base_layer.weight, base_weights[n]) for n, l in lora_layers(model))


def test_merge_keeps_16bit_dtype(input_ids):
    model = lorakit.add_lora(tiny_model("llama", dtype=torch.bfloat16), lorakit.LoraConfig(r=4))
    merged = lorakit.merge(model)
    assert {p.dtype for p in merged.parameters()} == {torch.bfloat16}


def test_merge_with_modules_to_save_keeps_the_trained_copy(input_ids):
    model = _adapted("llama", target_modules=["q_proj"], modules_to_save=("lm_head",))
    with torch.no_grad():
        model.lm_head.module.weight.add_(0.5)
        want = model(input_ids).logits
    merged = lorakit.merge(model)
    assert isinstance(merged.lm_head, torch.nn.Linear)
    with torch.no_grad():
        assert (merged(input_ids).logits - want).abs().max() <= 1e-4


def test_merge_verify_reports_and_passes(input_ids):
    merged = lorakit.merge(_adapted("llama"), verify=input_ids)
    report = merged.lorakit_merge_report
    assert report.max_logit_diff <= 1e-4 and report.kl_divergence < 1e-6 and report.top1_agreement == 1.0


def test_merge_verify_fails_above_threshold(input_ids):
    model = _adapted("llama")
    with pytest.raises(lorakit.MergeVerificationError, match="KL"):
        lorakit.merge(model, verify=input_ids, max_kl=-1.0)
