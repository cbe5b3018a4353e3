"""load_model: streamed safetensors loading, 4-bit quantization on the fly, errors, tokenizer, ties."""

import copy
import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakit
from lorakit.lora.layer import is_conv1d
from lorakit.quant.nf4 import dequantize_4bit
from tiny_models import TINY, tiny_model

LOAD_ARCHS = ["llama", "qwen2", "gemma2", "phi3", "gpt2"]


def _save(arch, folder, **kwargs):
    model = tiny_model(arch)
    model.save_pretrained(folder, **kwargs)
    return model


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _weight_out_in(module):
    """The original layer's weight as [out, in] (GPT-2 Conv1D stores it transposed)."""
    return module.weight.detach().t() if is_conv1d(module) else module.weight.detach()


def _linear_names(model):
    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)}


@pytest.mark.parametrize("arch", LOAD_ARCHS)
def test_fp32_load_gives_identical_logits(arch, tmp_path, input_ids):
    original = _save(arch, tmp_path)
    model, tokenizer = lorakit.load_model(str(tmp_path), compute_dtype="fp32")
    assert tokenizer is None  # no tokenizer files saved
    assert torch.equal(_logits(model, input_ids), _logits(original, input_ids))
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("arch", LOAD_ARCHS)
def test_nf4_load_quantizes_every_target_exactly(arch, tmp_path, input_ids):
    original = _save(arch, tmp_path)
    model, _ = lorakit.load_model(str(tmp_path), quantization="nf4", compute_dtype="fp32", load_tokenizer=False)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, lorakit.Linear4bit)}
    head = "lm_head"
    assert set(quantized) == _linear_names(original) - {head}
    assert not isinstance(model.get_submodule(head), lorakit.Linear4bit)

    reference = copy.deepcopy(original)  # the original model with each target's dequantized weight
    for name, layer in quantized.items():
        source = original.get_submodule(name)
        packed, state = lorakit.quantize_4bit(_weight_out_in(source))
        assert torch.equal(layer.weight_packed.reshape(-1), packed.reshape(-1)), name
        assert torch.equal(layer.quant_state.absmax, state.absmax) and torch.equal(layer.quant_state.absmax2, state.absmax2)
        assert layer.quant_state.offset.item() == state.offset.item()
        if source.bias is not None:
            assert torch.equal(layer.bias, source.bias)
        dense = dequantize_4bit(packed, state, dtype=torch.float32)  # [out, in]
        with torch.no_grad():
            reference.get_submodule(name).weight.copy_(dense.t() if is_conv1d(source) else dense)
    torch.testing.assert_close(_logits(model, input_ids), _logits(reference, input_ids), atol=2e-5, rtol=1e-5)
    assert (_logits(model, input_ids) - _logits(original, input_ids)).abs().max() > 1e-4  # 4-bit is not exact


def test_skip_modules_stay_dense(tmp_path, input_ids):
    original = _save("llama", tmp_path)
    model, _ = lorakit.load_model(str(tmp_path), quantization="nf4", compute_dtype="fp32",
                                  skip_modules=("lm_head", "down_proj"), load_tokenizer=False)
    for name in _linear_names(original):
        layer = model.get_submodule(name)
        if name.endswith(("down_proj", "lm_head")):
            assert type(layer) is nn.Linear and torch.equal(layer.weight, original.get_submodule(name).weight), name
        else:
            assert isinstance(layer, lorakit.Linear4bit), name


def test_fp4_and_no_double_quant_and_blocksize(tmp_path):
    original = _save("qwen2", tmp_path)
    model, _ = lorakit.load_model(str(tmp_path), quantization="fp4", double_quant=False, blocksize=128,
                                  compute_dtype="fp32", load_tokenizer=False)
    name = "model.layers.1.mlp.up_proj"
    layer = model.get_submodule(name)
    packed, state = lorakit.quantize_4bit(original.get_submodule(name).weight, "fp4", 128, False)
    assert torch.equal(layer.weight_packed.reshape(-1), packed.reshape(-1))
    assert torch.equal(layer.quant_state.absmax, state.absmax) and not layer.quant_state.nested


def test_sharded_checkpoint_loads(tmp_path, input_ids):
    original = _save("llama", tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    model, _ = lorakit.load_model(str(tmp_path), compute_dtype="fp32", load_tokenizer=False)
    assert torch.equal(_logits(model, input_ids), _logits(original, input_ids))
    qmodel, _ = lorakit.load_model(str(tmp_path), quantization="nf4", compute_dtype="fp32", load_tokenizer=False)
    assert sum(isinstance(m, lorakit.Linear4bit) for m in qmodel.modules()) == 14


def test_missing_tensor_is_named(tmp_path):
    _save("llama", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.gate_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        lorakit.load_model(str(tmp_path), compute_dtype="fp32", load_tokenizer=False)
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.gate_proj\.weight"):
        lorakit.load_model(str(tmp_path), quantization="nf4", compute_dtype="fp32", load_tokenizer=False)


def test_wrong_architecture_names_the_tensor(tmp_path):
    _save("llama", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(model_type="qwen2", architectures=["Qwen2ForCausalLM"])  # Qwen2 has q/k/v biases
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"self_attn\.[qkv]_proj\.bias.*Qwen2ForCausalLM"):
        lorakit.load_model(str(tmp_path), compute_dtype="fp32", load_tokenizer=False)


class _Tripwire:
    """Unpickling this creates a file: proof that a loader unpickled the .bin."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


def test_bin_only_folder_errors_without_unpickling(tmp_path):
    model = tiny_model("llama")
    model.config.save_pretrained(tmp_path)
    marker = tmp_path / "unpickled"
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.embed_tokens.weight": _Tripwire(marker)}, f)
    with pytest.raises(FileNotFoundError, match=r"\.bin.*never unpickles"):
        lorakit.load_model(str(tmp_path), compute_dtype="fp32")
    assert not marker.exists()


def test_missing_folder_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lorakit.load_model(str(tmp_path / "nope"))


def tiny_tokenizer():
    """A word-level tokenizer over TINY's vocabulary size, built locally (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(TINY["vocab_size"] - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def test_tokenizer_is_loaded_when_present(tmp_path):
    _save("llama", tmp_path)
    original = tiny_tokenizer()
    original.save_pretrained(tmp_path)
    _, tokenizer = lorakit.load_model(str(tmp_path), compute_dtype="fp32")
    text = "w5 w17 w3 zzz w150"
    assert tokenizer is not None
    assert tokenizer(text).input_ids == original(text).input_ids == [8, 20, 6, 0, 153]
    _, none = lorakit.load_model(str(tmp_path), compute_dtype="fp32", load_tokenizer=False)
    assert none is None


@pytest.mark.parametrize("arch,tied", [("gpt2", True), ("gemma2", True), ("llama", False)])
@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_tied_embeddings(arch, tied, quantization, tmp_path, input_ids):
    original = _save(arch, tmp_path)
    stored = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" not in stored) == tied  # transformers stores a tied matrix once
    model, _ = lorakit.load_model(str(tmp_path), quantization=quantization, compute_dtype="fp32", load_tokenizer=False)
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert (head.weight is emb.weight) == tied
    assert torch.equal(head.weight, original.get_output_embeddings().weight)
    if quantization is None:
        assert torch.equal(_logits(model, input_ids), _logits(original, input_ids))


def test_bf16_compute_dtype_casts_dense_weights(tmp_path):
    original = _save("llama", tmp_path)
    model, _ = lorakit.load_model(str(tmp_path), quantization="nf4", compute_dtype="bf16", load_tokenizer=False)
    emb = model.get_input_embeddings().weight
    assert emb.dtype == torch.bfloat16 and torch.equal(emb, original.get_input_embeddings().weight.bfloat16())
    layer = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert layer.compute_dtype == torch.bfloat16 and layer.quant_state.dtype == torch.float32  # quantized from fp32


def _mapped_files():
    with open("/proc/self/maps") as f:
        return f.read()


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_input_embedding_is_mapped_from_the_file_copy_on_write(arch, tmp_path, input_ids):
    """mmap_embeddings (default): the embedding weight is a view of the checkpoint file's memory
    map (nothing read until rows are looked up), gives the same logits as reading it, and writing
    to it changes neither the file nor another load. A file in another dtype is read and cast."""
    original = tiny_model(arch).to(torch.bfloat16)
    original.save_pretrained(tmp_path)
    file = tmp_path / "model.safetensors"
    before = file.read_bytes()
    mapped, _ = lorakit.load_model(str(tmp_path), compute_dtype="bf16", load_tokenizer=False)
    read, _ = lorakit.load_model(str(tmp_path), compute_dtype="bf16", load_tokenizer=False, mmap_embeddings=False)
    emb = mapped.get_input_embeddings().weight
    assert str(file) in _mapped_files()
    assert torch.equal(emb, read.get_input_embeddings().weight)
    assert torch.equal(_logits(mapped, input_ids), _logits(read, input_ids))
    with torch.no_grad():
        emb.zero_()  # private copy-on-write pages
    assert file.read_bytes() == before
    again, _ = lorakit.load_model(str(tmp_path), compute_dtype="bf16", load_tokenizer=False)
    assert torch.equal(again.get_input_embeddings().weight, read.get_input_embeddings().weight)
    del mapped, again, emb

    fp32_dir = tmp_path / "fp32"
    tiny_model(arch).save_pretrained(fp32_dir)
    cast, _ = lorakit.load_model(str(fp32_dir), compute_dtype="bf16", load_tokenizer=False)
    assert cast.get_input_embeddings().weight.dtype == torch.bfloat16
    assert str(fp32_dir / "model.safetensors") not in _mapped_files()
