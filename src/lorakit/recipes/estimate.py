"""`lorakit estimate`: will this run fit on my GPU? A table of memory components, or --fit BUDGET.

    lorakit estimate --model llama-2-7b --method qlora --seq-len 512 --batch-size 1
    lorakit estimate --model ./my-model --method lora --fit 15GiB --json
"""

from __future__ import annotations

import argparse
import json
import re

from ..config import OPTIMIZERS
from ..memory.estimate import COMPONENTS, DTYPES, METHODS, Estimate, Settings, estimate
from ..memory.planner import ckpt_label, fit, format_bytes, parse_size, smallest
from ..memory.shapes import gpu_table, resolve_shape

_NOTES = {
    "frozen_weights": "base weights (4-bit codes + absmax + double-quant tables for QLoRA), embeddings, norms",
    "trainable_weights": "LoRA A/B (fp32), or every weight as fp32 master copy for full",
    "gradients": "one per trainable weight, same dtype",
    "optimizer_state": "AdamW moments (8-bit: codes + absmax per 256; paged: on the host)",
    "activations": "saved for backward (with checkpointing: layer inputs only)",
    "logits_loss": "fp32 logits, log-softmax and grads of one loss chunk",
    "workspace": "backward buffers, dequantized 4-bit weight, recomputed layer (beyond the loss buffers)",
    "runtime_overhead": "CUDA context + 10% allocator fragmentation margin",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The `lorakit estimate` flags."""
    parser.add_argument("--model", required=True, help="built-in name (e.g. llama-2-7b), local folder or config.json, or hub id")
    parser.add_argument("--method", choices=METHODS, default="qlora", help="full, lora or qlora (default qlora)")
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row, all supervised (default 512)")
    parser.add_argument("--batch-size", type=int, default=1, help="micro-batch size (default 1)")
    parser.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step; --fit keeps batch-size x grad-accum")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    parser.add_argument("--targets", default="all-linear",
                        help="all-linear, a regex, or comma-separated module names (q_proj,v_proj)")
    parser.add_argument("--grad-ckpt", action=argparse.BooleanOptionalAction, default=False,
                        help="gradient checkpointing (default off)")
    parser.add_argument("--ckpt-replay", action=argparse.BooleanOptionalAction, default=True,
                        help="with --grad-ckpt and (q)lora: keep and replay the small frozen outputs (default on; "
                             "model.checkpoint_replay)")
    parser.add_argument("--lean-activations", action=argparse.BooleanOptionalAction, default=True,
                        help="gated MLPs keep only their gate and up outputs for backward, RMSNorms their "
                             "input as it is (default on; model.lean_activations)")
    parser.add_argument("--dora", action=argparse.BooleanOptionalAction, default=False,
                        help="DoRA (lora.use_dora): magnitudes and each adapted layer's direction output (default off)")
    parser.add_argument("--residual-init", action=argparse.BooleanOptionalAction, default=False,
                        help="lora.init pissa/olora: the initial A0 / B0 kept per layer (default off)")
    parser.add_argument("--objective", choices=("sft", "dpo", "orpo"), default="sft",
                        help="sft, or dpo / orpo: each of --batch-size pairs is 2 rows (chosen, rejected); dpo adds a "
                             "no-grad reference pass (default sft)")
    parser.add_argument("--precompute-ref", action="store_true", help="dpo with train.precompute_ref_logps")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw_torch")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="compute dtype (default bf16)")
    parser.add_argument("--loss-chunk-size", type=int, default=1024, help="rows per cross-entropy chunk (default 1024)")
    parser.add_argument("--attn", choices=("sdpa", "eager"), default=None, help="attention implementation (default: the model's)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="where it trains (default cuda)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) of a distributed run: the estimate is per GPU")
    parser.add_argument("--strategy", choices=("ddp", "fsdp2"), default="ddp",
                        help="with --gpus N: ddp (every GPU holds the base) or fsdp2 (the base sharded); --fit also tries fsdp2")
    parser.add_argument("--fit", default=None, metavar="BUDGET", help="list settings that fit BUDGET per GPU (e.g. 15GiB, 24GB)")
    parser.add_argument("--generate", type=int, default=None, metavar="BATCH",
                        help="also show what generating for BATCH prompts of --seq-len tokens costs beyond the weights "
                             "(KV cache, prefill, logits; memory/generation.py)")
    parser.add_argument("--new-tokens", type=int, default=64, help="with --generate: tokens generated per prompt (default 64)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def settings_from_args(args: argparse.Namespace) -> Settings:
    targets = args.targets
    if targets != "all-linear" and ("," in targets or re.fullmatch(r"[\w.]+", targets)):  # names, not a regex
        targets = tuple(t.strip() for t in targets.split(",") if t.strip())
    return Settings(method=args.method, seq_len=args.seq_len, batch_size=args.batch_size, rank=args.rank,
                    targets=targets, grad_ckpt=args.grad_ckpt, ckpt_replay=args.ckpt_replay, lean_activations=args.lean_activations, optimizer=args.optimizer, dtype=args.dtype,
                    loss_chunk_size=args.loss_chunk_size, device=args.device, attn_impl=args.attn or "",
                    world_size=args.gpus, strategy=args.strategy, use_dora=args.dora,
                    residual_init=args.residual_init, objective=args.objective, precompute_ref=args.precompute_ref)


def format_table(est: Estimate) -> str:
    s = est.settings
    size = f"{est.n_params / 1e9:.2f}B" if est.n_params >= 1e9 else f"{est.n_params / 1e6:.2f}M"
    lines = [f"{est.model}: {s.method}, {size} params ({est.trainable_params:,} trainable), "
             f"seq {s.seq_len} x batch {s.batch_size}"
             + (f" pairs ({2 * s.batch_size} rows{', + reference pass' if s.objective == 'dpo' and not s.precompute_ref else ''})"
                if s.objective != "sft" else "") + f", r={s.rank}, {s.dtype}, {s.optimizer}, "
             f"grad-ckpt {ckpt_label(s)}, attention {est.details['attn_impl']}"
             + (f"; per GPU of {s.world_size} ({s.strategy})" if s.world_size > 1 else ""), ""]
    lines.append(f"{'component':<20} {'memory':>12}  what")
    for name in COMPONENTS:
        lines.append(f"{name:<20} {format_bytes(est.components[name]):>12}  {_NOTES[name]}")
    lines.append(f"{'peak allocated':<20} {format_bytes(est.peak_allocated_bytes):>12}  (what torch.cuda.max_memory_allocated reads)")
    lines.append(f"{'total':<20} {format_bytes(est.total_bytes):>12}")
    lines.append("")
    fits = [f"{gpu} {'yes' if est.total_bytes <= cap else 'no'}" for gpu, cap in gpu_table().items()]
    lines.append("fits: " + ", ".join(fits))
    return "\n".join(lines)


def format_html(est: Estimate) -> str:
    """format_table as an HTML fragment (lorakit.estimate's table in a notebook cell)."""
    from html import escape

    from ..report.html import html_table

    title = format_table(est).split("\n", 1)[0]
    rows = [(name, format_bytes(est.components[name]), _NOTES[name]) for name in COMPONENTS]
    rows += [("peak allocated", format_bytes(est.peak_allocated_bytes), "what torch.cuda.max_memory_allocated reads"),
             ("total", format_bytes(est.total_bytes), "what must fit")]
    fits = html_table(["GPU", "memory", "fits"], [(gpu, format_bytes(cap), "yes" if est.total_bytes <= cap else "no")
                                                  for gpu, cap in gpu_table().items()])
    return f"<div><p>{escape(title)}</p>{html_table(['component', 'memory', 'what'], rows)}{fits}</div>"


def _fit_report(model, s: Settings, budget: int, effective: int, as_json: bool) -> tuple[str, int]:
    options = fit(model, s, budget, effective)
    if as_json:
        floor = smallest(model, s) if not options else None
        data = {"budget_bytes": budget, "fits": bool(options),
                "options": [{"changes": o.changes, "cost": o.cost, "micro_batch_size": o.settings.batch_size,
                             "grad_accum": o.grad_accum, "seq_len": o.settings.seq_len, "method": o.settings.method,
                             "optimizer": o.settings.optimizer, "grad_ckpt": o.settings.grad_ckpt,
                             "ckpt_replay": o.settings.ckpt_replay,
                             "total_bytes": o.predicted_bytes} for o in options],
                "smallest_total_bytes": floor.total_bytes if floor else None}
        return json.dumps(data, indent=2), 0 if options else 1
    if not options:
        floor = smallest(model, s)
        fs = floor.settings
        return (f"does not fit in {format_bytes(budget)}, even with micro-batch 1, {fs.method}, {fs.optimizer}, "
                f"gradient checkpointing {ckpt_label(fs)} and seq_len {fs.seq_len}: "
                f"that needs {format_bytes(floor.total_bytes)}"), 1
    lines = [f"fits in {format_bytes(budget)} (cheapest change first):"]
    lines += [f"  {i + 1}. {o.describe()}" for i, o in enumerate(options)]
    return "\n".join(lines), 0


def main(args: argparse.Namespace) -> int:
    """Print the estimate (or the --fit plan); returns the exit code (1: nothing fits)."""
    try:
        s = settings_from_args(args)
        model = resolve_shape(args.model)
        if args.fit:
            text, code = _fit_report(model, s, parse_size(args.fit), args.batch_size * args.grad_accum, args.json)
            print(text)
            return code
        est = estimate(model, s)
    except ValueError as e:
        print(f"lorakit estimate: {e}")
        return 2
    gen = None
    if args.generate:
        from ..memory.generation import generation_bytes

        gen = generation_bytes(resolve_shape(model), args.generate, s.seq_len, args.new_tokens, s.compute_bytes,
                               s.method == "qlora")
    if args.json:
        print(json.dumps({**est.to_dict(), **({"generation": gen} if gen else {})}, indent=2, default=str))
        return 0
    print(format_table(est))
    if gen:
        print(f"\ngeneration, {args.generate} prompts x {s.seq_len} tokens + {args.new_tokens} new: "
              f"{format_bytes(gen['total'])} beyond the weights ("
              + ", ".join(f"{k.replace('_', ' ')} {format_bytes(v)}" for k, v in gen.items() if k != "total") + ")")
    return 0
