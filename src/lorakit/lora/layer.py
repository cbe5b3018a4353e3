"""LoRALinear: a frozen linear layer plus a trainable low-rank update.

    y = base_layer(x) + scaling * B(A(dropout(x)))

    x: [..., in]   A: [r, in]   B: [out, r]   scaling = alpha / r   (alpha / sqrt(r) with rsLoRA)

With DoRA (lora.use_dora, lora/dora.py) a trainable magnitude m [out] rescales each output row of
the adapted weight W + s B A to m / ||W + s B A||_row (norm detached), exactly as PEFT computes it:

    y = base_layer(x) + (m / n - 1) * base(x') + (m / n) * s * B(A(x'))      x' = dropout(x)

where base(x') = base_layer(x) - bias when dropout is off (or in eval), else the base weight
applied again to the dropped input. How A and B start: lora/init.py (lora.init).

The branch runs in the dtype `lora_branch_dtype` picks (default: the activations' dtype, on copies
of the fp32 weights, as autocast does; "adapter": PEFT's fp32 branch). Inside a checkpointed layer
the frozen base output is recorded and replayed rather than recomputed (model/replay.py).

The wrapper keeps the original layer untouched as `base_layer` (an `nn.Linear`, a GPT-2 `Conv1D`
whose weight is stored transposed as [in, out], or a 4-bit `Linear4bit`), so removing the adapter
puts exactly that layer back. B starts at zero, so an adapted model starts equal to its base.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..model.modules import compute_dtype_of, dense_weight, is_conv1d, linear_features, model_device
from ..model.replay import replayed
from .dora import magnitude_scale, row_norm_lowrank, row_norm_reference
from .init import init_linear_

BRANCH_DTYPES = ("compute", "adapter")


def lora_branch_dtype(mode: str, activation_dtype: torch.dtype, adapter_dtype: torch.dtype) -> torch.dtype:
    """dtype of the LoRA branch's matmuls u = x @ A^T, y += scaling * u @ B^T.

    "compute" (default): the activations' dtype. With a bf16 base and fp32 adapters the branch then
        reads the bf16 input as it is (no fp32 copy of x per layer, which autograd would also keep
        for backward), adds its update with one addmm, and its weight gradients are rounded to bf16
        before they accumulate into the fp32 .grad (what mixed-precision training does everywhere).
        Measured on the Qwen2.5-0.5B bench (2 CPU cores, bf16): see bench/SPEED.md.
    "adapter": the adapter weights' dtype (fp32 by default): the input is cast up, the update is
        computed in fp32 and rounded once when added to the base output, as PEFT does.
    """
    if mode not in BRANCH_DTYPES:
        raise ValueError(f"lora.branch_dtype={mode!r} is not allowed; choose one of {BRANCH_DTYPES}")
    return activation_dtype if mode == "compute" else adapter_dtype


class LoRALinear(nn.Module):
    """A frozen `base_layer` plus `lora_B @ lora_A`, scaled by alpha / r."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 use_rslora: bool = False, adapter_dtype: Optional[torch.dtype] = torch.float32,
                 branch_dtype: str = "compute", use_dora: bool = False, init: str = "default"):
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
        device = model_device(base_layer)
        dtype = adapter_dtype or compute_dtype_of(base_layer)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=dtype)   # weight [r, in]
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=dtype)  # weight [out, r]
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged_layer: Optional[nn.Module] = None  # set by merge_(); base_layer is never modified
        self.adapter_active = True  # False inside lora/switch.py adapters_disabled: the base layer alone
        # DoRA: trainable magnitude [out] (PEFT key <name>.lora_magnitude_vector), set by init_dora_()
        self.lora_magnitude_vector: Optional[nn.Parameter] = None
        self.use_dora = use_dora
        init_linear_(self.lora_A.weight, self.lora_B.weight, "gaussian" if init == "gaussian" else "default")
        # pissa / olora: add_lora (lora/init.py init_residual_) then sets A, B, the residual base and
        # (again) DoRA's magnitude: m is always computed from the layer as initialised
        if use_dora:
            self.init_dora_()

    def reset_lora_parameters(self) -> None:
        """PEFT's default init: A ~ Kaiming-uniform(a=sqrt(5)) (nn.Linear's own init), B = 0."""
        init_linear_(self.lora_A.weight, self.lora_B.weight, "default")

    def keep_initial_(self) -> None:
        """Remember A0, B0 (non-persistent buffers) for the conversion to a plain LoRA (lora/init.py)."""
        self.register_buffer("initial_lora_A", self.lora_A.weight.detach().clone(), persistent=False)
        self.register_buffer("initial_lora_B", self.lora_B.weight.detach().clone(), persistent=False)

    # ---- DoRA ----
    def init_dora_(self) -> None:
        """m = ||W + s B A||_row for the current A, B (so the layer's output is unchanged), and the
        cached ||W||^2 per row that the low-rank norm needs (the base is frozen)."""
        w = dense_weight(self.base_layer)                                    # [out, in] fp32
        self.register_buffer("base_row_sq", w.pow(2).sum(1), persistent=False)  # [out] fp32
        norm = row_norm_reference(w, self.lora_A.weight, self.lora_B.weight, self.scaling)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_A.weight.dtype))
        self.use_dora = True

    def _base_no_bias(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T [..., out]: the frozen layer without its bias (for a Conv1D too)."""
        bias = getattr(self.base_layer, "bias", None)
        y = self.base_layer(x)
        return y if bias is None else y - bias.to(y.dtype)

    def dora_norm(self) -> torch.Tensor:
        """||W + s B A||_row [out] fp32 by the low-rank route of lora/dora.py (no [out, in] tensor)."""
        a = self.lora_A.weight.detach()
        with torch.no_grad():
            w_at = self._base_no_bias(a.to(compute_dtype_of(self.base_layer))).t()  # [r, out] -> [out, r]
            return row_norm_lowrank(self.base_row_sq, w_at, a, self.lora_B.weight.detach(), self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B @ A in fp32, shaped [out, in] (plain LoRA; DoRA's merge is lora/merge.py)."""
        return self.scaling * (self.lora_B.weight.float() @ self.lora_A.weight.float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.adapter_active:
            return self.base_layer(x)
        if self.merged_layer is not None:
            return self.merged_layer(x)
        result = replayed(self.base_layer, x)                                # [..., out], base dtype
        dtype = lora_branch_dtype(self.branch_dtype, result.dtype, self.lora_A.weight.dtype)
        if self.lora_magnitude_vector is not None:
            return self._dora_forward(x, result, dtype)
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

    def _dora_forward(self, x: torch.Tensor, result: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """y = (result - base(x')) + (m / n) * (base(x') + s * B A x')  (module docstring, PEFT's
        algebra): one [..., out] tensor d = base(x') + s B A x' is saved for m's gradient."""
        dropped = self.training and not isinstance(self.lora_dropout, nn.Identity)
        a_in = self.lora_dropout(x)                                          # [..., in]
        u = F.linear(a_in.to(dtype), self.lora_A.weight.to(dtype))           # [..., r]
        bias = getattr(self.base_layer, "bias", None)
        if dropped:
            base_d = self._base_no_bias(a_in)                                # W x', [..., out]
        else:
            base_d = result if bias is None else result - bias.to(result.dtype)
        d = torch.addmm(base_d.reshape(-1, self.out_features).to(dtype), u.reshape(-1, self.r),
                        self.lora_B.weight.to(dtype).t(), alpha=self.scaling)  # [N, out]: W x' + s B A x'
        scale = magnitude_scale(self.lora_magnitude_vector, self.dora_norm())  # [out] fp32
        # m/n * d as d + d * (m/n - 1): in bf16, m/n ~ 1 itself would round to steps of 2^-7 and hide
        # small changes of m; m/n - 1 keeps them. Saves d and the [out] factor, nothing else.
        y = torch.addcmul(d, d, (scale - 1).to(dtype)).view(result.shape).to(result.dtype)  # [..., out]
        if dropped:
            return y + (result - base_d)                                     # + bias + W x - W x'
        return y if bias is None else y + bias.to(y.dtype)

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
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}, merged={self.merged_layer is not None}"


class ModulesToSave(nn.Module):
    """Trains a full copy of a module (e.g. embed_tokens, lm_head) and keeps the original frozen.

    Removing the adapter puts `original_module` back; merging keeps the trained `module`.
    """

    def __init__(self, original: nn.Module):
        super().__init__()
        self.original_module = original
        self.module = copy.deepcopy(original)
        self.adapter_active = True  # False: the frozen original (lora/switch.py adapters_disabled)
        for p in self.original_module.parameters():
            p.requires_grad_(False)
        for p in self.module.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return (self.module if self.adapter_active else self.original_module)(*args, **kwargs)

    def __getattr__(self, name):
        # Let model code read attributes of the wrapped module (e.g. lm_head.weight, embed.num_embeddings).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("module"), name)
