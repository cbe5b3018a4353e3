"""Shared pieces of the speed benchmark: model shapes, the cached random checkpoint, FLOP counts,
matmul throughput, and the child-process protocol (one JSON line on stdout, prefixed RESULT).

Nothing here downloads anything: checkpoints are random weights written once as bf16 safetensors
into the cache folder (default bench/.cache/, not for git).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(__file__).resolve().parent / ".cache"

# Qwen2.5-0.5B (its config.json on the hub), except the output head is untied as the issue asks.
QWEN05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
               intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768,
               rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
# A small Qwen2 for quick iteration (~60M parameters, ~20 s per side).
SMALL = dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
             intermediate_size=1536, vocab_size=32000, max_position_embeddings=4096,
             rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
SHAPES = {"qwen2.5-0.5b": QWEN05B, "small": SMALL}
RESULT_PREFIX = "RESULT "


def make_checkpoint(shape: str, cache: Path = CACHE) -> Path:
    """The Qwen2-shaped checkpoint SHAPES[shape], written once into the cache."""
    return write_random_checkpoint(cache / f"{shape}-random-bf16", SHAPES[shape])


def write_random_checkpoint(folder: Path, shape: dict) -> Path:
    """config.json + model.safetensors for Qwen2Config(**shape): bf16, N(0, 0.02) weights, norms 1,
    biases 0; written once (a complete file appears under its final name or not at all)."""
    if (folder / "model.safetensors").is_file():
        return folder
    import torch
    from safetensors.torch import save_file
    from transformers import Qwen2Config, Qwen2ForCausalLM

    folder.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(**{"torch_dtype": "bfloat16", **shape})
    with torch.device("meta"):
        skeleton = Qwen2ForCausalLM(config)
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, p in skeleton.state_dict().items():
        if name.endswith("norm.weight"):
            tensors[name] = torch.ones(p.shape, dtype=torch.bfloat16)
        elif name.endswith(".bias"):
            tensors[name] = torch.zeros(p.shape, dtype=torch.bfloat16)
        else:
            tensors[name] = (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    config.save_pretrained(folder)
    os.replace(tmp, folder / "model.safetensors")
    return folder


def useful_flops(shape: dict, tokens: int, seq: int, r: int = 16) -> dict:
    """FLOPs of one LoRA training step with a frozen base (no recomputation counted).

    matmul params P = every Linear weight of the decoder (q,k,v,o,gate,up,down) + the output head.
    Frozen base: forward 2*P*T, backward input gradient 2*P*T -> 4*P*T (no weight gradient).
    LoRA A and B (r*(in+out) per layer): forward, input grad and weight grad -> 6*P_lora*T.
    Attention scores and values: 2 matmuls of 2*T*T*d_attn each per layer forward, x3 with backward
    (counted over the full T x T square, as the kernels compute it for a causal mask of one sequence).
    """
    h, i, L = shape["hidden_size"], shape["intermediate_size"], shape["num_hidden_layers"]
    head_dim = h // shape["num_attention_heads"]
    kv = shape["num_key_value_heads"] * head_dim
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # (in, out)
    p_base = L * sum(a * b for a, b in linears) + h * shape["vocab_size"]
    p_lora = L * sum(r * (a + b) for a, b in linears)
    batches = tokens // seq
    attn = 3 * 2 * 2 * batches * seq * seq * h * L
    return {"matmul_params": p_base, "lora_params": p_lora,
            "flops": 4 * p_base * tokens + 6 * p_lora * tokens + attn}


def matmul_throughput(tokens: int, shape: dict, seconds: float = 2.0) -> dict:
    """Best GFLOP/s of bf16 and fp32 matmuls on this machine: the step's own shapes
    ([T, h] @ [h, i] and [T, i] @ [i, h]) and a square 2048^2, best of a few timed repeats."""
    import torch

    h, i = shape["hidden_size"], shape["intermediate_size"]
    sizes = [(tokens, h, i), (tokens, i, h), (2048, 2048, 2048)]
    out = {}
    for dtype, name in ((torch.bfloat16, "bf16"), (torch.float32, "fp32")):
        best = 0.0
        for m, k, n in sizes:
            a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
            a @ b  # warm-up (oneDNN primitive creation)
            reps, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds / len(sizes) or reps < 3:
                t = time.perf_counter()
                a @ b
                best = max(best, 2 * m * k * n / (time.perf_counter() - t) / 1e9)
                reps += 1
        out[name] = best
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def emit(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str, args: list[str], threads: int, timeout: float = 3600, extra_env: dict | None = None) -> dict:
    env = {**os.environ, **(extra_env or {}), "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    out = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, timeout=timeout)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith(RESULT_PREFIX)]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"child {args} failed (rc {out.returncode}):\n{out.stderr[-4000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def timed(fn) -> float:
    """Wall seconds of one call of fn()."""
    import time

    t = time.perf_counter()
    fn()
    return time.perf_counter() - t
