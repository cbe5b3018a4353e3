"""Fewer activations saved for backward, the same forward values: a leaner gated MLP and RMSNorm.

Gated MLP (Llama, Qwen2, Mistral, Gemma, Phi-3, ...):

    g = gate(x), u = up(x)                                   [T, I] each (I = intermediate size)
    p = act(g) * u                                           [T, I]
    y = down(p)                                              [T, H]

Plain autograd keeps four [T, I] tensors per layer for backward: g (for act's backward), act(g)
and u (for the product's backward) and p (for the down projection's LoRA A gradient; a frozen
base layer needs no input). Here only g and u are kept:

    forward:  p = act(g) * u                 saved: g, u (`_GatedProduct`)
    backward: a = act(g) recomputed          dg = act'(g) * (dp * u), du = dp * a
    down(p):  p is not kept; a saved-tensor hook rebuilds it as act(g) * u when backward needs it

The rebuilt tensors are bit for bit the ones plain autograd keeps (the same ops on the same
inputs), so losses and gradients are unchanged; the cost is one more act(g) * u per layer in
backward. Under checkpointing (or any other saved-tensor hooks) the down projection's input is
saved as usual: checkpointing already drops it, and hooks must not nest.

RMSNorm (the Llama form y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), x32 = x.float()):
plain autograd keeps the fp32 copy x32 [T, H]; `_RMSNorm` keeps x in its own dtype (half the
bytes in bf16) and rsqrt [T, 1], with the same forward values and the gradient formed in fp32:

    dn = (dy * w).float();  dx = (r * dn - x32 * r^3 * mean(dn * x32)).to(x.dtype)

(equal to autograd's up to fp32 rounding order). Qwen2.5-0.5B at T=256 without checkpointing:
2 x 24 x [256, 4864] bf16 = 120 MB less for the MLPs, 49 x 0.46 MB for the norms.

`lean_activations(model)` patches modules of classes whose forward is known to read exactly as
above (`GATED_MLP_CLASSES`, `RMS_NORM_CLASSES`, checked against the installed source);
tests/model/test_lean.py checks each family against the unpatched model.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import types
from typing import Callable

import torch
from torch import nn

# transformers MLP classes computing down(act(gate(x)) * up(x)) with separate gate/up projections,
# or (gate_up_proj) down(up * act(gate)) with gate, up = gate_up_proj(x).chunk(2, -1). A class is
# patched only if its forward's source still reads that way (whitespace ignored): a transformers
# release that changes it keeps its own forward.
GATED_MLP_CLASSES = {
    "LlamaMLP": "gate_up", "Qwen2MLP": "gate_up", "Qwen3MLP": "gate_up", "MistralMLP": "gate_up",
    "GemmaMLP": "gate_up", "Gemma2MLP": "gate_up", "Phi3MLP": "fused",
}
_EXPECTED_SOURCE = {
    "gate_up": ("self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",),
    "fused": ("up_states=self.gate_up_proj(hidden_states)", "gate,up_states=up_states.chunk(2,dim=-1)",
              "up_states=up_states*self.activation_fn(gate)", "returnself.down_proj(up_states)"),
}


class _GatedProduct(torch.autograd.Function):
    """p = act(g) * u, keeping only g and u for backward (act(g) is recomputed there)."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor, act: Callable) -> torch.Tensor:
        ctx.act = act
        ctx.save_for_backward(g, u)
        return act(g) * u

    @staticmethod
    def backward(ctx, dp: torch.Tensor):
        g, u = ctx.saved_tensors
        with torch.enable_grad():
            gg = g.detach().requires_grad_(ctx.needs_input_grad[0])
            a = ctx.act(gg)                                       # act(g), as in forward
        du = dp * a.detach() if ctx.needs_input_grad[1] else None  # d(a * u)/du
        dg = None
        if ctx.needs_input_grad[0]:
            (dg,) = torch.autograd.grad(a, gg, dp * u)            # act'(g) * (dp * u)
        return dg, du, None


RMS_NORM_CLASSES = ("LlamaRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "MistralRMSNorm", "Phi3RMSNorm")
_NORM_SOURCE = ("input_dtype=hidden_states.dtype", "hidden_states=hidden_states.to(torch.float32)",
                "variance=hidden_states.pow(2).mean(-1,keepdim=True)",
                "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)",
                "returnself.weight*hidden_states.to(input_dtype)")


class _RMSNorm(torch.autograd.Function):
    """y = w * (x32 * r).to(x.dtype), r = rsqrt(mean(x32^2, -1) + eps), x32 = x.float().
    Saved: x (its own dtype), r [..., 1] fp32 and w (a parameter: no copy)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.to(torch.float32)                                         # [..., H]
        r = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)          # [..., 1]
        ctx.save_for_backward(x, r, weight)
        return weight * (x32 * r).to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        x, r, weight = ctx.saved_tensors
        x32 = x.to(torch.float32)
        dx = dw = None
        if ctx.needs_input_grad[1]:
            dw = (dy * (x32 * r).to(x.dtype)).sum_to_size(weight.shape).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            dn = (dy * weight).to(x.dtype).to(torch.float32)                # [..., H] d/d(x32 * r)
            s = (dn * x32).mean(-1, keepdim=True)                             # [..., 1]
            dx = (dn * r - x32 * (r.pow(3) * s)).to(x.dtype)
        return dx, dw, None


def _forward_rms_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
    return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)


def _hooks_active() -> bool:
    """True when saved-tensor hooks (e.g. non-reentrant checkpointing) are already in force."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is None or top(False) is not None


class _RebuildProduct(torch.autograd.graph.saved_tensors_hooks):
    """While the down projection runs: a saved tensor that is (a view of) p is stored as a recipe
    and rebuilt from g and u when backward unpacks it."""

    def __init__(self, p: torch.Tensor, g: torch.Tensor, u: torch.Tensor, act: Callable):
        # the hooks live as long as the tensors they packed: capture p's identity, never p itself
        storage, dtype = p.untyped_storage().data_ptr(), p.dtype

        def pack(t: torch.Tensor):
            if t.dtype == dtype and t.untyped_storage().data_ptr() == storage:
                return ("rebuild", t.shape, t.stride(), t.storage_offset())
            return t

        def unpack(packed):
            if isinstance(packed, torch.Tensor):
                return packed
            _, shape, stride, offset = packed
            with torch.no_grad():
                full = act(g) * u                                 # p's values, contiguous like p
            return full.as_strided(shape, stride, offset)

        super().__init__(pack, unpack)


def _gated(module: nn.Module, g: torch.Tensor, u: torch.Tensor, act: Callable) -> torch.Tensor:
    p = _GatedProduct.apply(g, u, act)
    if not torch.is_grad_enabled() or not p.requires_grad or _hooks_active():
        return module.down_proj(p)
    with _RebuildProduct(p, g.detach(), u.detach(), act):
        y = module.down_proj(p)
    return y


def _forward_gate_up(self, x: torch.Tensor) -> torch.Tensor:
    return _gated(self, self.gate_proj(x), self.up_proj(x), self.act_fn)


def _forward_fused(self, hidden_states: torch.Tensor) -> torch.Tensor:
    gate, up = self.gate_up_proj(hidden_states).chunk(2, dim=-1)
    return _gated(self, gate, up, self.activation_fn)


def _source_has(cls: type, parts: tuple[str, ...]) -> bool:
    """True when cls.forward's source (whitespace removed) contains every part."""
    try:
        source = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return False
    return all(part in source for part in parts)


def _lean_forward(cls: type):
    """The lean forward for instances of `cls`, or None when it has none (or its source changed)."""
    kind = GATED_MLP_CLASSES.get(cls.__name__)
    if kind is not None and _source_has(cls, _EXPECTED_SOURCE[kind]):
        return _forward_gate_up if kind == "gate_up" else _forward_fused
    if cls.__name__ in RMS_NORM_CLASSES and _source_has(cls, _NORM_SOURCE):
        return _forward_rms_norm
    return None


@functools.lru_cache(maxsize=None)
def lean_applies(model_type: str) -> dict:
    """{"mlp": bool, "norm": bool}: whether `lean_activations` patches the gated MLP / RMSNorm of
    transformers' `model_type` family (classes <Type>MLP / <Type>RMSNorm in modeling_<type>.py)."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return {"mlp": False, "norm": False}
    prefix = model_type.capitalize()
    mlp, norm = getattr(module, prefix + "MLP", None), getattr(module, prefix + "RMSNorm", None)
    return {"mlp": mlp is not None and _lean_forward(mlp) is not None,
            "norm": norm is not None and _lean_forward(norm) is not None}


def lean_activations(model: nn.Module, mlp: bool = True, norms: bool = True) -> int:
    """Give every known gated MLP (`mlp`) and RMSNorm (`norms`) of `model` the lean forward
    (module docstring); returns how many modules were patched."""
    count = 0
    for module in model.modules():
        if getattr(module, "_lorakit_lean", False):
            continue
        forward = _lean_forward(type(module))
        if forward is None or (forward is _forward_rms_norm and not norms) or (forward is not _forward_rms_norm and not mlp):
            continue
        module.forward = types.MethodType(forward, module)
        module._lorakit_lean = True
        count += 1
    return count
