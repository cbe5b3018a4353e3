"""LoRALinear: a frozen linear layer plus a trainable low-rank update.

    y = base_layer(x) + scaling * B(A(dropout(x)))

    x: [..., in]   A: [r, in]   B: [out, r]   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

The branch runs in the dtype `train.precision.lora_branch_dtype` picks (default: the activations'
dtype, on copies of the fp32 weights, as autocast does; "adapter": PEFT's fp32 branch).

The wrapper keeps the original layer untouched as `base_layer` (an `nn.Linear`, a GPT-2 `Conv1D`
whose weight is stored transposed as [in, out], or a 4-bit `Linear4bit`), so removing the adapter
puts exactly that layer back. B starts at zero, so an adapted model starts equal to its base.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.checkpointing import frozen_output
from ..train.precision import lora_branch_dtype


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a transformers Conv1D or a Linear4bit."""
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    if is_conv1d(layer):
        in_f, out_f = layer.weight.shape  # Conv1D stores W^T: [in, out]
        return in_f, out_f
    raise TypeError(f"{type(layer).__name__} is not a linear layer lorakit can adapt")


def is_conv1d(layer: nn.Module) -> bool:
    return type(layer).__name__ == "Conv1D" and hasattr(layer, "nf")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] in fp32 (dequantized for 4-bit layers, transposed for Conv1D)."""
    if hasattr(layer, "dequantize"):
        return layer.dequantize(torch.float32)
    w = layer.weight.detach().float()
    return w.t() if is_conv1d(layer) else w


class LoRALinear(nn.Module):
    """A frozen `base_layer` plus `lora_B @ lora_A`, scaled by alpha / r."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = torch.float32,
                 branch_dtype: str = "compute"):
        super().__init__()
        in_f, out_f = linear_features(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = in_f, out_f
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        lora_branch_dtype(branch_dtype, torch.float32, torch.float32)  # checks the name early
        self.branch_dtype = branch_dtype  # "compute" | "adapter": see lora_branch_dtype
        # LoRA paper eq. 4 scales by alpha / r; rsLoRA (Kalajdzievski 2023) by alpha / sqrt(r).
        self.scaling = alpha / (math.sqrt(r) if use_rslora else r)
        self.fan_in_fan_out = is_conv1d(base_layer)
        device = next((t.device for t in base_layer.parameters()), None) or next(
            (t.device for t in base_layer.buffers()), torch.device("cpu"))
        dtype = adapter_dtype or compute_dtype_of(base_layer)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)   # weight [r, in]
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)  # weight [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_layer: Optional[nn.Module] = None  # set by merge_(); base_layer is never modified
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        # PEFT's default init: A ~ Kaiming-uniform(a=sqrt(5)) (nn.Linear's own init), B = 0.
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped [out, in]."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged_layer is not None:
            return self.merged_layer(x)
        result = frozen_output(self.base_layer, x, self.base_layer)          # [..., out], base dtype
        dtype = lora_branch_dtype(self.branch_dtype, result.dtype, self.lora_A.weight.dtype)
        a_in = self.lora_dropout(x).to(dtype)                                # [..., in]
        u = F.linear(a_in, self.lora_A.weight.to(dtype))                     # [..., r]
        if dtype != result.dtype:  # "adapter": update in the adapter dtype, rounded once when added
            update = F.linear(u, self.lora_B.weight) * self.scaling          # [..., out]
            return result + update.to(result.dtype)
        # result + scaling * u @ B^T in one addmm: no [..., out] temporaries for the product,
        # the scaling and a cast; backward gets g for result and scaling * (g @ B, u^T @ g).
        y = torch.addmm(result.reshape(-1, self.out_features), u.reshape(-1, self.r),  # [N, out]
                        self.lora_B.weight.to(dtype).t(), alpha=self.scaling)          # [N, r] @ [r, out]
        return y.view(result.shape)

    # ---- merging (the math lives in lora/merge.py's merged_layer_of) ----
    def merge_(self) -> None:
        """Switch to a merged dense copy for inference; base_layer stays as it was."""
        from .merge import merged_layer_of

        if self.merged_layer is None:
            self.merged_layer = merged_layer_of(self)

    def unmerge_(self) -> None:
        """Drop the merged copy: the output is base + LoRA branch again, from the original weights."""
        self.merged_layer = None

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged_layer is not None}"


class ModulesToSave(nn.Module):
    """Trains a full copy of a module (e.g. embed_tokens, lm_head) and keeps the original frozen.

    Removing the adapter puts `original_module` back; merging keeps the trained `module`.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        import copy

        self.original_module = original
        self.module = copy.deepcopy(original)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def __getattr__(self, name):
        # Let model code read attributes of the wrapped module (e.g. lm_head.weight, embed.num_embeddings).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)


def compute_dtype_of(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: a Linear4bit's compute_dtype, else its weight's dtype."""
    if hasattr(layer, "compute_dtype"):
        return layer.compute_dtype
    return layer.weight.dtype
