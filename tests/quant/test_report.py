"""Quantization report: storage cost from stored bytes, NF4 vs FP4 vs int4 error, model report."""

import math

import pytest
import torch

from lorakit.quant.report import format_report, model_report, quantize_int4, weight_error


def test_bits_per_weight_from_stored_bytes():
    torch.manual_seed(0)
    w = torch.randn(4096, 4096)
    plain = weight_error(w, "nf4", blocksize=64, double_quant=False)["bits_per_weight"]
    nested = weight_error(w, "nf4", blocksize=64, double_quant=True)["bits_per_weight"]
    # DESIGN.md: 4 + 32/64 = 4.5 bits; with double quant 4 + 8/64 + 32/(64*256) = 4.127
    assert abs(plain - 4.5) < 0.001
    assert abs(nested - 4.127) < 0.002
    assert nested < plain


def test_nf4_beats_fp4_and_int4_on_gaussian_weights():
    torch.manual_seed(1)
    w = torch.randn(512, 1024) * 0.02
    errors = {m: weight_error(w, m, blocksize=64, double_quant=True) for m in ("nf4", "fp4", "int4")}
    assert errors["nf4"]["mse"] < errors["fp4"]["mse"]
    assert errors["nf4"]["mse"] < errors["int4"]["mse"]
    for e in errors.values():
        assert 0 < e["rel_error"] < 0.2
        assert abs(e["bits_per_weight"] - errors["nf4"]["bits_per_weight"]) < 1e-3  # same storage (metadata differs by a byte)


def test_int4_reference():
    x = torch.tensor([-1.0, -0.5, 0.0, 0.25, 1.0, 0.07])  # one block, absmax 1
    packed, state = quantize_int4(x, blocksize=64)
    from lorakit.quant import dequantize_4bit

    expected = torch.round(x * 7) / 7
    assert torch.allclose(dequantize_4bit(packed, state), expected, atol=1e-7)
    with pytest.raises(ValueError, match="method must be one of"):
        weight_error(x, "int8")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


def test_model_report_tiny_llama():
    model = _tiny_llama()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits.clone()
    report = model_report(model, ids, methods=["nf4", "int4"])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # the original model is untouched

    linear_names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert "lm_head" in linear_names
    for method in ("nf4", "int4"):
        r = report["methods"][method]
        assert set(r["layers"]) == linear_names - {"lm_head"}
        assert r["kl"] > 0 and math.isfinite(r["ppl"])
        assert r["ppl_delta"] == pytest.approx(r["ppl"] - report["base_ppl"])
        w = model.get_submodule("model.layers.0.mlp.down_proj").weight
        assert r["layers"]["model.layers.0.mlp.down_proj"] == weight_error(w, method)
        assert min(s["rel_error"] for s in r["layers"].values()) <= r["total"]["rel_error"]
        assert r["total"]["rel_error"] <= max(s["rel_error"] for s in r["layers"].values())
    text = format_report(report)
    assert "nf4" in text and "int4" in text and "model.layers.1.self_attn.q_proj" in text
