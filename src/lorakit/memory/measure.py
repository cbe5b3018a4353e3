"""Measure the peak memory of real training steps, to test the estimator against.

What is measured: the most bytes held by live tensors at any moment of `steps` optimizer steps run
exactly as `lorakit.train.loop.train` runs them (`accumulate_gradients` of the run's TrainStep over
`grad_accum` micro-batches, gradient clipping, `optimizer.step()`, `zero_grad(set_to_none=True)`), on a model
saved with random weights and read back by `lorakit.load_model` (quantized tensor by tensor for
QLoRA), adapted by `lorakit.add_lora`, with the optimizer from `build_optimizer`. The model, the
adapter, optimizer state and the batches all count; tensors created before the measurement
starts (imports) do not.

How, per device:

    cuda  torch.cuda.reset_peak_memory_stats() once the model is loaded, then
          torch.cuda.max_memory_allocated() after the steps: the caching allocator's peak of
          allocated bytes (excludes the CUDA context and cached-but-free blocks).
    cpu   torch.profiler with profile_memory=True records every allocation and free of the CPU
          allocator with its size; the running sum from before the model is loaded is the live
          bytes at each moment, and the peak is its maximum from the first step on. (Peak RSS
          would also count the allocator's cached pages and Python's own memory, and is too coarse
          for the tiny models the tests use.)

Both count bytes as requested by tensors; the CUDA allocator rounds each block up to 512 bytes,
which matters only for very many very small tensors.
"""

from __future__ import annotations

import gc
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .estimate import Settings

_MARK = "lorakit.memory.training_steps"


@dataclass(frozen=True)
class MeasureCase:
    """One measured configuration: a transformers config (model_type + its fields) and settings."""

    name: str
    config: dict
    settings: Settings
    steps: int = 2
    grad_accum: int = 1


@dataclass
class Measurement:
    peak_bytes: int        # most live bytes during the training steps
    loaded_bytes: int      # live bytes after load_model + add_lora (before the first step)
    method: str            # "torch.profiler memory events (cpu)" or "torch.cuda.max_memory_allocated"
    extra: dict = field(default_factory=dict)


def build_hf_config(config: dict):
    from transformers import AutoConfig

    fields = {k: v for k, v in config.items() if k != "model_type"}
    return AutoConfig.for_model(config["model_type"], **fields)


def save_random_checkpoint(config: dict, folder: Path, dtype: torch.dtype, seed: int = 0) -> Path:
    """A random-weight model of `config`, written as safetensors + config.json (no tokenizer)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(build_hf_config(config), dtype=dtype)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    gc.collect()
    return folder


def _batches(vocab: int, s: Settings, n: int, device: torch.device, seed: int) -> list[dict]:
    """n micro-batches of s.batch_size full-length rows, every position supervised."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (s.batch_size, s.seq_len), generator=g)  # [B, T]
        out.append({"input_ids": ids.to(device), "labels": ids.clone().to(device),
                    "attention_mask": torch.ones_like(ids).to(device)})
    return out


def _prepare(folder: Path, s: Settings, device: torch.device):
    """load_model + training set-up + add_lora + optimizer, in the order finetune() uses; returns
    (TrainStep, trainable params, optimizer)."""
    from ..config import LoraConfig
    from ..lora.init import weight_preparer
    from ..lora.inject import add_lora
    from ..model.load import load_model
    from ..train.optim import build_optimizer
    from ..train.setup import FastPaths, prepare_for_training
    from ..train.step import TrainStep

    lora = LoraConfig(r=s.rank, alpha=2.0 * s.rank, dropout=s.lora_dropout, target_modules=s.targets,
                      use_dora=s.use_dora, init="pissa_niter_2" if s.residual_init else "default")
    model, _ = load_model(str(folder), quantization="nf4" if s.method == "qlora" else None,
                          double_quant=s.double_quant, compute_dtype=s.dtype, blocksize=s.blocksize,
                          device=device, load_tokenizer=False, prepare=weight_preparer(lora),
                          # allocator bytes are what is measured, and the planner counts the embedding
                          # as held memory (as on CUDA); a file-mapped one would be invisible here
                          mmap_embeddings=False)
    if s.attn_impl:
        model.set_attn_implementation(s.attn_impl)
    fast = FastPaths(lean_activations=s.lean_activations, checkpoint_replay=s.ckpt_replay, fused_loss=s.fused_loss)
    prepare_for_training(model, s.grad_ckpt, fast)
    if s.method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
    else:
        add_lora(model, lora)
    step = TrainStep(model, s.loss_chunk_size, fused_loss=fast.fused_loss).train()
    params = [p for p in model.parameters() if p.requires_grad]
    return step, params, build_optimizer(params, s.optimizer, lr=1e-4)


def _run_steps(step, params, optimizer, batches: list[dict], steps: int, accum: int) -> float:
    from ..train.loop import accumulate_gradients

    loss = float("nan")
    for i in range(steps):
        micro = batches[i * accum:(i + 1) * accum]
        loss, _ = accumulate_gradients(step, micro)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss


def measure_case(case: MeasureCase, device: Optional[str] = None, workdir: Optional[Path] = None) -> Measurement:
    """Peak live bytes of `case.steps` training steps (see the module docstring)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    s = case.settings
    from ..precision import resolve_dtype

    from ..quant.dynamic import clear_lookup_tables
    from ..quant.linear4bit import release_scratch

    dtype = resolve_dtype(s.dtype, dev)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        folder = save_random_checkpoint(case.config, Path(tmp), dtype)
        # buffers kept between calls (Linear4bit's dequantize buffer, the 8-bit quantizers' lookup
        # tables) are counted in this run, whatever ran before in the process
        release_scratch()
        clear_lookup_tables()
        gc.collect()
        if dev.type == "cuda":
            return _measure_cuda(folder, case, dev)
        return _measure_cpu(folder, case, dev)


def _measure_cuda(folder: Path, case: MeasureCase, dev: torch.device) -> Measurement:
    s = case.settings
    torch.cuda.synchronize(dev)
    torch.cuda.empty_cache()
    step, params, opt = _prepare(folder, s, dev)
    batches = _batches(step.model.config.vocab_size, s, case.steps * case.grad_accum, dev, seed=1)
    gc.collect()
    torch.cuda.synchronize(dev)
    loaded = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    loss = _run_steps(step, params, opt, batches, case.steps, case.grad_accum)
    torch.cuda.synchronize(dev)
    peak = torch.cuda.max_memory_allocated(dev)
    del step, params, opt, batches
    gc.collect()
    torch.cuda.empty_cache()
    return Measurement(int(peak), int(loaded), "torch.cuda.max_memory_allocated", {"loss": loss})


def _measure_cpu(folder: Path, case: MeasureCase, dev: torch.device) -> Measurement:
    from torch.profiler import ProfilerActivity, profile, record_function

    s = case.settings
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step, params, opt = _prepare(folder, s, dev)
        batches = _batches(step.model.config.vocab_size, s, case.steps * case.grad_accum, dev, seed=1)
        gc.collect()
        with record_function(_MARK):
            loss = _run_steps(step, params, opt, batches, case.steps, case.grad_accum)
    loaded, peak = peak_in_window(prof, _MARK)
    del step, params, opt, batches
    gc.collect()
    return Measurement(peak, loaded, "torch.profiler memory events (cpu)", {"loss": loss})


def live_bytes_timeline(prof) -> list[tuple[int, int]]:
    """[(time ns, live bytes after this event)] from a profile's CPU allocator events."""
    events = [e for e in prof.profiler.kineto_results.events()
              if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU]
    events.sort(key=lambda e: e.start_ns())
    live, out = 0, []
    for e in events:
        live += e.nbytes()
        out.append((e.start_ns(), live))
    return out


def peak_in_window(prof, mark: str) -> tuple[int, int]:
    """(live bytes when the `record_function(mark)` range starts, peak live bytes inside it)."""
    ranges = [e for e in prof.profiler.kineto_results.events() if e.name() == mark]
    if not ranges:
        raise RuntimeError(f"profile has no range named {mark!r}")
    start, end = ranges[0].start_ns(), ranges[0].end_ns()
    timeline = live_bytes_timeline(prof)
    before = [v for t, v in timeline if t < start]
    inside = [v for t, v in timeline if start <= t <= end]
    loaded = before[-1] if before else 0
    return loaded, max([loaded] + inside)


# ---------------------------------------------------------------- the predicted-vs-measured grid


def _llama(hidden, inter, layers, heads, kv, vocab, model_type="llama", **kw) -> dict:
    return dict(model_type=model_type, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, vocab_size=vocab, max_position_embeddings=2048,
                tie_word_embeddings=kw.pop("tie_word_embeddings", False), **kw)


TINY = _llama(256, 768, 2, 8, 2, 1000)                          # 2.0M params
SMALL = _llama(512, 1536, 4, 8, 4, 8000)                        # 20.8M params
MID = _llama(768, 2048, 8, 12, 2, 32000, model_type="qwen2", tie_word_embeddings=True)  # 73M, q/k/v bias
MID_EAGER = _llama(768, 2048, 6, 12, 4, 16000)                  # 62M, run with eager attention
LARGE = _llama(1024, 2816, 16, 16, 4, 32000)                    # 246M params

GRID = [  # (LoRA and QLoRA; checkpointing on and off; seq 128..1024; four optimizer kinds)
    MeasureCase("tiny-lora-bf16", TINY, Settings("lora", 128, 2, rank=8, dtype="bf16", device="cpu")),
    MeasureCase("tiny-qlora-ckpt-8bit", TINY, Settings("qlora", 128, 2, rank=8, grad_ckpt=True, optimizer="adamw_8bit", device="cpu")),
    MeasureCase("small-lora-fp32", SMALL, Settings("lora", 256, 2, rank=16, dtype="fp32", device="cpu")),
    MeasureCase("small-qlora-8bit", SMALL, Settings("qlora", 256, 2, rank=16, optimizer="adamw_8bit", device="cpu")),
    MeasureCase("small-qlora-ckpt-paged8", SMALL, Settings("qlora", 512, 1, rank=16, grad_ckpt=True, optimizer="paged_adamw_8bit", device="cpu")),
    MeasureCase("mid-qwen2-lora-ckpt", MID, Settings("lora", 512, 1, rank=16, grad_ckpt=True, device="cpu")),
    MeasureCase("mid-eager-lora", MID_EAGER, Settings("lora", 256, 2, rank=16, attn_impl="eager", device="cpu")),
    MeasureCase("large-lora-ckpt-1024", LARGE, Settings("lora", 1024, 1, rank=16, grad_ckpt=True, device="cpu")),
    MeasureCase("large-qlora-8bit-1024", LARGE, Settings("qlora", 1024, 1, rank=16, optimizer="adamw_8bit", device="cpu")),
    MeasureCase("large-qlora-ckpt-paged32", LARGE, Settings("qlora", 512, 2, rank=16, grad_ckpt=True, optimizer="paged_adamw_32bit", device="cpu")),
    # DoRA (lora.use_dora) with a pissa residual init (its A0 / B0 buffers), 16-bit and 4-bit base
    MeasureCase("small-dora-pissa-bf16", SMALL, Settings("lora", 256, 2, rank=16, dtype="bf16", device="cpu", use_dora=True, residual_init=True)),
    MeasureCase("small-qdora-ckpt", SMALL, Settings("qlora", 256, 2, rank=16, grad_ckpt=True, device="cpu", use_dora=True)),
]


def on_device(case: MeasureCase, device: str) -> MeasureCase:
    """The same case, predicted for `device` (cuda: paged state leaves the GPU)."""
    from dataclasses import replace

    return replace(case, settings=replace(case.settings, device=device))
