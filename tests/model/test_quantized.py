"""save_quantized / reload (same bytes, no re-quantization), the chunked quantizer, quant-report."""

import argparse
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lorakit
from lorakit.model.quantized_checkpoint import QUANT_CONFIG_NAME, save_quantized
from lorakit.quant import linear4bit as linear4bit_mod
from lorakit.quant import nf4 as nf4_mod
from lorakit.quant.nf4 import quantize_weight
from lorakit.recipes import quant_report
from tiny_models import tiny_model


@pytest.mark.parametrize("rows,cols,blocksize,chunk", [(300, 128, 64, 1000), (97, 96, 64, 512), (64, 130, 128, 777),
                                                       (33, 64, 32, 64), (50, 200, 256, 3000)])
@pytest.mark.parametrize("quant_type,double_quant,dtype", [("nf4", True, torch.bfloat16), ("fp4", False, torch.float32)])
def test_chunked_quantizer_is_byte_exact(rows, cols, blocksize, chunk, quant_type, double_quant, dtype):
    torch.manual_seed(rows)
    w = torch.randn(rows, cols).to(dtype)
    w[3] = 0  # an all-zero row: blocks with absmax 0
    packed, state = quantize_weight(w, quant_type, blocksize, double_quant, chunk_weights=chunk)
    ref_packed, ref = lorakit.quantize_4bit(w, quant_type, blocksize, double_quant)
    assert packed.shape == (rows, cols // 2)
    assert torch.equal(packed.reshape(-1), ref_packed.reshape(-1))
    assert state.metadata() == ref.metadata()
    for key, value in ref.tensors().items():
        assert torch.equal(state.tensors()[key], value), key


def _quantized_model(arch, folder, quant_type="nf4", **kwargs):
    tiny_model(arch).save_pretrained(folder)
    return lorakit.load_model(str(folder), quantization=quant_type, compute_dtype="fp32", load_tokenizer=False,
                              **kwargs)[0]


def _no_quantizing(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("reloading a save_quantized folder must not quantize")

    for module in (nf4_mod, linear4bit_mod):  # every name a Linear4bit could quantize through
        monkeypatch.setattr(module, "quantize_4bit", refuse)
    monkeypatch.setattr(linear4bit_mod, "quantize_weight", refuse)


@pytest.mark.parametrize("arch", ["llama", "gemma2", "phi3", "gpt2"])
def test_save_and_reload_gives_identical_bytes(arch, tmp_path, input_ids, monkeypatch):
    model = _quantized_model(arch, tmp_path / "src")
    save_quantized(model, tmp_path / "q")
    info = json.loads((tmp_path / "q" / QUANT_CONFIG_NAME).read_text())
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, lorakit.Linear4bit))
    assert info == {"format": "lorakit-4bit", "version": 1, "quant_type": "nf4", "blocksize": 64,
                    "double_quant": True, "compute_dtype": "float32", "modules": layers}
    _no_quantizing(monkeypatch)
    reloaded, _ = lorakit.load_model(str(tmp_path / "q"), compute_dtype="fp32", load_tokenizer=False)
    before, after = model.state_dict(), reloaded.state_dict()
    assert before.keys() == after.keys()
    for key in before:
        assert before[key].dtype == after[key].dtype and torch.equal(before[key], after[key]), key
    assert sorted(n for n, m in reloaded.named_modules() if isinstance(m, lorakit.Linear4bit)) == layers
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)
    if model.config.tie_word_embeddings:
        assert reloaded.get_output_embeddings().weight is reloaded.get_input_embeddings().weight


def test_files_are_standard_safetensors(tmp_path):
    model = _quantized_model("qwen2", tmp_path / "src", "fp4", double_quant=False)
    save_quantized(model, tmp_path / "q")
    stored = load_file(tmp_path / "q" / "model.safetensors")  # the reference reader
    with safe_open(tmp_path / "q" / "model.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
    expected = dict(model.state_dict())  # qwen2 tiny: untied head, so every entry is stored
    assert stored.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(stored[key], value), key
    layer = model.get_submodule("model.layers.0.mlp.down_proj")
    assert stored["model.layers.0.mlp.down_proj.weight_packed"].shape == (64, 64)  # [out, in/2]
    assert torch.equal(stored["model.layers.0.mlp.down_proj.weight_packed"], layer.weight_packed)


def test_sharded_save_reloads(tmp_path, input_ids, monkeypatch):
    model = _quantized_model("llama", tmp_path / "src")
    save_quantized(model, tmp_path / "q", max_shard_size=40_000)
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (tmp_path / "q" / "model.safetensors").exists()
    _no_quantizing(monkeypatch)
    reloaded, _ = lorakit.load_model(str(tmp_path / "q"), compute_dtype="fp32", load_tokenizer=False)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, reloaded(input_ids).logits)


def test_reload_checks_and_errors(tmp_path):
    model = _quantized_model("llama", tmp_path / "src")
    save_quantized(model, tmp_path / "q")
    folder = str(tmp_path / "q")
    same, _ = lorakit.load_model(folder, quantization="nf4", compute_dtype="fp32", load_tokenizer=False)
    assert isinstance(same.get_submodule("model.layers.0.mlp.up_proj"), lorakit.Linear4bit)
    with pytest.raises(ValueError, match="already stored quantized as 'nf4'.*quantization=None"):
        lorakit.load_model(folder, quantization="fp4", compute_dtype="fp32")
    # bf16 compute: 4-bit bytes unchanged, dense weights cast
    bf16, _ = lorakit.load_model(folder, compute_dtype="bf16", load_tokenizer=False)
    layer = bf16.get_submodule("model.layers.0.mlp.up_proj")
    assert layer.compute_dtype == torch.bfloat16
    assert torch.equal(layer.weight_packed, model.get_submodule("model.layers.0.mlp.up_proj").weight_packed)
    assert bf16.get_input_embeddings().weight.dtype == torch.bfloat16

    tensors = load_file(tmp_path / "q" / "model.safetensors")
    del tensors["model.layers.1.self_attn.o_proj.weight_absmax"]
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.self_attn\.o_proj\.weight_absmax'"):
        lorakit.load_model(folder, compute_dtype="fp32", load_tokenizer=False)


def test_save_quantized_refuses_dense_and_adapted_models(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path / "src")
    dense, _ = lorakit.load_model(str(tmp_path / "src"), compute_dtype="fp32", load_tokenizer=False)
    with pytest.raises(ValueError, match="no Linear4bit"):
        save_quantized(dense, tmp_path / "q")
    model, _ = lorakit.load_model(str(tmp_path / "src"), quantization="nf4", compute_dtype="fp32", load_tokenizer=False)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, target_modules="all-linear"))
    with pytest.raises(ValueError, match="adapters"):
        save_quantized(model, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def _report_args(folder, *extra):
    parser = quant_report.add_arguments(argparse.ArgumentParser())
    return parser.parse_args(["--model", str(folder), *extra])


def tiny_tokenizer():
    """A word-level tokenizer over the tiny models' 160 ids, built locally (as in test_load.py)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(157)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def _stored_bits(model, double_quant):
    """Bits per weight of the bytes quantize_4bit stores for the model's projection layers."""
    stored = numel = 0
    for name, p in model.named_parameters():
        if "proj" in name:
            packed, state = lorakit.quantize_4bit(p, double_quant=double_quant)
            stored, numel = stored + packed.numel() + state.nbytes(), numel + p.numel()
    return 8 * stored / numel


def test_quant_report_cli(tmp_path, capsys):
    original = tiny_model("llama")
    original.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    text = tmp_path / "sample.txt"
    text.write_text(" ".join(f"w{(7 * i) % 150}" for i in range(40)))
    assert quant_report.main(_report_args(tmp_path, "--methods", "nf4,int4", "--text", str(text), "--json")) == 0
    report = json.loads(capsys.readouterr().out)
    assert list(report["methods"]) == ["nf4", "int4"] and report["tokens"] == 40
    n_weights = sum(p.numel() for n, p in original.named_parameters() if "proj" in n)
    assert report["quantized_weights"] == n_weights
    for r in report["methods"].values():
        assert len(r["layers"]) == 14 and r["kl"] > 0 and 0 < r["total"]["rel_error"] < 0.2
        assert r["mb"] == pytest.approx(n_weights * r["total"]["bits_per_weight"] / 8 / 2**20)
    assert report["mb_16bit"] == pytest.approx(n_weights * 2 / 2**20)
    # tiny layers: the code tables and metadata add ~1.8 bits to DESIGN.md's 4.127
    assert report["methods"]["nf4"]["total"]["bits_per_weight"] == pytest.approx(_stored_bits(original, True))

    assert quant_report.main(_report_args(tmp_path, "--methods", "nf4", "--no-double-quant", "--no-per-layer")) == 0
    out = capsys.readouterr().out
    assert "base perplexity" in out and "nf4:" in out and "bits/weight" in out and "layer (rel_err)" not in out
    assert f"{_stored_bits(original, False):.3f} bits/weight" in out

    assert quant_report.main(_report_args(tmp_path, "--methods", "nf4,int8")) == 2
    assert "allowed values are nf4, fp4, int4" in capsys.readouterr().err


def test_quant_report_needs_a_tokenizer(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path)
    assert quant_report.main(_report_args(tmp_path)) == 2
    assert "no tokenizer" in capsys.readouterr().err
