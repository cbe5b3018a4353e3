"""One LoRA / QLoRA training step: lorakit vs transformers + PEFT + bitsandbytes, on CPU.

    python bench/bench_step.py --shape small                        # quick run (~2 min)
    python bench/bench_step.py --shape qwen2.5-0.5b --seq 256 1024  # the issue's numbers (long)
    python bench/bench_step.py --kinds lorakit-qlora peer-qlora --gc on off --repeats 2
    python bench/bench_step.py --shape small --profile lorakit-qlora   # torch.profiler table
    python bench/bench_step.py --kernels --threads 1 --compile         # 4-bit kernel throughput

Same checkpoint (random weights in the model's exact shape, written once as bf16 safetensors into
bench/.cache/), same token batch (batch 1, labels = inputs), same LoRA config (r=16, alpha=32,
dropout 0, all-linear), same compute dtype (bf16) and the same optimizer (torch AdamW, lr 2e-4)
on both sides. Kinds:

    lorakit-qlora   lorakit.load_model(nf4, double quant, bf16) + add_lora + accumulate_gradients
    lorakit-lora16  the same with bf16 base weights
    peer-qlora      AutoModelForCausalLM.from_pretrained(BitsAndBytesConfig(nf4, double quant,
                    compute bf16)) + prepare_model_for_kbit_training + get_peft_model
    peer-lora16     from_pretrained(dtype=bf16) + get_peft_model

Each (kind, seq, gradient checkpointing) runs in its own child process, the kinds alternating
(lorakit, peer, lorakit, peer, ...) so load from other processes on a shared CPU hits both alike.
A child imports the libraries its side uses (lorakit: torch, transformers, lorakit; the peer: torch,
transformers, peft, bitsandbytes) and the model class's code (both need it), then loads, runs `--warmup` steps then `--steps` timed steps (forward + backward + optimizer
step + zero_grad) and reports load time, the median step, tokens/s, peak RSS (getrusage
ru_maxrss of the child) and the step's achieved fraction of the machine's matmul throughput,
measured in a separate child on the step's own matmul shapes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KINDS = ("lorakit-qlora", "peer-qlora", "lorakit-lora16", "peer-lora16")
LORA = dict(r=16, alpha=32, dropout=0.0)
LR = 2e-4


# ---- children ------------------------------------------------------------------------------
def load_lorakit(folder: str, quantized: bool, gc: bool):
    import torch

    import lorakit
    from lorakit.train.optim import build_optimizer

    model, _ = lorakit.load_model(folder, quantization="nf4" if quantized else None, double_quant=True,
                                  compute_dtype="bfloat16", load_tokenizer=False, device="cpu")
    from lorakit.train.loop import accumulate_gradients
    from lorakit.train.setup import prepare_for_training
    from lorakit.train.step import TrainStep

    prepare_for_training(model, gradient_checkpointing=gc)  # as recipes/finetune.py does, default config
    lorakit.add_lora(model, lorakit.LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                               target_modules="all-linear"))
    train_step = TrainStep(model).train()  # forward + loss, the module the loop calls
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, "adamw_torch", lr=LR)

    def step(batch):
        loss, _ = accumulate_gradients(train_step, [batch])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    del torch
    return model, step


def load_peer(folder: str, quantized: bool, gc: bool):
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs = {}
    if quantized:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, device_map="cpu", **kwargs)
    if quantized:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gc,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gc:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                        target_modules="all-linear", task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)

    def step(batch):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return model, step


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    shape = C.SHAPES[args.shape]
    if args.kind == "matmul":
        tokens = args.seq[0]
        C.emit({"kind": "matmul", "seq": tokens, **C.matmul_throughput(tokens, shape)})
        return
    folder = str(C.make_checkpoint(args.shape))
    seq, gc = args.seq[0], args.gc[0] == "on"
    import transformers  # noqa: F401

    # Each side imports what its own training process uses, before the load timer starts: a lorakit
    # process never loads peft or bitsandbytes (importing peft alone adds ~150 MB of RSS here).
    if args.kind.startswith("lorakit"):
        import lorakit  # noqa: F401
    else:
        import bitsandbytes  # noqa: F401
        import peft  # noqa: F401
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]  # the model code both sides import
    torch.manual_seed(0)
    t0 = time.perf_counter()
    loader = load_lorakit if args.kind.startswith("lorakit") else load_peer
    model, step = loader(folder, quantized=args.kind.endswith("qlora"), gc=gc)
    load_s = time.perf_counter() - t0
    rss_loaded = C.current_rss_mb()
    ids = torch.randint(0, shape["vocab_size"], (1, seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    if args.profile:
        return profile(step, batch, args)
    losses, times = [], []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        losses.append(step(batch))
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    C.emit({"kind": args.kind, "seq": seq, "gc": gc, "load_s": load_s, "step_s": statistics.median(times),
            "step_times": times, "peak_rss_mb": C.peak_rss_mb(), "rss_after_load_mb": rss_loaded,
            "first_loss": losses[0], "last_loss": losses[-1]})


def profile(step, batch, args) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    for _ in range(args.warmup):
        step(batch)
    with torch_profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        step(batch)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    C.emit({"kind": args.kind, "profiled": True})


def kernel_speed(threads: int, compile_too: bool) -> None:
    """G weights/s of 4-bit dequantize (to bf16) and quantize (from bf16), NF4 + double quant, one
    [4864, 896] matrix (Qwen2.5-0.5B's MLP): lorakit reference, registered kernels, bitsandbytes,
    and optionally torch.compile of the reference (compile time printed too)."""
    import torch

    from lorakit.quant import kernels, nf4

    torch.set_num_threads(threads)
    w = (torch.randn(4864, 896) * 0.02).to(torch.bfloat16)
    packed, state = nf4.quantize_4bit_reference(w)
    n = w.numel()

    def speed(fn, reps=5):
        fn()
        best = min(C.timed(fn) for _ in range(reps))
        return n / best / 1e9

    rows = [("dequantize", "reference", speed(lambda: nf4.dequantize_4bit_reference(packed, state, torch.bfloat16), 3)),
            ("quantize", "reference", speed(lambda: nf4.quantize_4bit_reference(w), 2))]
    for k in kernels.kernels("dequantize_4bit"):
        rows.append(("dequantize", k.name, speed(lambda: k.fn(packed, state, torch.bfloat16))))
    for k in kernels.kernels("quantize_4bit"):
        rows.append(("quantize", k.name, speed(lambda: k.fn(w, "nf4", 64, True))))
    try:
        import bitsandbytes.functional as F

        qp, qs = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
        rows.append(("dequantize", "bitsandbytes", speed(lambda: F.dequantize_4bit(qp, qs))))
        rows.append(("quantize", "bitsandbytes", speed(lambda: F.quantize_4bit(
            w, blocksize=64, compress_statistics=True, quant_type="nf4"), 2)))
    except ImportError:
        pass
    if compile_too:
        t = time.perf_counter()
        fn = torch.compile(nf4.dequantize_4bit_reference, dynamic=False)
        fn(packed, state, torch.bfloat16)
        rows.append(("dequantize", f"torch.compile (compile {time.perf_counter() - t:.0f} s)",
                     speed(lambda: fn(packed, state, torch.bfloat16))))
    for op, name, gws in rows:
        print(f"{op:<11} {name:<32} {gws:8.3f} G weights/s  ({threads} threads)")


# ---- parent --------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(C.SHAPES), default="small")
    ap.add_argument("--seq", type=int, nargs="+", default=[256])
    ap.add_argument("--gc", choices=("on", "off"), nargs="+", default=["on"],
                    help="gradient checkpointing (the peer's prepare_model_for_kbit_training default is on)")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--repeats", type=int, default=2, help="child processes per configuration, alternating")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lorakit-kernels", choices=("auto", "reference"), default="auto",
                    help="LORAKIT_KERNELS for the lorakit children (reference = plain-PyTorch 4-bit kernels)")
    ap.add_argument("--json", help="also write every child's result to this file")
    ap.add_argument("--profile", choices=KINDS, help="print a torch.profiler table for one step of this kind")
    ap.add_argument("--kernels", action="store_true", help="only time the 4-bit (de)quantize kernels")
    ap.add_argument("--compile", action="store_true", help="with --kernels: also time torch.compile")
    ap.add_argument("--child", dest="kind", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind:
        return child(args)
    if args.kernels:
        return kernel_speed(args.threads, args.compile)
    C.make_checkpoint(args.shape)
    common = ["--shape", args.shape, "--threads", str(args.threads), "--steps", str(args.steps),
              "--warmup", str(args.warmup)]
    if args.profile:
        import subprocess

        subprocess.run([sys.executable, __file__, "--child", args.profile, "--profile", args.profile,
                        "--seq", str(args.seq[0]), "--gc", args.gc[0], *common], check=True)
        return None
    results = []
    for seq in args.seq:
        mm = C.run_child(__file__, ["--child", "matmul", "--seq", str(seq), *common], args.threads)
        print(f"matmul throughput at T={seq}: bf16 {mm['bf16']:.0f} GFLOP/s, fp32 {mm['fp32']:.0f} GFLOP/s", flush=True)
        results.append(mm)
        for gc in args.gc:
            for rep in range(args.repeats):
                for kind in args.kinds:  # alternating
                    r = C.run_child(__file__, ["--child", kind, "--seq", str(seq), "--gc", gc, *common], args.threads,
                                    extra_env={"LORAKIT_KERNELS": args.lorakit_kernels})
                    print(f"  {kind:<15} T={seq:<5} gc={gc:<3} load {r['load_s']:6.1f} s  step {r['step_s']:6.2f} s  "
                          f"peak RSS {r['peak_rss_mb']:7.0f} MB  loss {r['first_loss']:.3f}->{r['last_loss']:.3f}",
                          flush=True)
                    results.append(r)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    report(results, args)


def report(results: list[dict], args) -> None:
    shape = C.SHAPES[args.shape]
    print(f"\nshape {args.shape}, batch 1, {args.threads} threads; best of {args.repeats} children "
          f"(each: median of {args.steps} steps after {args.warmup} warm-up)")
    head = f"{'kind':<15}{'T':>6}{'gc':>4}{'load s':>8}{'step s':>8}{'tok/s':>8}{'RSS MB':>8}{'%bf16':>7}{'%fp32':>7}"
    print(head + f"{'  lorakit/peer: step':>20}{'RSS':>6}{'load':>6}")
    for seq in args.seq:
        mm = next(r for r in results if r["kind"] == "matmul" and r["seq"] == seq)
        flops = C.useful_flops(shape, seq, seq)["flops"]
        for gc in (g == "on" for g in args.gc):
            best = {}
            for kind in args.kinds:
                rs = [r for r in results if r["kind"] == kind and r["seq"] == seq and r["gc"] == gc]
                best[kind] = {"load_s": min(r["load_s"] for r in rs), "step_s": min(r["step_s"] for r in rs),
                              "peak_rss_mb": min(r["peak_rss_mb"] for r in rs)}
            for kind, b in best.items():
                achieved = flops / b["step_s"] / 1e9
                line = (f"{kind:<15}{seq:>6}{'on' if gc else 'off':>4}{b['load_s']:>8.1f}{b['step_s']:>8.2f}"
                        f"{seq / b['step_s']:>8.0f}{b['peak_rss_mb']:>8.0f}{100 * achieved / mm['bf16']:>6.0f}%"
                        f"{100 * achieved / mm['fp32']:>6.0f}%")
                peer = best.get(kind.replace("lorakit", "peer")) if kind.startswith("lorakit") else None
                if peer:
                    line += (f"{b['step_s'] / peer['step_s']:>18.2f}x{b['peak_rss_mb'] / peer['peak_rss_mb']:>5.2f}x"
                             f"{b['load_s'] / peer['load_s']:>5.2f}x")
                print(line)
    print("\nuseful FLOPs per step (4 x matmul params x tokens + LoRA + attention; no recomputation): "
          + ", ".join(f"T={s}: {C.useful_flops(shape, s, s)['flops'] / 1e9:.0f} GFLOP" for s in args.seq))


if __name__ == "__main__":
    main()
