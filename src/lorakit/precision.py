"""The precision of a run, decided once (in the recipe) and passed to load_model, train and the planner.

Frozen base weights and activations run in the *compute dtype*; LoRA weights, their gradients and
the optimizer state are in the *adapter dtype* (fp32 by default: their updates are tiny relative to
their values, and bf16 would round them away); the loss is computed in fp32. The LoRA branch's two
small matmuls run in the compute dtype on copies of the adapter weights (as torch.autocast runs a
Linear) unless `lora.branch_dtype="adapter"` asks for PEFT's behaviour (lora/layer.py). fp16 compute
needs loss scaling (a GradScaler) so that small gradients do not underflow.

"auto" picks the compute dtype per device:

    CUDA  bf16 on compute capability >= 8.0 (Ampere, Ada, Hopper, Blackwell), else fp16 with loss
          scaling (T4 = sm_75, V100 = sm_70). The capability decides, not
          torch.cuda.is_bf16_supported(): that is True on a T4 too, because bf16 tensors can be
          *emulated* there, without tensor cores and without the fused attention kernels.
    CPU   bf16 when the CPU has native bf16 matmuls (AVX512-BF16 / AMX), else fp32
          (2-core AVX512-BF16 machine: 1024^2 matmul ~53 GFLOP/s in bf16 vs ~19 in fp32; without
          native bf16, bf16 matmuls are emulated and slower)
    MPS   fp16 (no bf16 matmuls on older macOS), with loss scaling
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ConfigError
from .dtypes import FLOAT_DTYPES, short_name, to_dtype


def cpu_has_native_bf16() -> bool:
    """True when oneDNN runs bf16 matmuls natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_dtype(name: str | torch.dtype, device: torch.device | str = "cpu") -> torch.dtype:
    """Compute dtype for `name` ("auto", "bf16", "fp16", "fp32", a long name or a dtype) on `device`."""
    if isinstance(name, torch.dtype) or name != "auto":
        try:
            return to_dtype(name)
        except ValueError:
            raise ValueError(f"precision/compute_dtype={name!r} is not allowed; choose auto, bf16, fp16 or fp32") from None
    device = torch.device(device)
    if device.type == "cuda":
        major, _ = torch.cuda.get_device_capability(device)
        return torch.bfloat16 if major >= 8 else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


@dataclass(frozen=True)
class Precision:
    """Every dtype decision of a run (module docstring)."""

    compute_dtype: torch.dtype
    adapter_dtype: torch.dtype
    branch: str = "compute"
    """lora.branch_dtype: "compute" or "adapter" (lora/layer.py lora_branch_dtype)."""

    @property
    def loss_scaling(self) -> bool:
        """fp16 gradients underflow without a loss scale (Micikevicius et al., 2018)."""
        return self.compute_dtype == torch.float16

    @property
    def name(self) -> str:
        return short_name(self.compute_dtype)

    def describe(self) -> str:
        scaling = ", loss scaling" if self.loss_scaling else ""
        return (f"compute {self.name}, adapters {short_name(self.adapter_dtype)}, LoRA branch in the "
                f"{self.branch} dtype{scaling}")


def resolve_precision(precision: str | torch.dtype = "auto", device: torch.device | str = "cpu",
                      adapter_dtype: str = "float32", branch: str = "compute") -> Precision:
    """The run's Precision from train.precision, lora.adapter_dtype and lora.branch_dtype on `device`;
    an impossible combination is a ConfigError naming the fields."""
    compute = resolve_dtype(precision, device)
    if adapter_dtype not in ("float32", "compute"):
        raise ConfigError(f"lora.adapter_dtype={adapter_dtype!r} is not allowed; choose 'float32' or 'compute'")
    if branch not in ("compute", "adapter"):
        raise ConfigError(f"lora.branch_dtype={branch!r} is not allowed; choose 'compute' or 'adapter'")
    adapter = torch.float32 if adapter_dtype == "float32" else compute
    if compute == torch.float16 and adapter == torch.float16:
        raise ConfigError("lora.adapter_dtype='compute' with fp16 compute (train.precision "
                          f"{precision!r} on {torch.device(device).type}) gives fp16 LoRA weights, whose gradients "
                          "the fp16 loss scaler cannot unscale; keep lora.adapter_dtype='float32' (the default) or "
                          "train in bf16/fp32")
    return Precision(compute, adapter, branch)


def run_precision(cfg, device: torch.device | str) -> Precision:
    """resolve_precision for a RunConfig (train.precision, lora.adapter_dtype, lora.branch_dtype)."""
    return resolve_precision(cfg.train.precision, device, cfg.lora.adapter_dtype, cfg.lora.branch_dtype)


def model_precision(model, cfg) -> Precision:
    """The Precision of a model loaded by the caller (the Python API's train()): its frozen weights'
    dtype is the compute dtype; an explicit train.precision that disagrees is a ConfigError."""
    frozen = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    if len(frozen) > 1:
        raise ConfigError(f"the model's frozen weights have several dtypes ({sorted(map(str, frozen))}); "
                          "load it in one compute dtype")
    compute = frozen.pop() if frozen else torch.float32
    if cfg.train.precision != "auto" and to_dtype(cfg.train.precision) != compute:
        raise ConfigError(f"train.precision={cfg.train.precision!r}, but the model's frozen weights are "
                          f"{short_name(compute)}; load it with compute_dtype={cfg.train.precision!r} or set "
                          f"train.precision={short_name(compute)!r}")
    return resolve_precision(compute, "cpu", cfg.lora.adapter_dtype, cfg.lora.branch_dtype)


def check_model_precision(model, precision: Precision) -> None:
    """The model's frozen floating-point weights are in `precision`'s compute dtype, or ConfigError."""
    frozen = {p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad}
    if frozen - {precision.compute_dtype}:
        raise ConfigError(f"the model's frozen weights are {sorted(map(str, frozen))}, but the run's precision is "
                          f"{precision.describe()}; load the model in {short_name(precision.compute_dtype)}")


__all__ = ["FLOAT_DTYPES", "Precision", "check_model_precision", "cpu_has_native_bf16", "model_precision",
           "resolve_dtype", "resolve_precision", "run_precision"]
