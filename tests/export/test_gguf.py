"""GGUF export (export/gguf.py) of tiny random models of every supported family, read back with
gguf-py's GGUFReader and loaded by transformers' own GGUF reader (`from_pretrained(gguf_file=)`),
which undoes the family transforms (Llama q/k permutation, Gemma norm + 1) independently."""

import numpy as np
import pytest
import torch
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

import lorakit
from lorakit.export.gguf import LORAKIT_KEY, export_gguf
from lorakit.export.hf import stream_merge
from lorakit.export.keys import ExportError, use_more_bits
from lorakit.lora.inject import lora_layers
from lorakit.utils.fs import OutputError

from tiny_models import tiny_model
from tiny_tokenizers import make_spm_tokenizer, make_tokenizer

TEXTS = ["Hello world, how are you today? 0123456789", " The quick  brown fox\n\njumps.", "<|im_start|>user\nhi<|im_end|>"]
# (architecture, tokenizer kind): byte-level BPE (GPT-2 pre-tokenizer) or SentencePiece-style BPE
CASES = [("llama", "bpe"), ("llama", "spm"), ("mistral", "spm"), ("qwen2", "bpe"), ("gemma2", "spm"), ("phi3", "spm")]
# max |logit diff| vs the fp32 model (measured: f16 <= 3e-4, q8_0 <= 0.05)
BOUND = {"f16": 1e-2, "q8_0": 0.1}


def model_folder(tmp_path, arch, kind, **overrides):
    tok = make_tokenizer("llama") if kind == "bpe" else make_spm_tokenizer(space_prefix=arch != "gemma2")
    extra = {"query_pre_attn_scalar": 16} if arch == "gemma2" else {}
    model = tiny_model(arch, vocab_size=len(tok), **{**extra, **overrides})
    folder = tmp_path / f"{arch}-{kind}"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder, model, tok


def gguf_model(folder, name):
    extra = {}
    if "phi3" in folder.name:
        extra["pad_token_id"] = 0  # transformers' GGUF reader leaves Phi3Config's default 32000
    if "gemma2" in folder.name:
        extra["query_pre_attn_scalar"] = 16  # not a GGUF key: llama.cpp scales by 1/sqrt(head_dim), as here;
        #                                      transformers' reader leaves Gemma2Config's default 256
    return AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **extra).eval()


def fields(path):
    r = GGUFReader(str(path))
    return r, {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}


@pytest.mark.parametrize("arch,kind", CASES, ids=[f"{a}-{k}" for a, k in CASES])
@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_export_reads_back_and_transformers_reproduces_the_logits(tmp_path, arch, kind, quant):
    folder, model, tok = model_folder(tmp_path, arch, kind)
    out = folder / f"model-{quant}.gguf"
    res = export_gguf(str(folder), str(out), quant, progress=False)
    reader, kv = fields(out)
    name = {"mistral": "llama"}.get(arch, arch)
    assert kv["general.architecture"] == name and LORAKIT_KEY in kv
    assert kv["general.file_type"] == {"f16": 1, "q8_0": 7}[quant]
    assert kv[f"{name}.block_count"] == 2 and kv[f"{name}.embedding_length"] == 64
    tensors = {t.name: t for t in reader.tensors}
    rows = int(tensors["token_embd.weight"].shape[1])  # GGUF shapes are reversed: [cols, rows]
    assert len(kv["tokenizer.ggml.tokens"]) == rows == model.config.vocab_size
    assert kv["tokenizer.ggml.model"] == ("gpt2" if kind == "bpe" else "llama")
    assert kv["tokenizer.ggml.eos_token_id"] == tok.eos_token_id and kv["tokenizer.chat_template"] == tok.chat_template
    for t in reader.tensors:  # norms and biases F32, 2-D weights in the requested type (or its F16 fallback)
        kind_ok = {"F32"} if t.name.endswith(("norm.weight", ".bias")) else {quant.upper(), "F16"}
        assert t.tensor_type.name in kind_ok, t.name
    assert sum(res.types.values()) == len(reader.tensors)
    if arch == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"} <= set(tensors)
    if arch == "gemma2":  # norm + 1, exactly, and no output.weight (tied)
        w = model.model.layers[0].input_layernorm.weight.detach()
        assert np.array_equal(np.asarray(tensors["blk.0.attn_norm.weight"].data), (w.float() + 1).numpy())
        assert "output.weight" not in tensors
    g = gguf_model(folder, out.name)
    gt = AutoTokenizer.from_pretrained(folder, gguf_file=out.name)
    for text in TEXTS:
        ids = tok(text).input_ids
        assert gt(text).input_ids == ids, text
        with torch.no_grad():
            diff = (model(torch.tensor([ids])).logits - g(torch.tensor([ids])).logits).abs().max().item()
        assert diff <= BOUND[quant], (text, diff)


def adapted_folder(tmp_path, arch="llama", kind="bpe"):
    folder, _, _ = model_folder(tmp_path, arch, kind)
    model, _ = lorakit.load_model(str(folder), compute_dtype="fp32")
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, use_rslora=True))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return folder, tmp_path / "adapter", lorakit.merge(model)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_with_adapter_equals_export_of_the_merged_checkpoint(tmp_path, arch):
    folder, adapter, merged = adapted_folder(tmp_path, arch)
    export_gguf(str(folder), str(tmp_path / "a.gguf"), "q8_0", adapter_path=str(adapter), progress=False)
    stream_merge(str(folder), str(adapter), str(tmp_path / "merged"), progress=False)
    export_gguf(str(tmp_path / "merged"), str(tmp_path / "b.gguf"), "q8_0", progress=False)
    a, b = GGUFReader(str(tmp_path / "a.gguf")), GGUFReader(str(tmp_path / "b.gguf"))
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    # and transformers reading the merged GGUF gives the merged model's logits
    (tmp_path / "tok").mkdir()
    g = gguf_model(tmp_path, "a.gguf")
    ids = torch.tensor([[1, 20, 30, 40, 50, 60, 70]])
    with torch.no_grad():
        assert (g(ids).logits - merged(ids).logits).abs().max() <= BOUND["q8_0"]


def test_q4_k_m_mix_and_k_quant_tensors_decode_in_transformers(tmp_path):
    """A 16-layer model with rows of 256: llama.cpp's Q4_K_M mix (Q6_K for the output head,
    attn_v and ffn_down in use_more_bits layers, Q4_K elsewhere) and transformers dequantizes it."""
    folder, model, tok = model_folder(tmp_path, "qwen2", "bpe", hidden_size=256, intermediate_size=512,
                                      num_hidden_layers=16, tie_word_embeddings=False)
    out = folder / "q4km.gguf"
    export_gguf(str(folder), str(out), "q4_k_m", progress=False)
    reader, kv = fields(out)
    assert kv["general.file_type"] == 15
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["output.weight"] == "Q6_K" and types["token_embd.weight"] == "Q4_K"
    for i in range(16):
        want = "Q6_K" if use_more_bits(i, 16) else "Q4_K"
        assert types[f"blk.{i}.attn_v.weight"] == want and types[f"blk.{i}.ffn_down.weight"] == want
        assert types[f"blk.{i}.attn_q.weight"] == "Q4_K" and types[f"blk.{i}.attn_q.bias"] == "F32"
    assert [i for i in range(16) if use_more_bits(i, 16)] == [0, 1, 4, 7, 10, 13, 14, 15]
    g = gguf_model(folder, out.name)
    ids = torch.tensor([tok(TEXTS[0]).input_ids])
    with torch.no_grad():
        a, b = model(ids).logits, g(ids).logits
    rel = float((a - b).std() / a.std())  # 16 random layers of ~4.8-bit weights: measured 0.20
    assert (a - b).abs().max() <= 0.5 and rel <= 0.3, rel
    # every tensor in the file is exactly lorakit's quantizer applied to the right (transformed) weight
    from gguf.quants import dequantize

    from lorakit.export import kquants
    from lorakit.export.keys import architecture, transform

    arch = architecture(model.config)
    params = dict(model.named_parameters())
    hf_of = {f"blk.{i}.{g}.weight": f"model.layers.{i}.{h}.weight" for i in range(16)
             for g, h in (("attn_v", "self_attn.v_proj"), ("ffn_down", "mlp.down_proj"), ("attn_q", "self_attn.q_proj"))}
    hf_of["output.weight"] = "lm_head.weight"
    for t in reader.tensors:
        if t.name in hf_of:
            w = transform(arch, hf_of[t.name], params[hf_of[t.name]].detach())
            mine = kquants.dequantize(kquants.quantize(w, t.tensor_type.name), t.tensor_type.name, w.shape)
            assert np.array_equal(dequantize(t.data, t.tensor_type).reshape(w.shape), mine.numpy()), t.name


def test_mix_rule_details():
    from lorakit.export.keys import tensor_type

    assert tensor_type("blk.11.attn_v.weight", (1024, 8192), "q4_k_m", 80, False, big=True) == "Q5_K"  # 70B
    assert tensor_type("blk.2.attn_v.weight", (1024, 8192), "q4_k_m", 80, False, big=True) == "Q6_K"
    assert tensor_type("blk.3.attn_q.weight", (896, 896), "q4_k_m", 24, False) == "Q5_0"  # 896 % 256: llama.cpp's fallback
    assert tensor_type("output.weight", (151936, 896), "q4_k_m", 24, False) == "Q8_0"
    assert tensor_type("token_embd.weight", (151936, 1024), "q4_0", 24, True) == "Q6_K"  # tied: the output head
    assert tensor_type("token_embd.weight", (151936, 1024), "q8_0", 24, True) == "Q8_0"
    assert tensor_type("blk.0.attn_norm.weight", (1024,), "q4_k_m", 24, True) == "F32"
    assert tensor_type("blk.0.ffn_down.weight", (64, 688), "q8_0", 24, False) == "F16"  # 688 % 32


def test_q6_k_export_is_all_q6_k(tmp_path):
    folder, _, _ = model_folder(tmp_path, "llama", "bpe", hidden_size=256, intermediate_size=512)
    reader, kv = fields(export_gguf(str(folder), str(folder / "m.gguf"), "q6_k", progress=False).path)
    assert kv["general.file_type"] == 18
    assert {t.tensor_type.name for t in reader.tensors if t.data.ndim > 1 or t.name.endswith("proj")} <= {"Q6_K", "F32"}


def test_unsupported_architecture_and_tokenizer_are_clear_errors(tmp_path):
    folder = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(folder)
    with pytest.raises(ExportError, match="GPT2LMHeadModel.*exports GGUF for"):
        export_gguf(str(folder), str(tmp_path / "x.gguf"), "f16", progress=False)
    folder, _, tok = model_folder(tmp_path, "llama", "bpe")
    from tokenizers import pre_tokenizers

    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save_pretrained(folder)
    with pytest.raises(ExportError, match="pre-tokenizer .* is not one llama.cpp implements"):
        export_gguf(str(folder), str(tmp_path / "x.gguf"), "f16", progress=False)
    assert not (tmp_path / "x.gguf").exists()
    with pytest.raises(ExportError, match="--quant 'q3_k'"):
        export_gguf(str(folder), str(tmp_path / "x.gguf"), "q3_k", progress=False)
    # a SentencePiece .model without tokenizer.json: not read (that needs the sentencepiece package)
    folder2, _, _ = model_folder(tmp_path / "spm", "llama", "spm")
    (folder2 / "tokenizer.json").unlink()
    (folder2 / "tokenizer.model").write_bytes(b"\x0a\x00")
    with pytest.raises(ExportError, match="no tokenizer.json"):
        export_gguf(str(folder2), str(tmp_path / "x.gguf"), "f16", progress=False)


def test_output_file_rules(tmp_path, monkeypatch):
    folder, _, _ = model_folder(tmp_path, "llama", "bpe")
    foreign = tmp_path / "theirs.gguf"
    foreign.write_bytes(b"GGUF not ours")
    with pytest.raises(OutputError, match="not written by lorakit"):
        export_gguf(str(folder), str(foreign), "f16", overwrite=True, progress=False)
    assert foreign.read_bytes() == b"GGUF not ours"
    ours = tmp_path / "ours.gguf"
    export_gguf(str(folder), str(ours), "f16", progress=False)
    with pytest.raises(OutputError, match="pass --overwrite"):
        export_gguf(str(folder), str(ours), "q8_0", progress=False)
    before = ours.read_bytes()
    import lorakit.export.gguf as mod

    def dies(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mod, "encode_chunks", dies)
    with pytest.raises(RuntimeError, match="disk full"):
        export_gguf(str(folder), str(ours), "q8_0", overwrite=True, progress=False)
    assert ours.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ours.gguf", "theirs.gguf"]
