"""Quantization-quality report: weight reconstruction error, storage cost, and the effect on
a model's logits (KL divergence) and perplexity.

Methods: "nf4", "fp4" (lorakit.quant.nf4) and "int4": symmetric absmax int4 per block, our
reference baseline (q = round(7 * x / absmax) in [-7, 7], stored as q + 8 in the same nibble
layout, dequantized as q / 7 * absmax; absmax double-quantized like NF4 when asked).
Bits per weight are measured from the bytes of the tensors that would be stored.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from torch import nn

from .nf4 import (
    DOUBLE_QUANT_BLOCKSIZE, check_quant_args, dequantize_4bit, double_quantize, pack_nibbles, quantize_4bit,
)  # fmt: skip
from .state import QuantState

METHODS = ("nf4", "fp4", "int4")
# int4 code table: index i decodes to (i - 8) / 7; index 0 (-8/7) is never produced.
INT4_CODE = (torch.arange(16, dtype=torch.float32) - 8) / 7


def quantize_int4(tensor: torch.Tensor, blocksize: int = 64, double_quant: bool = False):
    """Symmetric absmax int4 per block -> (packed uint8 [(n+1)//2, 1], QuantState(quant_type="int4"))."""
    check_quant_args("nf4", blocksize)
    flat = tensor.detach().reshape(-1).float()  # [n]
    n = flat.numel()
    n_blocks = -(-n // blocksize)
    blocks = nn.functional.pad(flat, (0, n_blocks * blocksize - n)).view(n_blocks, blocksize)  # [n_blocks, bs]
    absmax = blocks.abs().amax(dim=1)  # [n_blocks]
    q = torch.round(blocks / absmax.clamp(min=1e-38)[:, None] * 7).clamp(-7, 7) + 8  # [n_blocks, bs]
    q = q.reshape(-1)[: n + n % 2].long()  # [n rounded up to even]
    state = QuantState(tensor.shape, tensor.dtype, blocksize, "int4", absmax, INT4_CODE.to(tensor.device))
    if double_quant:
        codes, absmax2, offset, code2 = double_quantize(absmax)
        state = QuantState(
            tensor.shape, tensor.dtype, blocksize, "int4", codes, state.code,
            offset=offset, absmax2=absmax2, code2=code2, blocksize2=DOUBLE_QUANT_BLOCKSIZE,
        )  # fmt: skip
    return pack_nibbles(q), state


def quantize_dequantize(tensor: torch.Tensor, method: str, blocksize: int = 64, double_quant: bool = True):
    """(reconstructed fp32 tensor, stored bytes) for one method."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "int4":
        packed, state = quantize_int4(tensor, blocksize, double_quant)
    else:
        packed, state = quantize_4bit(tensor, method, blocksize, double_quant)
    stored = packed.numel() * packed.element_size() + state.nbytes()
    return dequantize_4bit(packed, state, dtype=torch.float32), stored


def _stats(tensor: torch.Tensor, recon: torch.Tensor, stored: int) -> dict:
    """Error statistics; the "_" keys are sums used to aggregate over layers."""
    w = tensor.detach().float()
    sq_err, sq_norm = (recon - w).pow(2).sum().item(), w.pow(2).sum().item()
    return {
        "mse": sq_err / w.numel(),
        "rel_error": math.sqrt(sq_err / max(sq_norm, 1e-30)),
        "bits_per_weight": 8 * stored / w.numel(),
        "_sq_err": sq_err,
        "_sq_norm": sq_norm,
        "_numel": w.numel(),
        "_bytes": stored,
    }


def weight_error(tensor: torch.Tensor, method: str, blocksize: int = 64, double_quant: bool = True) -> dict:
    """dict(mse, rel_error = ||W - Q(W)||_F / ||W||_F, bits_per_weight from stored bytes)."""
    stats = _stats(tensor, *quantize_dequantize(tensor, method, blocksize, double_quant))
    return {k: v for k, v in stats.items() if not k.startswith("_")}


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    logits = out.logits if hasattr(out, "logits") else out
    return logits.float()  # [batch, seq, vocab]


def _perplexity(logits: torch.Tensor, input_ids: torch.Tensor) -> float:
    loss = nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]),  # [batch * (seq-1), vocab]
        input_ids[:, 1:].reshape(-1),  # [batch * (seq-1)]
    )
    return math.exp(loss.item())


def _quantized_copy(model: nn.Module, method: str, blocksize: int, double_quant: bool):
    """Deep copy with every nn.Linear except lm_head replaced by its reconstruction; per-layer errors."""
    qmodel = copy.deepcopy(model)
    layers = {}
    for name, module in qmodel.named_modules():
        if isinstance(module, nn.Linear) and not name.split(".")[-1] == "lm_head":
            recon, stored = quantize_dequantize(module.weight, method, blocksize, double_quant)
            layers[name] = _stats(module.weight, recon, stored)
            with torch.no_grad():
                module.weight.copy_(recon.to(module.weight.dtype))
    return qmodel, layers


def _total(layers: dict) -> dict:
    numel = sum(s["_numel"] for s in layers.values())
    sq_err = sum(s["_sq_err"] for s in layers.values())
    sq_norm = sum(s["_sq_norm"] for s in layers.values())
    stored = sum(s["_bytes"] for s in layers.values())
    return {"mse": sq_err / numel, "rel_error": math.sqrt(sq_err / sq_norm), "bits_per_weight": 8 * stored / numel}


@torch.no_grad()
def model_report(
    model: nn.Module,
    sample_input_ids: torch.Tensor,
    methods: Sequence[str] = METHODS,
    blocksize: int = 64,
    double_quant: bool = True,
) -> dict:
    """Per-layer and total weight error, logit KL(base || quantized) averaged over tokens, and
    perplexity on ``sample_input_ids`` [batch, seq] for each method. The model is not modified."""
    was_training = model.training
    model.eval()
    base_logits = _logits(model, sample_input_ids)
    base_logp = base_logits.log_softmax(-1)  # [batch, seq, vocab]
    report = {"base_ppl": _perplexity(base_logits, sample_input_ids), "methods": {}}
    for method in methods:
        qmodel, layers = _quantized_copy(model, method, blocksize, double_quant)
        q_logp = _logits(qmodel.eval(), sample_input_ids).log_softmax(-1)  # [batch, seq, vocab]
        kl = (base_logp.exp() * (base_logp - q_logp)).sum(-1).mean().item()
        ppl = _perplexity(q_logp, sample_input_ids)
        report["methods"][method] = {
            "layers": {name: {k: v for k, v in s.items() if not k.startswith("_")} for name, s in layers.items()},
            "total": _total(layers),
            "kl": kl,
            "ppl": ppl,
            "ppl_delta": ppl - report["base_ppl"],
        }
        del qmodel
    model.train(was_training)
    return report


def format_report(report: dict, per_layer: bool = True) -> str:
    """Plain-text tables: one summary row per method, then per-layer relative error."""
    methods = list(report["methods"])
    lines = [f"base perplexity: {report['base_ppl']:.4f}", ""]
    lines.append(f"{'method':<8}{'bits/w':>8}{'rel_err':>10}{'mse':>12}{'KL':>12}{'ppl':>10}{'d_ppl':>10}")
    for m in methods:
        r = report["methods"][m]
        t = r["total"]
        lines.append(
            f"{m:<8}{t['bits_per_weight']:>8.3f}{t['rel_error']:>10.4f}{t['mse']:>12.3e}"
            f"{r['kl']:>12.3e}{r['ppl']:>10.4f}{r['ppl_delta']:>+10.4f}"
        )
    if per_layer and methods:
        names = list(report["methods"][methods[0]]["layers"])
        width = max([len(n) for n in names] + [5]) + 2
        lines += ["", f"{'layer (rel_err)':<{width}}" + "".join(f"{m:>10}" for m in methods)]
        for name in names:
            row = "".join(f"{report['methods'][m]['layers'][name]['rel_error']:>10.4f}" for m in methods)
            lines.append(f"{name:<{width}}{row}")
    return "\n".join(lines)
