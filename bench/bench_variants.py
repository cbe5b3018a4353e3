"""LoRA variants side by side: quality at a fixed step budget, step time and peak memory.

    python bench/bench_variants.py                                  # everything (~40 min on 2 busy cores)
    python bench/bench_variants.py --tasks demo --methods lora,dora --ranks 8 --steps 60 --parts quality
    python bench/bench_variants.py --parts speed                    # step time + memory only (~3 min)

Quality (`--parts quality`): on the shipped demo model (lorakit/assets/demo, a 3.4M Llama), for
each task, method and rank, one `lorakit train` run (recipes/finetune.py) with the same data,
split, seed and step budget, then greedy exact match on 120 held-out rows with the best
validation adapter (what `lorakit demo` does). Tasks, both made from the shipped data:

    demo  the shipped task: "Describe the person in one sentence." -> "tina lives in boston."
    full  harder, from the same records: "Describe the person and their pet in one sentence."
          -> "tina lives in boston and has a blue cat." (four look-ups joined, two of which the
          base model is weaker at; responses 9-10 tokens)

Run settings (the demo's, assets/demo/README.md): all-linear targets, alpha = 2r, dropout 0, AdamW
lr 2e-3, 10 warmup steps then cosine, micro-batch 16, 64 validation rows, seed 0, precision auto.
A method is `lorakit sweep --method` syntax (config.with_method): lora, rslora, dora, pissa, and
each on the 4-bit base (qlora, qlora+rslora, qlora+dora, qlora+pissa).

Speed and memory (`--parts speed`): per method and rank, on the demo model's shape and on a larger
random Qwen2 (`--speed-shapes`), the fastest of `--timed` training steps (forward + backward +
AdamW step) on one fixed batch after 3 warm-up steps, best of `--rounds` rounds with the methods
interleaved (a shared CPU only ever adds time), and the peak of live tensor bytes over 2
steps measured by lorakit/memory/measure.py (torch.profiler allocator events, random weights of
the same shape) next to the planner's prediction. Ratios are against plain LoRA on the same base
(16-bit: lora; 4-bit: qlora) at the same rank.

Layer (`--parts layer`): one 2048 x 5632 layer alone (bf16 and NF4 base), forward + backward of
LoRA vs DoRA and DoRA's weight norm by itself, fastest of 20: the cost of the norm's extra base
forward on A (for a 4-bit base, one more dequantize).

Writes <out>/results.json and prints Markdown tables (pasted into docs/methods.md).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import lorakit
from lorakit.config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from lorakit.methods import with_method
from lorakit.recipes.demo import ASSETS, MAX_NEW_TOKENS, N_TEST

METHODS = ["lora", "rslora", "dora", "pissa", "qlora", "qlora+rslora", "qlora+dora", "qlora+pissa"]
SPEED_SHAPES = {
    "demo": None,  # the shipped model's own config
    "qwen2-512x6": dict(model_type="qwen2", hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                        num_attention_heads=8, num_key_value_heads=2, vocab_size=8000, max_position_embeddings=512,
                        tie_word_embeddings=False),
}


# ---------------------------------------------------------------- tasks


def _record(context: str) -> dict:
    return dict(part.split(": ", 1) for part in context.split(", "))


def write_tasks(out: Path) -> dict:
    """{task: (train file, test file)}; 'full' is rebuilt from the shipped records."""
    tasks = {"demo": (ASSETS / "train.jsonl", ASSETS / "test.jsonl")}
    folder = out / "tasks"
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (ASSETS / f"{split}.jsonl").read_text().splitlines() if line.strip()]
        full = []
        for row in rows:
            r = _record(row["context"])
            full.append({"instruction": "Describe the person and their pet in one sentence.", "context": row["context"],
                         "response": f"{r['name']} lives in {r['city']} and has a {r['color']} {r['pet']}."})
        path = folder / f"full_{split}.jsonl"
        path.write_text("".join(json.dumps(x) + "\n" for x in full))
        files.append(path)
    tasks["full"] = tuple(files)
    return tasks


# ---------------------------------------------------------------- quality


def run_config(train_file: Path, out: Path, r: int, steps: int, method: str) -> RunConfig:
    cfg = RunConfig(
        model=ModelConfig(name_or_path=str(ASSETS / "model")),
        lora=LoraConfig(r=r, alpha=2.0 * r, dropout=0.0, target_modules="all-linear"),
        data=DataConfig(path=str(train_file), format="dolly", template="alpaca_short", val_size=64, max_seq_len=128),
        train=TrainConfig(output_dir=str(out), max_steps=steps, micro_batch_size=16, lr=2e-3, warmup_steps=10,
                          schedule="cosine", eval_every=max(1, steps // 4), save_every=steps, keep_last=1, seed=0,
                          log_every=10),
    )
    return with_method(cfg, method)


def quality(task: str, files: tuple, method: str, r: int, steps: int, out: Path) -> dict:
    from lorakit.data import load_records
    from lorakit.recipes.finetune import finetune
    from lorakit.recipes.generate import exact_match, generate, prompt_and_answer

    cfg = run_config(files[0], out / "runs" / f"{task}-r{r}-{method}", r, steps, method)
    res = finetune(cfg, progress=False, overwrite=True)
    model, tokenizer = res.model, res.tokenizer
    if res.result.best_step is not None:
        lorakit.load_adapter(model, res.result.run_dir / "best_adapter")
    rows = load_records(str(files[1]))[:N_TEST]
    pairs = [prompt_and_answer(row, "dolly", tokenizer, cfg.data.template) for row in rows]
    preds = [a.strip() for a in generate(model.eval(), tokenizer, [p for p, _ in pairs], MAX_NEW_TOKENS, batch_size=32)]
    em = exact_match(preds, [a for _, a in pairs])
    return {"task": task, "method": method, "r": r, "steps": res.result.steps, "best_val_loss": res.result.best_val_loss,
            "exact_match": em, "train_seconds": res.result.seconds}


# ---------------------------------------------------------------- speed and memory


def _shape_config(shape: str) -> dict:
    if SPEED_SHAPES[shape] is not None:
        return dict(SPEED_SHAPES[shape])
    raw = json.loads((ASSETS / "model" / "config.json").read_text())
    keep = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "rms_norm_eps")
    return {k: raw[k] for k in keep if k in raw}


def _settings(method: str, r: int, seq: int, batch: int, dtype: str):
    from lorakit.memory.estimate import Settings

    cfg = with_method(RunConfig(lora=LoraConfig(r=r)), method)
    return Settings("qlora" if cfg.model.quantization else "lora", seq, batch, rank=r, dtype=dtype, device="cpu",
                    use_dora=cfg.lora.use_dora, residual_init=cfg.lora.residual_init), cfg


def step_time(shape: str, method: str, r: int, seq: int, batch: int, dtype: str, timed: int, workdir: Path) -> float:
    """The fastest of `timed` training steps after 3 warm-up steps (the minimum: on a shared CPU
    other processes only ever add time)."""
    from lorakit.lora.init import weight_preparer
    from lorakit.memory.measure import save_random_checkpoint
    from lorakit.train.loop import accumulate_gradients
    from lorakit.train.optim import build_optimizer, param_groups
    from lorakit.train.setup import FastPaths, prepare_for_training
    from lorakit.train.step import TrainStep

    config = _shape_config(shape)
    _, cfg = _settings(method, r, seq, batch, dtype)
    folder = save_random_checkpoint(config, workdir / f"ckpt-{shape}-{dtype}",
                                    {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype])
    lora = replace(cfg.lora, alpha=2.0 * r, target_modules="all-linear")
    model, _ = lorakit.load_model(str(folder), quantization=cfg.model.quantization, compute_dtype=dtype,
                                  load_tokenizer=False, prepare=weight_preparer(lora))
    prepare_for_training(model, False, FastPaths())
    lorakit.add_lora(model, lora)
    step = TrainStep(model).train()
    opt = build_optimizer(param_groups(model, 1e-4), "adamw_torch", lr=1e-4)
    ids = torch.randint(3, config["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    batch_ = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
    times = []
    for _ in range(3 + timed):
        t0 = time.perf_counter()
        accumulate_gradients(step, [batch_])
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return min(times[3:])


def memory(shape: str, method: str, r: int, seq: int, batch: int, dtype: str, workdir: Path) -> tuple[int, int]:
    """(measured peak live bytes over 2 steps, the planner's prediction)."""
    from lorakit.memory.estimate import estimate
    from lorakit.memory.measure import MeasureCase, build_hf_config, measure_case

    config = _shape_config(shape)
    s, _ = _settings(method, r, seq, batch, dtype)
    measured = measure_case(MeasureCase(f"{shape}-{method}-r{r}", config, s), device="cpu", workdir=workdir).peak_bytes
    return measured, estimate(build_hf_config(config), s).peak_allocated_bytes


def layer_cost(base_kind: str, in_f: int, out_f: int, tokens: int, r: int, reps: int) -> dict:
    """One adapted layer alone, bf16: forward + backward of LoRA vs DoRA, and DoRA's norm by itself
    (the fastest of `reps`), to see what the norm's extra base forward on A costs (a 4-bit base
    dequantizes for it)."""
    from lorakit.lora.layer import LoRALinear
    from lorakit.quant.linear4bit import Linear4bit

    torch.manual_seed(0)
    dense = torch.nn.Linear(in_f, out_f, bias=False).to(torch.bfloat16)
    base = Linear4bit.from_linear(dense, compute_dtype=torch.bfloat16) if base_kind == "nf4" else dense
    x = torch.randn(tokens, in_f, dtype=torch.bfloat16, requires_grad=True)

    def best(fn):
        times = []
        for _ in range(3 + reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times[3:])

    out = {"base": base_kind, "shape": f"{in_f}x{out_f}", "tokens": tokens, "r": r}
    for dora in (False, True):
        layer = LoRALinear(base, r, 2.0 * r, use_dora=dora)
        out["dora_s" if dora else "lora_s"] = best(lambda: layer(x).sum().backward())
        if dora:
            out["norm_s"] = best(layer.dora_norm)
    return out


# ---------------------------------------------------------------- tables


def _baseline(method: str) -> str:
    return "qlora" if method.startswith("qlora") else "lora"


def quality_table(rows: list[dict]) -> str:
    out = ["| task | method | r | exact match | best val loss | train s |", "|---|---|---:|---:|---:|---:|"]
    for x in rows:
        out.append(f"| {x['task']} | {x['method']} | {x['r']} | {100 * x['exact_match']:.1f}% | "
                   f"{x['best_val_loss']:.4f} | {x['train_seconds']:.0f} |")
    return "\n".join(out)


def speed_table(rows: list[dict]) -> str:
    index = {(x["shape"], x["method"], x["r"]): x for x in rows}
    out = ["| shape | method | r | step ms | x plain | peak MiB (predicted) | x plain |", "|---|---|---:|---:|---:|---:|---:|"]
    for x in rows:
        base = index.get((x["shape"], _baseline(x["method"]), x["r"]), x)
        out.append(f"| {x['shape']} | {x['method']} | {x['r']} | {1000 * x['step_s']:.0f} | "
                   f"{x['step_s'] / base['step_s']:.2f} | {x['peak_bytes'] / 2**20:.1f} ({x['predicted_bytes'] / 2**20:.1f}) | "
                   f"{x['peak_bytes'] / base['peak_bytes']:.2f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="/tmp/lorakit-bench-variants", help="work folder (runs, task files, results.json)")
    p.add_argument("--parts", nargs="+", default=["quality", "speed", "layer"], choices=["quality", "speed", "layer"])
    p.add_argument("--tasks", default="demo,full")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ranks", default="8,16")
    p.add_argument("--steps", default="demo=150,full=300",
                   help="optimizer steps per run of each task (task=N,...; or one N for all), the same for every method")
    p.add_argument("--speed-shapes", default=",".join(SPEED_SHAPES))
    p.add_argument("--seq", type=int, default=48, help="tokens per row in the speed part (demo rows: ~45)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"], help="compute dtype of the speed part")
    p.add_argument("--timed", type=int, default=10, help="timed steps per round (the fastest counts)")
    p.add_argument("--rounds", type=int, default=3, help="speed rounds over all methods, interleaved (the fastest counts)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (tiny matrices: 1 is fastest on a busy CPU)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    results = json.loads(results_file.read_text()) if results_file.is_file() else {"quality": [], "speed": []}
    methods, ranks = args.methods.split(","), [int(r) for r in args.ranks.split(",")]
    steps = ({k: int(v) for k, v in (x.split("=") for x in args.steps.split(","))} if "=" in args.steps
             else {t: int(args.steps) for t in args.tasks.split(",")})

    def save():
        results_file.write_text(json.dumps(results, indent=1) + "\n")

    if "quality" in args.parts:
        tasks = write_tasks(out)
        for task in args.tasks.split(","):
            for r in ranks:
                for method in methods:
                    row = quality(task, tasks[task], method, r, steps[task], out)
                    results["quality"] = [x for x in results["quality"] if (x["task"], x["method"], x["r"]) != (task, method, r)]
                    results["quality"].append(row)
                    save()
                    print(json.dumps(row), flush=True)
        print(quality_table([x for x in results["quality"] if x["method"] in methods]))
    if "speed" in args.parts:
        for shape in args.speed_shapes.split(","):
            for r in ranks:
                best: dict = {}
                for _ in range(args.rounds):  # methods interleaved, so load from other processes hits all alike
                    for method in methods:
                        t = step_time(shape, method, r, args.seq, args.batch, args.dtype, args.timed, out)
                        best[method] = min(best.get(method, t), t)
                for method in methods:
                    peak, predicted = memory(shape, method, r, args.seq, args.batch, args.dtype, out)
                    row = {"shape": shape, "method": method, "r": r, "step_s": best[method], "peak_bytes": peak,
                           "predicted_bytes": predicted}
                    results["speed"] = [x for x in results["speed"] if (x["shape"], x["method"], x["r"]) != (shape, method, r)]
                    results["speed"].append(row)
                    save()
                    print(json.dumps(row), flush=True)
        print(speed_table([x for x in results["speed"] if x["method"] in methods]))
    if "layer" in args.parts:
        rows = []
        for base_kind in ("bf16", "nf4"):
            for r in ranks:
                row = layer_cost(base_kind, 2048, 5632, args.batch * args.seq, r, 20)
                rows.append(row)
                print(json.dumps(row), flush=True)
        results["layer"] = rows
        save()
        print("| base | layer | tokens | r | LoRA fwd+bwd ms | DoRA fwd+bwd ms | x | DoRA norm ms |\n|---|---|---:|---:|---:|---:|---:|---:|")
        for x in rows:
            print(f"| {x['base']} | {x['shape']} | {x['tokens']} | {x['r']} | {1000 * x['lora_s']:.1f} | "
                  f"{1000 * x['dora_s']:.1f} | {x['dora_s'] / x['lora_s']:.2f} | {1000 * x['norm_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
