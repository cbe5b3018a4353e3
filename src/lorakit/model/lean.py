"""Fewer activations saved for backward, the same values: a leaner gated MLP.

A gated MLP (Llama, Qwen2, Mistral, Gemma, Phi-3, ...) computes

    g = gate(x), u = up(x)                                   [T, I] each (I = intermediate size)
    p = act(g) * u                                           [T, I]
    y = down(p)                                              [T, H]

and plain autograd keeps four [T, I] tensors per layer for backward: g (for act's backward),
act(g) and u (for the product's backward) and p (for the down projection's LoRA A gradient;
a frozen base layer needs no input). Here only g and u are kept:

    forward:  p = act(g) * u                 saved: g, u (`_GatedProduct`)
    backward: a = act(g) recomputed          dg = act'(g) * (dp * u), du = dp * a
    down(p):  p is not kept; a saved-tensor hook rebuilds it as act(g) * u when backward needs it

The rebuilt tensors are bit for bit the ones plain autograd keeps (the same ops on the same inputs),
so losses and gradients are unchanged; the cost is one more act(g) * u per layer in backward. On
Qwen2.5-0.5B at T=256 that is 2 x 24 x [256, 4864] bf16 = 120 MB less at the end of the forward
pass without gradient checkpointing. Under checkpointing (or any other saved-tensor hooks) the
down projection's input is saved as usual: checkpointing already drops it, and hooks must not nest.

Applied by `lean_activations(model)` to MLP classes whose forward is known to be exactly the form
above (`GATED_MLP_CLASSES`); tests/model/test_lean.py checks each family against the unpatched model.
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


def _known_form(cls: type) -> str | None:
    """"gate_up" / "fused" when `cls` is a listed MLP class whose forward reads as expected."""
    kind = GATED_MLP_CLASSES.get(cls.__name__)
    if kind is None:
        return None
    try:
        source = "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return None
    return kind if all(part in source for part in _EXPECTED_SOURCE[kind]) else None


@functools.lru_cache(maxsize=None)
def lean_mlp_applies(model_type: str) -> bool:
    """True when `lean_activations` patches the MLP of transformers' `model_type` family (its
    modeling_<type>.py defines a listed class, <Type>MLP, whose forward reads as expected)."""
    name = model_type.capitalize() + "MLP"
    if name not in GATED_MLP_CLASSES:
        return False
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return False
    cls = getattr(module, name, None)
    return cls is not None and _known_form(cls) is not None


def lean_activations(model: nn.Module) -> int:
    """Give every known gated MLP of `model` the lean forward (module docstring); returns how many."""
    count = 0
    for module in model.modules():
        kind = _known_form(type(module))
        if kind is None or getattr(module, "_lorakit_lean", False):
            continue
        forward = _forward_gate_up if kind == "gate_up" else _forward_fused
        module.forward = types.MethodType(forward, module)
        module._lorakit_lean = True
        count += 1
    return count
