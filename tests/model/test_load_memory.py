"""The streaming loader's memory bound, measured: loading a checkpoint in 4 bits never holds the
16-bit model. A Llama-3.2-1B-shaped checkpoint (its layer widths: hidden 2048, intermediate 8192,
32 heads, 8 KV heads) with 4 of its 16 layers and an 8,192-token vocabulary (122M parameters in the
quantized layers, 490 MB of bf16 shards) is loaded in a fresh child process, whose peak RSS over its
RSS before the load must stay within

    largest tensor + the loaded model's bytes + MARGIN

(the whole 16-bit model would add ~490 MB; measured here: ~160 MB growth, bound 280 MB).
bench/bench_gpu.py checks the GPU side of the same bound for an 8B-shaped model (and reports the
host's peak RSS).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lorakit.utils.safetensors_io import write_safetensors

SHAPE = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=4, num_attention_heads=32,
             num_key_value_heads=8, vocab_size=8192, tie_word_embeddings=False, max_position_embeddings=2048)
# allocator slack, import-time lazy pages, the quantization chunk's temporaries (~8 MB)
MARGIN = 64 * 2**20

CHILD = r"""
import json, sys
import torch
torch.set_num_threads(1)
import transformers, lorakit
from transformers.models.llama import modeling_llama  # the model code: imported before measuring
from lorakit.utils.memory import current_rss_bytes


def peak_rss_bytes():
    # VmHWM: this address space's peak RSS (getrusage's ru_maxrss would include the forking
    # parent's RSS, here the whole pytest process)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


warm, _ = lorakit.load_model(sys.argv[2], quantization="nf4", compute_dtype="bfloat16", load_tokenizer=False,
                             device="cpu")  # a tiny model first: lazy imports, the C kernels' library
del warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current RSS
before = current_rss_bytes()
model, _ = lorakit.load_model(sys.argv[1], quantization="nf4", compute_dtype="bfloat16", load_tokenizer=False,
                              device="cpu")
model_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
print("RESULT " + json.dumps({"before": before, "peak": peak_rss_bytes(), "model_bytes": model_bytes}))
"""


def _write_checkpoint(folder: Path, shape: dict) -> int:
    """config.json + one bf16 shard per layer (the writer holds one shard); returns the largest tensor's bytes."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder.mkdir()
    config = LlamaConfig(**shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    shards: dict[str, dict] = {}
    for name, p in skeleton.state_dict().items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        shards.setdefault(key, {})[name] = p.shape
    g = torch.Generator().manual_seed(0)
    weight_map, largest = {}, 0
    for key, shapes in shards.items():
        tensors = {n: (torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02).to(torch.bfloat16)
                   for n, s in shapes.items()}
        largest = max(largest, *(t.numel() * 2 for t in tensors.values()))
        file = f"model-{key}.safetensors"
        write_safetensors(tensors, folder / file)
        weight_map.update({n: file for n in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    return largest


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc (VmHWM reset)")
def test_4bit_load_peak_rss_is_one_tensor_plus_the_model(tmp_path):
    largest = _write_checkpoint(tmp_path / "big", SHAPE)
    _write_checkpoint(tmp_path / "tiny", {**SHAPE, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
                                          "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 128})
    out = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "big"), str(tmp_path / "tiny")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    grew = r["peak"] - r["before"]
    bound = largest + r["model_bytes"] + MARGIN
    mb = 2**20
    print(f"load grew RSS by {grew / mb:.0f} MB; bound {bound / mb:.0f} MB = largest tensor {largest / mb:.0f} + "
          f"model {r['model_bytes'] / mb:.0f} + margin {MARGIN / mb:.0f}")
    assert grew <= bound, (grew / mb, bound / mb)
