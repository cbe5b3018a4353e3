"""`lorakit quant-report`: what 4-bit storage does to one model, to choose between LoRA and QLoRA.

    lorakit quant-report --model PATH [--methods nf4,fp4,int4] [--blocksize 64]
                         [--double-quant | --no-double-quant] [--text FILE] [--max-tokens 512] [--json]
                         [--pissa-rank R [--init pissa|pissa_niter_N|olora]]

Loads the model in 16 bits (computed in fp32 by default, so the 16-bit weights are exact), then for
each method quantizes a copy of every linear layer but the output head and reports, via
lorakit.quant.report: per-layer and total weight reconstruction error, bits per stored weight,
KL(16-bit || 4-bit) of the next-token distributions and the perplexity change on a sample text
(the built-in one below unless --text), plus the memory the quantized layers take in each format.

With --pissa-rank R it also reports QLoRA + PiSSA (lora.init pissa/olora with a 4-bit base): each
layer keeps its principal rank-R part exactly (s B0 A0, lora/init.py) and only the residual
W - s B0 A0 is quantized, so the weight error is ||W_res - Q(W_res)|| instead of ||W - Q(W)||;
relative errors are taken against ||W|| in both tables, so the numbers compare directly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

from ..quant.report import METHODS

# A short, neutral English sample (written for lorakit) so the report runs without any download.
SAMPLE_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. "
    "In spring the water is high and brown with mud from the hills; by late summer it is clear "
    "enough to see the fish that wait in the shade of the willows. The miller's family kept a "
    "record of every flood for more than a hundred years, written in a ledger that now sits in "
    "the town library. Visitors can read it on weekday mornings. Most entries are short: a date, "
    "the height of the water against a mark on the wall, and a note about the damage. A few are "
    "longer and tell of nights spent carrying sacks of grain to the upper floor while the wheel "
    "turned faster than it ever did in normal work. Today the mill grinds flour again for a small "
    "bakery, and children from the school come to watch the wheel and ask how the gears work."
)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", required=True, help="model folder (config.json + *.safetensors + tokenizer) or hub id")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated 4-bit formats to compare, from {', '.join(METHODS)} (default: all)")
    parser.add_argument("--blocksize", type=int, default=64, help="weights per absmax scale (default 64, as QLoRA)")
    parser.add_argument("--double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="quantize the block scales again in 8 bits (QLoRA's double quantization; default on)")
    parser.add_argument("--text", default=None, help="UTF-8 text file to measure KL and perplexity on "
                                                     "(default: a built-in English paragraph)")
    parser.add_argument("--max-tokens", type=int, default=512, help="tokens of the text to use (default 512)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                        help="compute dtype of the reference model (default fp32: exact 16-bit weights)")
    parser.add_argument("--per-layer", action=argparse.BooleanOptionalAction, default=True,
                        help="print the per-layer error table (default on; JSON always has it)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    parser.add_argument("--pissa-rank", type=int, default=0, metavar="R",
                        help="also report QLoRA + PiSSA: the rank-R principal part kept exact, only the residual "
                             "quantized (the LoRA rank you would train with; default 0 = off)")
    parser.add_argument("--init", default="pissa", help="the residual init for --pissa-rank: pissa, pissa_niter_N or "
                                                        "olora (as lora.init; default pissa)")
    return parser


def parse_methods(spec: str) -> list[str]:
    methods = [m.strip() for m in spec.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise ValueError(f"--methods={spec!r}: allowed values are {', '.join(METHODS)} (comma-separated)")
    return methods


def main(args: argparse.Namespace) -> int:
    """Run the report; returns the process exit code (0 ok, 2 bad arguments or model)."""
    try:
        methods = parse_methods(args.methods)
        report = build_report(args, methods)
    except (ValueError, FileNotFoundError) as e:
        print(f"lorakit quant-report: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else format_text(report, args.per_layer))
    return 0


def build_report(args: argparse.Namespace, methods: list[str]) -> dict:
    from ..model.load import load_model
    from ..quant.nf4 import check_quant_args
    from ..quant.report import model_report

    check_quant_args("nf4", args.blocksize)  # the blocksizes every method accepts
    if args.max_tokens < 2:
        raise ValueError(f"--max-tokens={args.max_tokens}: need at least 2 tokens for a perplexity")
    model, tokenizer = load_model(args.model, quantization=None, compute_dtype=args.dtype)
    if tokenizer is None:
        raise ValueError(f"{args.model}: no tokenizer files; quant-report needs the model's tokenizer to encode the text")
    text = Path(args.text).read_text(encoding="utf-8") if args.text else SAMPLE_TEXT
    input_ids = tokenizer(text, return_tensors="pt").input_ids[:, : args.max_tokens]  # [1, T]
    if input_ids.shape[1] < 2:
        raise ValueError("the text encodes to fewer than 2 tokens")
    n_weights = _linear_weight_count(model)
    if n_weights == 0:
        raise ValueError(f"{type(model).__name__}: no nn.Linear layers besides the output head to quantize "
                         "(GPT-2-style Conv1D layers are not covered by the report yet)")
    report = model_report(model, input_ids, methods, args.blocksize, args.double_quant)
    report.update(model=str(args.model), tokens=int(input_ids.shape[1]), blocksize=args.blocksize,
                  double_quant=bool(args.double_quant), quantized_weights=n_weights,
                  mb_16bit=n_weights * 2 / 2**20)
    for r in report["methods"].values():
        r["mb"] = n_weights * r["total"]["bits_per_weight"] / 8 / 2**20
    if getattr(args, "pissa_rank", 0):
        report["residual"] = residual_report(model, input_ids, methods, args)
    return report


class _PlusLowRank(nn.Module):
    """base(x) + x @ A^T @ B^T with A [r, in], B [out, r] as plain tensors (not nn.Linear, so the
    quantization report quantizes only `base`, the residual)."""

    def __init__(self, base: nn.Linear, lora_A: torch.Tensor, lora_B: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("lora_A", lora_A.to(base.weight.dtype))
        self.register_buffer("lora_B", lora_B.to(base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_A.t()) @ self.lora_B.t()  # [..., r] -> [..., out]


def residual_report(model, input_ids, methods, args) -> dict:
    """The same report for a copy whose linear layers (not the head) are residual + exact rank-R
    part: quant.report quantizes only the residuals. rel_error is re-expressed against ||W||."""
    import copy

    from ..config import LoraConfig
    from ..lora.init import residual_factors, residual_of
    from ..model.modules import replace_module
    from ..quant.report import model_report

    LoraConfig(r=args.pissa_rank, init=args.init)  # validates the rank and the init name
    if not LoraConfig(init=args.init).residual_init:
        raise ValueError(f"--init={args.init!r}: use pissa, pissa_niter_N or olora with --pissa-rank")
    res_model = copy.deepcopy(model)
    norms = {}
    for name, module in list(res_model.named_modules()):
        if isinstance(module, nn.Linear) and name.split(".")[-1] != "lm_head":
            w = module.weight.detach().clone()  # the original W (the module's weight becomes the residual)
            a, b = residual_factors(w, args.pissa_rank, 1.0, args.init, name)
            with torch.no_grad():
                module.weight.copy_(residual_of(w, a, b, 1.0).to(w.dtype))
            replace_module(res_model, name, _PlusLowRank(module, a, b))
            norms[name] = float(w.float().pow(2).sum())
    report = model_report(res_model, input_ids, methods, args.blocksize, args.double_quant)
    for m, r in report["methods"].items():
        layers = {n.removesuffix(".base"): v for n, v in r["layers"].items()}
        sq = 0.0
        for n, v in layers.items():
            numel = _numel(model, n)
            v["rel_error"] = (v["mse"] * numel / norms[n]) ** 0.5
            sq += v["mse"] * numel
        r["layers"] = layers
        r["total"]["rel_error"] = (sq / sum(norms.values())) ** 0.5
    report.update(init=args.init, rank=args.pissa_rank)
    return report


def _numel(model, name: str) -> int:
    return model.get_submodule(name).weight.numel()


def _linear_weight_count(model) -> int:
    """Weights of the layers model_report quantizes: nn.Linear modules not named lm_head."""
    from torch import nn

    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and n.split(".")[-1] != "lm_head")


def format_text(report: dict, per_layer: bool = True) -> str:
    from ..quant.report import format_report

    lines = [f"model: {report['model']}  ({report['tokens']} tokens of sample text, blocksize {report['blocksize']}, "
             f"double quant {'on' if report['double_quant'] else 'off'})", ""]
    lines.append(format_report(report, per_layer=per_layer))
    lines += ["", f"quantized linear layers: {report['quantized_weights']:,} weights = "
                  f"{_mb(report['mb_16bit'])} in 16 bits (LoRA)"]
    for method, r in report["methods"].items():
        rel_ppl = 100 * r["ppl_delta"] / report["base_ppl"]
        lines.append(f"  {method}: {_mb(r['mb'])} ({r['total']['bits_per_weight']:.3f} bits/weight, "
                     f"{report['mb_16bit'] / r['mb']:.2f}x smaller), KL {r['kl']:.2e} nats/token, "
                     f"perplexity {rel_ppl:+.2f}%")
    res = report.get("residual")
    if res is not None:
        lines += ["", f"QLoRA + {res['init']} (rank {res['rank']}): the principal part stays exact in the adapter, "
                      f"only the residual is quantized (relative errors against the original W):"]
        for method, r in res["methods"].items():
            plain = report["methods"][method]
            lines.append(f"  {method}: rel_err {plain['total']['rel_error']:.4f} -> {r['total']['rel_error']:.4f}, "
                         f"KL {plain['kl']:.2e} -> {r['kl']:.2e} nats/token, perplexity "
                         f"{100 * plain['ppl_delta'] / report['base_ppl']:+.2f}% -> "
                         f"{100 * (r['ppl'] - report['base_ppl']) / report['base_ppl']:+.2f}%")
    return "\n".join(lines)


def _mb(mb: float) -> str:
    return f"{mb:,.1f} MB" if mb >= 10 else f"{mb:.3f} MB"
