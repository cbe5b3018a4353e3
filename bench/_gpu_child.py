"""The child processes of bench/bench_gpu.py (one job each; one RESULT line of JSON on stdout).

    python bench/_gpu_child.py checkpoint DIR LAYERS [--tiny]     random bf16 Llama-3-8B-shaped checkpoint
    python bench/_gpu_child.py kernels                             dequantize / matvec timings
    python bench/_gpu_child.py train KIND DIR --seq S --micro 1 4  one side's training steps
    python bench/_gpu_child.py info                                device, capability, versions

Every job runs on `--device` (default cuda; bench_gpu.py --smoke uses cpu, to test this script).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))  # this working tree's lorakit, installed or not

# Llama-3-8B (its config.json): every layer shape of the real model; bench_gpu.py picks the layer count.
LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                 vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, rms_norm_eps=1e-5,
                 tie_word_embeddings=False)
TINY = dict(LLAMA3_8B, hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=1024)
LORA = dict(r=16, alpha=32, dropout=0.0)
LR = 2e-4


def emit(result: dict) -> None:
    print("RESULT " + json.dumps(result), flush=True)


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (its own address space; ru_maxrss also counts the parent's
    RSS at fork), else ru_maxrss."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- checkpoint --------------------------------------------------------------------------------
def make_checkpoint(folder: Path, layers: int, tiny: bool, device: str) -> dict:
    """config.json + one bf16 safetensors shard per decoder layer (+ one for the rest), N(0, 0.02)
    weights drawn on `device` (fast on a GPU), norms 1; written once, "complete" marks it done."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lorakit.utils.safetensors_io import write_safetensors

    shape = dict(TINY if tiny else LLAMA3_8B, num_hidden_layers=layers)
    if (folder / "complete").is_file() and json.loads((folder / "complete").read_text()) == shape:
        return {"folder": str(folder), "created": False, "seconds": 0.0, "shape": shape}
    t0 = time.perf_counter()
    folder.mkdir(parents=True, exist_ok=True)
    config = LlamaConfig(**shape)
    with torch.device("meta"):
        skeleton = LlamaForCausalLM(config)
    groups: dict[str, dict] = {}
    for name, p in skeleton.state_dict().items():
        key = name.split(".")[2] if name.startswith("model.layers.") else "rest"
        groups.setdefault(key, {})[name] = p.shape
    g = torch.Generator(device=device).manual_seed(0)
    weight_map = {}
    for key, shapes in groups.items():
        tensors = {}
        for name, s in shapes.items():
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(s, dtype=torch.bfloat16)
            else:
                tensors[name] = (torch.randn(s, generator=g, device=device) * 0.02).to(torch.bfloat16).cpu()
        file = f"model-{key}.safetensors"
        write_safetensors(tensors, folder / file)
        weight_map.update({n: file for n in tensors})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(folder)
    (folder / "complete").write_text(json.dumps(shape))
    return {"folder": str(folder), "created": True, "seconds": time.perf_counter() - t0, "shape": shape}


# ---- kernels -----------------------------------------------------------------------------------
def _time_ms(fn, device: str, reps: int = 20) -> float:
    """Median milliseconds of fn() (CUDA events on a GPU)."""
    import torch

    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def kernels(device: str, tiny: bool) -> dict:
    """Dequantize (bf16 out, NF4 + double quant, blocksize 64) of each Llama-3-8B matrix shape:
    lorakit's registered kernel, bitsandbytes, lorakit's PyTorch reference; GB/s counts the bytes
    read (codes, absmax codes, second-level absmax) and written (bf16). Then y = x @ W^T for one
    row: lorakit's fused matrix-vector kernel against dequantize + matmul, and bitsandbytes'."""
    import torch

    from lorakit.quant import kernels as registry, nf4

    h, i, kv = (256, 512, 128) if tiny else (4096, 14336, 1024)
    shapes = {"q_proj/o_proj": (h, h), "k_proj/v_proj": (kv, h), "gate/up_proj": (i, h), "down_proj": (h, i)}
    try:
        import bitsandbytes.functional as bnbF
    except ImportError:
        bnbF = None
    rows = []
    for label, (out_f, in_f) in shapes.items():
        n = out_f * in_f
        w = (torch.randn(out_f, in_f, device=device) * 0.02).to(torch.bfloat16)
        packed, state = nf4.quantize_4bit(w, "nf4", 64, True)
        moved = n / 2 + n / 64 + 4 * -(-n // (64 * 256)) + 2 * n  # bytes read + written
        buf = torch.empty(n, dtype=torch.bfloat16, device=device)
        row = {"matrix": label, "shape": [out_f, in_f], "kernel": registry.fast_kernel("dequantize_4bit", device)}
        row["lorakit_ms"] = _time_ms(lambda: nf4.dequantize_4bit(packed, state, torch.bfloat16, out=buf), device)
        row["reference_ms"] = _time_ms(lambda: nf4.dequantize_4bit_reference(packed, state, torch.bfloat16), device, 5)
        ours = nf4.dequantize_4bit(packed, state, torch.bfloat16)
        row["bit_exact_vs_reference"] = bool(torch.equal(ours.view(torch.int16),
                                                         nf4.dequantize_4bit_reference(packed, state).view(torch.int16)))
        if bnbF is not None:
            qp, qs = bnbF.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
            row["bnb_ms"] = _time_ms(lambda: bnbF.dequantize_4bit(qp, qs), device)
            row["same_bytes_as_bnb"] = bool(torch.equal(qp.reshape(-1).cpu(), packed.reshape(-1).cpu()))
            theirs = bnbF.dequantize_4bit(qp, qs)
            row["same_values_as_bnb"] = bool(torch.equal(theirs.view(torch.int16), ours.view(torch.int16)))
        for key in ("lorakit", "reference", "bnb"):
            if f"{key}_ms" in row:
                row[f"{key}_gbs"] = moved / (row[f"{key}_ms"] / 1e3) / 1e9
        x = torch.randn(1, in_f, device=device, dtype=torch.bfloat16)
        fused = registry.dispatch("gemv_4bit", x, packed, state) if device == "cuda" else None
        if fused is not None:
            row["gemv_ms"] = _time_ms(lambda: registry.dispatch("gemv_4bit", x, packed, state), device)
        row["dequant_matmul_ms"] = _time_ms(lambda: x @ nf4.dequantize_4bit(packed, state, torch.bfloat16, out=buf)
                                            .view(out_f, in_f).t(), device)
        if bnbF is not None and device == "cuda":
            import bitsandbytes as bnb

            row["bnb_gemv_ms"] = _time_ms(lambda: bnb.matmul_4bit(x, qp.t(), quant_state=qs), device)
        rows.append(row)
        del w, packed, state, buf
    return {"rows": rows}


# ---- training ----------------------------------------------------------------------------------
def _load_lorakit(folder: str, quantized: bool, device: str):
    import torch

    import lorakit
    from lorakit.train.loop import accumulate_gradients
    from lorakit.train.optim import build_optimizer
    from lorakit.train.setup import prepare_for_training
    from lorakit.train.step import TrainStep

    model, _ = lorakit.load_model(folder, quantization="nf4" if quantized else None, double_quant=True,
                                  compute_dtype="bfloat16", load_tokenizer=False, device=device)
    load_stats = _load_stats(model, device)
    prepare_for_training(model, gradient_checkpointing=True)  # as recipes/finetune.py does, default config
    lorakit.add_lora(model, lorakit.LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                               target_modules="all-linear"))
    train_step = TrainStep(model).train()
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], "adamw_torch", lr=LR)

    def step(batch, n_sup):
        loss, _ = accumulate_gradients(train_step, [batch], n_sup=n_sup)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    del torch
    return step, load_stats


def _load_peer(folder: str, quantized: bool, device: str):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    device_map = {"": 0} if device == "cuda" else "cpu"
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map=device_map, **kwargs)
    load_stats = _load_stats(model, device)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = get_peft_model(model, LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(batch, n_sup):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step, load_stats


def _load_stats(model, device: str) -> dict:
    """Bytes of the loaded model's tensors, host peak RSS so far, GPU peak during the load."""
    import torch

    tensors = list(model.parameters()) + list(model.buffers())
    out = {"model_bytes": sum(t.numel() * t.element_size() for t in tensors), "host_peak_rss": peak_rss_bytes()}
    for module in model.modules():  # bitsandbytes keeps its QuantState tensors outside parameters
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "absmax"):
            out["model_bytes"] += state.absmax.numel() * state.absmax.element_size()
    if device == "cuda":
        torch.cuda.synchronize()
        out["gpu_load_peak_allocated"] = torch.cuda.max_memory_allocated()
        out["gpu_after_load_allocated"] = torch.cuda.memory_allocated()
    return out


def _predict(folder: str, quantized: bool, seq: int, mbs: int, device: str) -> dict:
    from lorakit.memory import Settings, estimate
    from lorakit.memory.estimate import CUDA_CONTEXT_BYTES

    s = Settings(method="qlora" if quantized else "lora", seq_len=seq, batch_size=mbs, rank=LORA["r"],
                 grad_ckpt=True, optimizer="adamw_torch", dtype="bf16", device=device, lora_dropout=LORA["dropout"])
    e = estimate(folder, s)
    # total_bytes adds the CUDA context, which torch's reserved bytes do not include
    context = CUDA_CONTEXT_BYTES if device == "cuda" else 0
    return {"predicted_allocated": e.peak_allocated_bytes, "predicted_total": e.total_bytes,
            "predicted_reserved": e.total_bytes - context}


def train(kind: str, folder: str, seq: int, micro: list[int], steps: int, warmup: int, device: str) -> dict:
    """Load as `kind` does, then per micro-batch size: warm-up and timed optimizer steps (forward,
    backward, AdamW, zero_grad), peak allocated / reserved of those steps (stats reset after load)."""
    import torch

    torch.manual_seed(0)
    quantized = kind.endswith("qlora")
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    loader = _load_lorakit if kind.startswith("lorakit") else _load_peer
    step, load_stats = loader(folder, quantized, device)
    result = {"kind": kind, "load_s": time.perf_counter() - t0, **load_stats, "runs": []}
    vocab = json.loads((Path(folder) / "config.json").read_text())["vocab_size"]
    for mbs in micro:
        run = {"micro_batch": mbs, "seq": seq}
        if kind.startswith("lorakit"):
            run.update(_predict(folder, quantized, seq, mbs, device))
        ids = torch.randint(0, vocab, (mbs, seq), generator=torch.Generator().manual_seed(1)).to(device)
        batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        n_sup = mbs * (seq - 1)
        try:
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            losses = [step(batch, n_sup) for _ in range(warmup)]
            times = []
            for _ in range(steps):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                losses.append(step(batch, n_sup))
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            run.update(step_s=statistics.median(times), step_times=times, tokens_per_s=mbs * seq / statistics.median(times),
                       first_loss=losses[0], last_loss=losses[-1])
            if device == "cuda":
                run.update(peak_allocated=torch.cuda.max_memory_allocated(), peak_reserved=torch.cuda.max_memory_reserved())
        except torch.cuda.OutOfMemoryError as e:
            run["oom"] = str(e).splitlines()[0][:200]
        finally:
            batch = ids = None
        result["runs"].append(run)
    return result


# ---- info --------------------------------------------------------------------------------------
def info(device: str) -> dict:
    import torch

    from lorakit.precision import resolve_dtype

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": device}
    if device == "cuda" and torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        props = torch.cuda.get_device_properties(0)
        out.update(name=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                   sms=props.multi_processor_count, mem_total=total, mem_free=free,
                   auto_dtype=str(resolve_dtype("auto", "cuda")).replace("torch.", ""))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("job", choices=("checkpoint", "kernels", "train", "info"))
    ap.add_argument("args", nargs="*")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if a.job == "checkpoint":
        emit(make_checkpoint(Path(a.args[0]), int(a.args[1]), a.tiny, a.device))
    elif a.job == "kernels":
        emit(kernels(a.device, a.tiny))
    elif a.job == "train":
        emit(train(a.args[0], a.args[1], a.seq, a.micro, a.steps, a.warmup, a.device))
    else:
        emit(info(a.device))


if __name__ == "__main__":
    main()
