"""The dtype policy, in one place.

Frozen base weights and activations run in the *compute dtype*; LoRA weights and optimizer state
stay fp32 (their updates are tiny relative to their values, and bf16 would round them away);
the loss is computed in fp32 chunks. The LoRA branch's two small matmuls run in the compute dtype
too, on compute-dtype copies of the fp32 weights (as torch.autocast runs a Linear), unless
`lora.branch_dtype="adapter"` asks for PEFT's behaviour (activations cast up to the adapter dtype);
see `lora_branch_dtype`. "auto" picks the compute dtype per device:

    CUDA  bf16 where supported (Ampere+), else fp16 with loss scaling
    CPU   bf16 when the CPU has native bf16 matmuls (AVX512-BF16 / AMX), else fp32
          (measured on this project's 2-core AVX512-BF16 CI machine: 1024^2 matmul ~53 GFLOP/s
          in bf16 vs ~19 GFLOP/s in fp32; without native bf16, bf16 matmuls are emulated and slower)
    MPS   fp16 (no bf16 matmuls on older macOS), with loss scaling
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ALIASES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "fp32": torch.float32, "float32": torch.float32}


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """Compute dtype for `name` ("auto", "bf16", "fp16", "fp32" or a torch dtype) on `device`."""
    if isinstance(name, torch.dtype):
        return name
    if name in ALIASES:
        return ALIASES[name]
    if name != "auto":
        raise ValueError(f"precision/compute_dtype={name!r} is not allowed; choose auto, bf16, fp16 or fp32")
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if kind == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class Precision:
    compute_dtype: torch.dtype
    loss_scaling: bool  # fp16 gradients underflow without it (Micikevicius et al., 2018)

    @property
    def name(self) -> str:
        return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[self.compute_dtype]


def precision_policy(name: str | torch.dtype, device: torch.device | str = "cpu") -> Precision:
    dtype = resolve_dtype(name, device)
    return Precision(dtype, loss_scaling=dtype == torch.float16)


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
