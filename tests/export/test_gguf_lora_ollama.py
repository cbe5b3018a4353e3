"""The llama.cpp LoRA GGUF (export/gguf_lora.py) and the Ollama Modelfile (export/ollama.py)."""

import json
import math
import re

import numpy as np
import pytest
import torch
from gguf import GGUFReader

import lorakit
from lorakit.cli import main
from lorakit.export.gguf_lora import export_gguf_lora
from lorakit.export.keys import ExportError, llama_permute
from lorakit.export.ollama import FORMATS, chat_format, modelfile_text
from lorakit.lora.inject import lora_layers

from tiny_models import tiny_model
from tiny_tokenizers import CHATML_TEMPLATE, make_tokenizer


def adapter_case(tmp_path, arch="llama", rslora=False, **lora):
    tok = make_tokenizer("chatml")
    base = tiny_model(arch, vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    model, _ = lorakit.load_model(str(tmp_path / "base"), compute_dtype="fp32")
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, use_rslora=rslora, **lora))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=g) * 0.1)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter", model


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_gguf_layout_and_scale(tmp_path, rslora):
    base, adapter, model = adapter_case(tmp_path, rslora=rslora)
    out = tmp_path / "lora.gguf"
    export_gguf_lora(str(base), str(adapter), str(out), quant="f32")
    r = GGUFReader(str(out))
    kv = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert kv["general.type"] == "adapter" and kv["adapter.type"] == "lora" and kv["general.architecture"] == "llama"
    assert not any(k.startswith("tokenizer.") for k in kv)
    # llama.cpp applies alpha / r (r = lora_b's columns): that must be the adapter's own scaling
    assert math.isclose(kv["adapter.lora.alpha"] / 4, 8 / (math.sqrt(4) if rslora else 4), rel_tol=1e-6)
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert set(tensors) == {f"blk.{i}.{n}.weight.lora_{ab}" for i in range(2)
                            for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down") for ab in "ab"}
    layer = model.model.layers[1].self_attn
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_a"], layer.q_proj.lora_A.weight.detach().numpy())
    # q's B rows carry the base's rope permutation (k with the kv heads), v's do not
    assert np.array_equal(tensors["blk.1.attn_q.weight.lora_b"], llama_permute(layer.q_proj.lora_B.weight.detach(), 4).numpy())
    assert np.array_equal(tensors["blk.1.attn_k.weight.lora_b"], llama_permute(layer.k_proj.lora_B.weight.detach(), 2).numpy())
    assert np.array_equal(tensors["blk.1.attn_v.weight.lora_b"], layer.v_proj.lora_B.weight.detach().numpy())


def test_lora_gguf_refuses_what_llama_cpp_cannot_represent(tmp_path):
    base, adapter, _ = adapter_case(tmp_path / "a", arch="qwen2", bias="all")
    with pytest.raises(ExportError, match="full tensors .* bias='all'"):
        export_gguf_lora(str(base), str(adapter), str(tmp_path / "x.gguf"))
    base, adapter, _ = adapter_case(tmp_path / "b")
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in (("use_dora", True), ("alpha_pattern", {"q_proj": 32})):
        cfg_file.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=key):
            export_gguf_lora(str(base), str(adapter), str(tmp_path / "x.gguf"))
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="f32, f16, bf16"):
        export_gguf_lora(str(base), str(adapter), str(tmp_path / "x.gguf"), quant="q4_k_m")
    assert not (tmp_path / "x.gguf").exists()


def test_lora_gguf_refuses_a_head_lora_on_tied_embeddings(tmp_path):
    base, adapter, _ = adapter_case(tmp_path, arch="qwen2", target_modules=["q_proj", "lm_head"])
    cfg = json.loads((base / "config.json").read_text())
    assert cfg.get("tie_word_embeddings") is False  # tie it, as Qwen2.5-0.5B does
    cfg["tie_word_embeddings"] = True
    (base / "config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    w = load_file(str(base / "model.safetensors"))
    w.pop("lm_head.weight")
    save_file(w, str(base / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="tied"):
        export_gguf_lora(str(base), str(adapter), str(tmp_path / "x.gguf"))


# ------------------------------------------------------------------ Ollama


def render_go(template: str, system: str, prompt: str, response: str) -> str:
    """The subset of Go's text/template the Modelfile templates use: {{ if .X }}...{{ end }} and {{ .X }}."""
    values = {"System": system, "Prompt": prompt, "Response": response}
    out = re.sub(r"\{\{ if \.(\w+) \}\}(.*?)\{\{ end \}\}", lambda m: m.group(2) if values[m.group(1)] else "", template, flags=re.S)
    return re.sub(r"\{\{ \.(\w+) \}\}", lambda m: values[m.group(1)], out)


JINJA = {  # the published chat templates' essential form (HF tokenizer_config.json), simplified to one turn each
    "chatml": CHATML_TEMPLATE,
    "llama3": ("{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>"
               "{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "phi3": ("{% for m in messages %}{% if m['role'] == 'system' %}{{ '<|system|>\n' + m['content'] + '<|end|>\n' }}"
             "{% elif m['role'] == 'user' %}{{ '<|user|>\n' + m['content'] + '<|end|>\n' }}{% else %}"
             "{{ '<|assistant|>\n' + m['content'] + '<|end|>\n' }}{% endif %}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"),
    "alpaca": open(__import__("lorakit").__path__[0] + "/assets/demo/model/chat_template.jinja").read(),
}


@pytest.mark.parametrize("family", list(JINJA))
def test_modelfile_template_renders_what_the_jinja_template_renders(family):
    from jinja2 import Template

    fmt = chat_format(JINJA[family])
    assert fmt is not None and fmt.name == family
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there?"}]
    want = Template(JINJA[family]).render(messages=msgs, add_generation_prompt=True, bos_token="", eos_token="</s>")
    got = render_go(fmt.template, "Be brief.", "Hi there?", "")
    assert got.startswith(want.rstrip("\n")) if family == "alpaca" else got.startswith(want), (got, want)


def test_modelfile_has_from_template_and_stops():
    text, fmt = modelfile_text("model-q4_k_m.gguf", CHATML_TEMPLATE, "<|im_end|>")
    assert fmt.name == "chatml"
    lines = text.splitlines()
    assert lines[1] == "FROM ./model-q4_k_m.gguf" and 'TEMPLATE """' in text
    assert [l for l in lines if l.startswith("PARAMETER stop")] == ['PARAMETER stop "<|im_start|>"', 'PARAMETER stop "<|im_end|>"']
    assert {f.name for f in FORMATS} >= {"chatml", "llama3", "gemma", "phi3", "mistral"}


def test_export_command_writes_gguf_and_modelfile_and_prints_ollama_create(tmp_path, capsys):
    base, adapter, _ = adapter_case(tmp_path)
    out = tmp_path / "out" / "tiny.gguf"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--quant", "q8_0",
                 "--ollama", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert f"ollama create tiny -f {out.parent / 'Modelfile'}" in printed
    assert (out.parent / "Modelfile").read_text().splitlines()[1] == "FROM ./tiny.gguf"
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--out", str(out), "--ollama"]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(["export", "--model", str(base), "--adapter", str(adapter), "--format", "gguf-lora",
                 "--out", str(tmp_path / "lora.gguf")]) == 0
    assert "--lora" in capsys.readouterr().out
    assert main(["export", "--model", str(base), "--format", "gguf-lora", "--out", str(tmp_path / "l2.gguf")]) == 2
