"""The streaming merge (export/hf.py): the same bits as the in-memory merge, loads in plain
transformers, refuses what it cannot merge, and stays within its memory bound."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import lorakit
from lorakit.export.hf import stream_merge
from lorakit.lora.inject import lora_layers
from lorakit.recipes.merge import merge_to_folder, streams

from tiny_models import tiny_model
from tiny_tokenizers import make_tokenizer


def _tensors(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def make_case(tmp_path, arch="llama", dtype=torch.float32, shard=None, **lora):
    """A base folder (+ tokenizer) and a saved adapter with random B, biases and trained copies."""
    tok = make_tokenizer("plain")
    base = tiny_model(arch, dtype=dtype, vocab_size=len(tok))
    base.save_pretrained(tmp_path / "base", **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(tmp_path / "base")
    model, _ = lorakit.load_model(str(tmp_path / "base"), compute_dtype=dtype)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4, alpha=8, **lora))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in (p for n, p in model.named_parameters() if p.requires_grad):
            p.add_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.05)
    lorakit.save_adapter(model, tmp_path / "adapter")
    return tmp_path / "base", tmp_path / "adapter"


CASES = {
    "llama-fp32": dict(arch="llama"),
    "llama-bf16-rslora": dict(arch="llama", dtype=torch.bfloat16, use_rslora=True),
    "qwen2-bias-all": dict(arch="qwen2", bias="all"),
    "phi3-lora-only": dict(arch="phi3", bias="lora_only", modules_to_save=("lm_head",)),
    "gpt2-conv1d": dict(arch="gpt2", bias="lora_only"),
    "mistral-sharded": dict(arch="mistral", shard="100KB"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_streaming_merge_is_bit_identical_to_the_in_memory_merge(case, tmp_path):
    kw = dict(CASES[case])
    dtype = kw.get("dtype", torch.float32)
    base, adapter = make_case(tmp_path, **kw)
    assert streams(str(base), None, verify=False)
    merge_to_folder(str(base), str(adapter), str(tmp_path / "mem"), precision={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
    stream_merge(str(base), str(adapter), str(tmp_path / "stream"), progress=False)
    mem, st = _tensors(tmp_path / "mem"), _tensors(tmp_path / "stream")
    assert set(mem) <= set(st)  # the in-memory save drops nothing but may omit tied copies
    for name, t in mem.items():
        assert st[name].dtype == t.dtype and torch.equal(st[name], t), name
    # something actually changed: at least one adapted weight differs from the base
    before = _tensors(base)
    assert sum(not torch.equal(before[n], st[n]) for n in before) >= 4
    if "shard" in kw:
        index = json.loads((tmp_path / "stream" / "model.safetensors.index.json").read_text())
        assert len(set(index["weight_map"].values())) > 1 and set(index["weight_map"]) == set(st)
    # the output loads in plain transformers and equals the in-memory merge's logits
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "mem").eval()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "stream").eval()
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)
    assert (tmp_path / "stream" / "tokenizer.json").is_file()


def test_merge_command_streams_by_default_and_verify_takes_the_in_memory_path(tmp_path, capsys):
    from lorakit.cli import main

    base, adapter = make_case(tmp_path)
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "a"),
                 "--no-progress"]) == 0
    assert "streamed tensor by tensor" in capsys.readouterr().out
    assert main(["merge", "--model", str(base), "--adapter", str(adapter), "--out", str(tmp_path / "b"),
                 "--precision", "fp32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "merge check" in out and "streamed" not in out
    a, b = _tensors(tmp_path / "a"), _tensors(tmp_path / "b")
    assert all(torch.equal(a[n], t) for n, t in b.items())


def test_refuses_dora_rank_patterns_and_a_head_lora_on_tied_embeddings(tmp_path):
    base, adapter = make_case(tmp_path, arch="gpt2")  # GPT-2 ties lm_head to wte
    cfg_file = adapter / "adapter_config.json"
    cfg = json.loads(cfg_file.read_text())
    for key, value in (("use_dora", True), ("rank_pattern", {"c_attn": 8})):
        cfg_file.write_text(json.dumps({**cfg, key: value}))
        with pytest.raises(ValueError, match=key):
            stream_merge(str(base), str(adapter), str(tmp_path / "out"), progress=False)
    cfg_file.write_text(json.dumps(cfg))
    # an lm_head LoRA on a tied model: the merged file cannot hold the head and the embedding apart
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    tensors["base_model.model.lm_head.lora_A.weight"] = torch.zeros(4, 64)
    tensors["base_model.model.lm_head.lora_B.weight"] = torch.zeros(len(make_tokenizer("plain")), 4)
    from safetensors.torch import save_file

    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ValueError, match="tied"):
        stream_merge(str(base), str(adapter), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_wrong_base_is_a_clear_error(tmp_path):
    _, adapter = make_case(tmp_path / "a")
    other = tiny_model("llama", hidden_size=32, intermediate_size=64)
    other.save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="another base model"):
        stream_merge(str(tmp_path / "other"), str(adapter), str(tmp_path / "out"), progress=False)


PEAK_SCRIPT = textwrap.dedent("""
    import json, sys, torch
    from lorakit.export.hf import stream_merge
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):  # the model code is imported before the baseline (~190 MB of code, not data)
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(sys.argv[1]))
    def hwm():  # this process's own peak RSS (VmHWM; ru_maxrss would include the forking parent's)
        return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) * 1024
    torch.set_num_threads(1)
    base = hwm()
    stream_merge(sys.argv[1], sys.argv[2], sys.argv[3], progress=False)
    print(json.dumps({"baseline": base, "peak": hwm()}))
""")


def test_streaming_merge_peak_rss_is_bounded_by_the_largest_tensor(tmp_path):
    """A 10-layer model of 216 MB in bf16 whose largest tensor is 8 MB: the merge's memory above the
    process baseline (python + torch + the model code) stays under adapter + 4 x the largest tensor
    in fp32 + 32 MB, less than half the model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.utils.safetensors_io import write_safetensors

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=2048, num_hidden_layers=10, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=4096, tie_word_embeddings=False)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(cfg)
    folder = tmp_path / "base"
    folder.mkdir()
    cfg.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)
    tensors = {n: (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16) for n, p in skeleton.named_parameters()}
    model_bytes = sum(t.nbytes for t in tensors.values())
    largest = max(t.numel() for t in tensors.values()) * 4  # fp32 bytes
    write_safetensors(tensors, folder / "model.safetensors")
    # an adapter on every q/v projection, written in PEFT's format by hand
    ad = tmp_path / "adapter"
    ad.mkdir()
    lora = {}
    for n in tensors:
        if n.endswith(("q_proj.weight", "v_proj.weight")):
            m = "base_model.model." + n[: -len(".weight")]
            lora[m + ".lora_A.weight"] = torch.randn(8, 1024, generator=g) * 0.01
            lora[m + ".lora_B.weight"] = torch.randn(1024, 8, generator=g) * 0.01
    del tensors
    from safetensors.torch import save_file

    save_file(lora, str(ad / "adapter_model.safetensors"))
    (ad / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                       "target_modules": ["q_proj", "v_proj"]}))
    adapter_bytes = sum(t.nbytes for t in lora.values())
    src = str(Path(lorakit.__file__).parents[1])
    res = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(folder), str(ad), str(tmp_path / "out")],
                         capture_output=True, text=True, env={"PYTHONPATH": src, "PATH": "/usr/bin:/bin"}, timeout=600)
    assert res.returncode == 0, res.stderr
    rss = json.loads(res.stdout.strip().splitlines()[-1])
    used = rss["peak"] - rss["baseline"]
    bound = adapter_bytes + 4 * largest + 32 * 2**20
    assert bound < model_bytes / 2
    print(f"streaming merge: {used / 2**20:.0f} MB above baseline, bound {bound / 2**20:.0f} MB, model {model_bytes / 2**20:.0f} MB")
    assert used <= bound, f"merge used {used / 2**20:.0f} MB above baseline; bound {bound / 2**20:.0f} MB"
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert sum(t.nbytes for t in merged.values()) == model_bytes
