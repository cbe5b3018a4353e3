"""Merge adapters into the base weights: W' = W + scaling * B @ A, computed in fp32.

The per-layer arithmetic is one function, `merged_weight` (plain tensors in, fp32 [out, in] out):

    LoRA    W' = W + s B A
    DoRA    W' = (m / ||W + s B A||_row) * (W + s B A)        (row-wise; the bias is unchanged)

Embedding tables use it on W^T [dim, vocab] (lora/embedding.py's convention). A tied output head
keeps the original table (what the adapted model computed), so merging unties it.

4-bit layers are dequantized to fp32 first and come out as plain 16-bit `nn.Linear` layers;
nothing is ever re-quantized here (re-quantizing is a separate, explicit step). The result is a
plain transformers model with no lorakit module left, so `save_pretrained` writes a checkpoint
that plain `transformers` loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from ..model.lean import remove_lean
from ..model.modules import compute_dtype_of, dense_weight, is_conv1d, replace_module
from ..quant.linear4bit import Linear4bit
from .embedding import LoRAEmbedding
from .layer import LoRALinear, ModulesToSave


def dense_copy(layer: nn.Module, weight_out_in: torch.Tensor) -> nn.Module:
    """A new plain layer of `layer`'s kind holding `weight_out_in` ([out, in], any float dtype):
    a Conv1D for a Conv1D or for a 4-bit layer that replaced one (GPT-2), else an nn.Linear."""
    dtype = compute_dtype_of(layer)  # a 4-bit layer's: that of the model's other dense weights
    bias = getattr(layer, "bias", None)
    if is_conv1d(layer) or getattr(layer, "replaces_conv1d", False):
        from transformers.pytorch_utils import Conv1D

        new = Conv1D(weight_out_in.shape[0], weight_out_in.shape[1])  # Conv1D(nf=out, nx=in)
        new.weight = nn.Parameter(weight_out_in.t().contiguous().to(dtype), requires_grad=False)  # [in, out]
    else:
        new = nn.Linear(weight_out_in.shape[1], weight_out_in.shape[0], bias=bias is not None, device="meta")
        new.weight = nn.Parameter(weight_out_in.to(dtype).contiguous(), requires_grad=False)  # [out, in]
    if bias is not None:
        new.bias = nn.Parameter(bias.detach().clone().to(dtype), requires_grad=False)
    return new.to(weight_out_in.device)


def merged_weight(base: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  magnitude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """THE per-layer merge arithmetic, shared by the in-memory merge (below) and the streaming merge
    of a checkpoint on disk (export/hf.py), so both give the same bits: the adapted weight in fp32
    [out, in] from base [out, in] (already [out, in] for Conv1D), lora_A [r, in], lora_B [out, r]
    and, for DoRA, magnitude [out] (module docstring). The caller casts to the output dtype."""
    w = base.float() + scaling * (lora_B.float().to(base.device) @ lora_A.float().to(base.device))  # [out, in]
    if magnitude is None:
        return w
    norm = torch.linalg.vector_norm(w, dim=1)                           # [out]: ||W + s B A||_row (lora/dora.py)
    return w * (magnitude.float().to(w.device) / norm)[:, None]         # [out, in] * [out, 1]


def merged_layer_of(layer: LoRALinear) -> nn.Module:
    """A plain layer computing base + LoRA (or DoRA) in fp32, cast to the base dtype."""
    w = merged_weight(dense_weight(layer.base_layer), layer.lora_A.weight, layer.lora_B.weight, layer.scaling,
                      layer.lora_magnitude_vector)
    return dense_copy(layer.base_layer, w)


def merged_embedding_of(layer: LoRAEmbedding) -> nn.Module:
    """A copy of the base embedding module (same class, buffers such as embed_scale) holding the
    merged table; the original table is not touched (a tied head keeps it)."""
    import copy

    base = layer.base_layer
    w_t = merged_weight(base.weight.detach().t(), layer.lora_embedding_A, layer.lora_embedding_B, layer.scaling,
                        layer.lora_magnitude_vector)                    # [dim, vocab]
    table = nn.Parameter(w_t.t().contiguous().to(base.weight.dtype), requires_grad=False)  # [vocab, dim]
    return copy.deepcopy(base, memo={id(base.weight): table})


def _untie_head(model: nn.Module, table: torch.Tensor) -> None:
    """A head that shares `table` with the adapted embedding keeps the original table; the config
    must then say the two are separate, or save_pretrained / from_pretrained would tie them again."""
    shares = any(m.weight is table for m in model.modules()
                 if isinstance(getattr(m, "weight", None), torch.Tensor) and not isinstance(m, (nn.Embedding, LoRAEmbedding)))
    config = getattr(model, "config", None)
    if shares and config is not None:
        for cfg in (config, getattr(config, "get_text_config", lambda: None)()):
            if cfg is not None and getattr(cfg, "tie_word_embeddings", False):
                cfg.tie_word_embeddings = False


@dataclass(frozen=True)
class MergeReport:
    max_logit_diff: float
    kl_divergence: float  # mean over positions of KL(unmerged || merged), nats
    top1_agreement: float  # fraction of positions whose argmax token is the same

    def __str__(self) -> str:
        return (f"merge check: max |logit diff| {self.max_logit_diff:.3g}, KL {self.kl_divergence:.3g} nats, "
                f"top-1 agreement {100 * self.top1_agreement:.2f}%")


class MergeVerificationError(RuntimeError):
    pass


@torch.no_grad()
def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=input_ids).logits.float()


def compare_logits(ref: torch.Tensor, new: torch.Tensor) -> MergeReport:
    logp, logq = ref.log_softmax(-1), new.log_softmax(-1)  # [B, T, V]
    kl = (logp.exp() * (logp - logq)).sum(-1).mean()
    agree = (ref.argmax(-1) == new.argmax(-1)).float().mean()
    return MergeReport(float((ref - new).abs().max()), float(kl), float(agree))


def merge(model: nn.Module, verify: Optional[torch.Tensor] = None, max_kl: float = 1e-3,
          min_top1: float = 0.99) -> nn.Module:
    """Fold every adapter into its base layer and return the plain model (the same object).

    4-bit layers (adapted or not) become 16-bit `nn.Linear`; `modules_to_save` copies replace the
    originals; lean training modules (model/lean.py) give way to the model's own. Merging a model without adapters returns it unchanged. With `verify` (sample
    token ids [B, T]) the logits before and after are compared; a KL above `max_kl` or a top-1
    agreement below `min_top1` raises MergeVerificationError. The report is kept on
    `model.lorakit_merge_report`.
    """
    was_training = model.training
    model.eval()
    reference = _logits(model, verify) if verify is not None else None
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            replace_module(model, name, module.merged_layer or merged_layer_of(module))
        elif isinstance(module, LoRAEmbedding):
            _untie_head(model, module.base_layer.weight)
            replace_module(model, name, module.merged_layer or merged_embedding_of(module))
        elif isinstance(module, ModulesToSave):
            replace_module(model, name, module.module)
    for name, module in list(model.named_modules()):
        if isinstance(module, Linear4bit):
            replace_module(model, name, dense_copy(module, dense_weight(module)))
    remove_lean(model)
    for p in model.parameters():
        p.requires_grad_(False)
    if hasattr(model, "lorakit_config"):
        del model.lorakit_config
    if reference is not None:
        report = compare_logits(reference, _logits(model, verify))
        model.lorakit_merge_report = report
        if report.kl_divergence > max_kl or report.top1_agreement < min_top1:
            raise MergeVerificationError(f"{report} exceeds the limits (KL <= {max_kl}, top-1 >= {min_top1})")
    model.train(was_training)
    return model
