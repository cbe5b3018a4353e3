"""Linear4bit: a frozen nn.Linear whose weight is stored as packed 4-bit NF4/FP4 codes.

Stored buffers (all carried by state_dict / load_state_dict and moved by ``.to(device)``):

    weight_packed             uint8 [out_features, in_features // 2]   row r = bytes of weight row r,
                              element 2j in the high nibble (same bytes as bitsandbytes' flat packing)
    weight_absmax, weight_quant_map, weight_nested_absmax, weight_nested_quant_map,
    weight_nested_offset, weight_quant_state   the QuantState, ``QuantState.to_dict("weight_")``

Construction: ``from_weight`` / ``from_linear`` quantize (explicitly, the one place a layer does);
``from_quantized`` wraps codes quantized elsewhere (a stored 4-bit checkpoint); ``.to()`` only moves
or, for the bias, casts. Floating-point quantization buffers keep their dtype under
``module.to(dtype)`` / ``.half()`` so the stored scales are never silently rounded.
"""

from __future__ import annotations

import threading
from typing import Optional

import torch
from torch import nn

from . import kernels
from .nf4 import check_quant_args, dequantize_4bit, quantize_4bit, quantize_weight
from .state import META_KEY, STATE_KEYS, QuantState

STATE_PREFIX = "weight_"  # buffer names: weight_packed, then STATE_PREFIX + each of STATE_KEYS


class _Scratch(threading.local):
    """One reusable buffer per (thread, dtype, device) for dequantized weights, for CPU tensors only.

    Every pass of every Linear4bit rebuilds a dense weight (forward, recompute, backward: ~3 per
    layer per step) and drops it right after one matmul. Fresh allocations of 0.2-9 MB each cost
    page faults and leave glibc heap holes that keep RSS up (bench/SPEED.md); one buffer sized for
    the largest layer avoids both. Safe because the weight never outlives the matmul that reads it
    (it is not saved for backward), each thread has its own buffer, and CPU ops run synchronously:
    when the matmul returns, the buffer is free. That last reason does not hold on CUDA (see _dense)."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        buf = self.buffers.get((dtype, device))
        if buf is None or buf.numel() < numel:
            buf = self.buffers[(dtype, device)] = torch.empty(numel, dtype=dtype, device=device)
        return buf[:numel]


_scratch = _Scratch()


def release_scratch() -> None:
    """Free this thread's dequantize buffers (they are allocated again on the next forward)."""
    _scratch.buffers.clear()


def _dense(packed: torch.Tensor, state: QuantState, dtype: torch.dtype) -> torch.Tensor:
    """W = dequantize_4bit(packed, state) [out, in]: in the thread's scratch buffer on the CPU; a
    fresh tensor from the caching allocator elsewhere.

    Why not a reused buffer on CUDA: kernels are queued, so a buffer is free only once the matmul
    reading it has *run*, on its stream. Backward runs on autograd's device thread, possibly on
    another stream than forward (the stream each op of forward used); a per-thread buffer shared
    between streams would need record_stream or events. The caching allocator already is that
    buffer: a block freed after the matmul is reused by the next request of a similar size on the
    same stream (stream-ordered, no sync, no cudaMalloc), so every layer's dequantize reuses one
    block of the widest layer's size, and tensors used on another stream are not reused early."""
    if packed.device.type != "cpu":
        return dequantize_4bit(packed, state, dtype=dtype)
    return dequantize_4bit(packed, state, dtype=dtype, out=_scratch.get(state.numel, dtype, packed.device))


def _matmul(x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
    """x @ W^T [..., out]. Off the CPU, a few rows (decoding) go through the fused 4-bit
    matrix-vector kernel when one accepts them ("gemv_4bit": W is decoded in registers, never
    written: ~0.5 B of memory traffic per weight instead of ~4.5 B for dequantize + matmul)."""
    if x.device.type != "cpu":
        y = kernels.dispatch("gemv_4bit", x, packed, state)
        if y is not None:
            return y
    weight = _dense(packed, state, x.dtype)  # [out, in], scratch: dead after this matmul
    return x @ weight.t()  # [..., out]


class _Linear4bitFn(torch.autograd.Function):
    """y = x @ W^T with W = dequantize_4bit(packed, state) rebuilt in every pass.

    forward:  W = dequant(packed, state)           [out, in], in x's dtype
              y = x @ W^T                          [..., out]   (few rows on a GPU: fused, _matmul)
    backward: dL/dx = dL/dy @ W                    [..., in]   (W dequantized again)
              no gradient for the frozen 4-bit weight.
    Kept for backward: references to the frozen ``packed`` buffer (uint8) and the state, on the
    context rather than through save_for_backward, so no activation is saved at all (never W);
    gradient checkpointing can then replay this layer's output (model/replay.py).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, packed: torch.Tensor, state: QuantState) -> torch.Tensor:
        ctx.packed, ctx.state = packed, state
        return _matmul(x, packed, state)  # [..., out]

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        grad_x = None
        if ctx.needs_input_grad[0]:
            weight = _dense(ctx.packed, ctx.state, grad_out.dtype)  # [out, in], scratch
            grad_x = grad_out @ weight  # [..., in]
        return grad_x, None, None


class Linear4bit(nn.Module):
    """Frozen 4-bit linear layer: ``y = x @ dequant(W)^T + b`` computed in ``compute_dtype``."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
        device=None,
    ):
        super().__init__()
        self._configure(in_features, out_features, quant_type, blocksize, double_quant, compute_dtype)
        zeros = torch.zeros(out_features, in_features, dtype=compute_dtype, device=device)
        self._set_quantized(*quantize_4bit(zeros, quant_type, blocksize, double_quant))
        b = torch.zeros(out_features, dtype=compute_dtype, device=device) if bias else None
        self.bias = None if b is None else nn.Parameter(b, requires_grad=False)

    # ---- construction -------------------------------------------------------------------
    @classmethod
    def from_quantized(cls, packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor] = None,
                       compute_dtype: torch.dtype = torch.bfloat16) -> "Linear4bit":
        """A layer holding codes quantized elsewhere (no quantization here): ``packed`` uint8
        [out, in/2] and its ``state`` (shape [out, in]); the bias is cast to the compute dtype."""
        out_features, in_features = state.shape
        layer = cls.__new__(cls)  # skip __init__: it would quantize a zero weight first
        nn.Module.__init__(layer)
        layer._configure(in_features, out_features, state.quant_type, state.blocksize, state.nested, compute_dtype)
        layer._set_quantized(packed, state)
        b = None if bias is None else bias.detach().to(compute_dtype).clone()
        layer.bias = None if b is None else nn.Parameter(b, requires_grad=False)
        return layer

    @classmethod
    def from_weight(
        cls,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor] = None,
        quant_type: str = "nf4",
        blocksize: int = 64,
        double_quant: bool = True,
        compute_dtype: torch.dtype = torch.bfloat16,
    ) -> "Linear4bit":
        """Quantize ``weight`` [out, in] (the one place a Linear4bit quantizes), a few rows at a time
        (quantize_weight: the bytes of quantize_4bit with bounded temporaries)."""
        if weight.dim() != 2:
            raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
        check_quant_args(quant_type, blocksize)
        if weight.shape[1] % 2:
            raise ValueError(f"Linear4bit needs an even in_features (two 4-bit codes per byte per row), got {weight.shape[1]}")
        packed, state = quantize_weight(weight.detach(), quant_type, blocksize, double_quant)
        return cls.from_quantized(packed, state, bias, compute_dtype)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs) -> "Linear4bit":
        """Quantize an nn.Linear; kwargs as in :meth:`from_weight` (quant_type, blocksize, ...)."""
        return cls.from_weight(linear.weight, linear.bias, **kwargs)

    def _configure(self, in_features, out_features, quant_type, blocksize, double_quant, compute_dtype) -> None:
        check_quant_args(quant_type, blocksize)
        if in_features % 2:
            raise ValueError(
                f"Linear4bit needs an even in_features (two 4-bit codes per byte per row), got {in_features}"
            )
        self.in_features, self.out_features = in_features, out_features
        self.quant_type, self.blocksize, self.double_quant = quant_type, blocksize, double_quant
        self.compute_dtype = compute_dtype

    def _set_quantized(self, packed: torch.Tensor, state: QuantState) -> None:
        self.register_buffer("weight_packed", packed.reshape(self.out_features, self.in_features // 2))  # [out, in/2]
        stored = state.to_dict(STATE_PREFIX)
        for key in STATE_KEYS:
            self.register_buffer(STATE_PREFIX + key, stored.get(STATE_PREFIX + key))
        self._meta = state.metadata()  # python copy of the JSON blob: no parsing/device sync per forward

    # ---- state ----------------------------------------------------------------------------
    @property
    def quant_state(self) -> QuantState:
        """A QuantState over the current buffers (no copies: follows .to() moves)."""
        tensors = {k: self._buffers[STATE_PREFIX + k] for k in STATE_KEYS if k != META_KEY}
        return QuantState.from_tensors({k: v for k, v in tensors.items() if v is not None}, self._meta)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        """Load the packed weight and its QuantState as a unit: the incoming state may differ
        in double quantization or source dtype from this module's, so buffers are replaced."""
        names = ["weight_packed"] + [STATE_PREFIX + k for k in STATE_KEYS]
        if prefix + "weight_packed" in state_dict and prefix + STATE_PREFIX + META_KEY in state_dict:
            sub = {n: state_dict[prefix + n].detach().clone() for n in names if prefix + n in state_dict}
            state = QuantState.from_dict(sub, STATE_PREFIX)
            if tuple(state.shape) != (self.out_features, self.in_features):
                error_msgs.append(
                    f"{prefix}weight: quantized shape {tuple(state.shape)} != ({self.out_features}, {self.in_features})"
                )
                return
            device = self.weight_packed.device
            self.quant_type, self.blocksize, self.double_quant = state.quant_type, state.blocksize, state.nested
            self._set_quantized(sub["weight_packed"].to(device), state.to(device))
            local_names = set(names)
        else:
            local_names = set()
        # bias (and anything else) through the default path; our buffers are hidden from it
        hidden = {n: self._buffers.pop(n) for n in names if n in self._buffers}
        try:
            super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
            )
        finally:
            self._buffers.update(hidden)
        if not local_names:
            missing_keys.extend(prefix + n for n in names if self._buffers.get(n) is not None)
        for key in list(unexpected_keys):
            if key.startswith(prefix) and key[len(prefix) :] in names:
                unexpected_keys.remove(key)

    def _apply(self, fn, recurse=True):
        """Keep fp32 quantization buffers exact under module.to(dtype): only their device follows."""
        before = {n: b for n, b in self._buffers.items() if b is not None and n.startswith(STATE_PREFIX)}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    # ---- compute --------------------------------------------------------------------------
    def dequantize(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """The weight as a dense [out_features, in_features] tensor (default: compute dtype)."""
        return dequantize_4bit(self.weight_packed, self.quant_state, dtype=dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.compute_dtype)
        y = _Linear4bitFn.apply(x, self.weight_packed, self.quant_state)  # [..., out]
        if self.bias is not None:
            y = y + self.bias.to(self.compute_dtype)
        return y

    def nbytes_weight(self) -> int:
        """Bytes of the packed codes plus the stored QuantState tensors."""
        return self.weight_packed.numel() * self.weight_packed.element_size() + self.quant_state.nbytes()

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"quant_type={self.quant_type}, blocksize={self.blocksize}, double_quant={self.double_quant}, "
            f"compute_dtype={self.compute_dtype}"
        )
