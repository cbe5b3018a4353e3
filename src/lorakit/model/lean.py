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
backward. Under gradient checkpointing the down projection's input is saved as usual
(`rebuild=False`): checkpointing already drops it, and its saved-tensor hooks must see it.

RMSNorm (the Llama form y = w * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype), x32 = x.float()):
plain autograd keeps the fp32 copy x32 [T, H]; `_RMSNorm` keeps x in its own dtype (half the
bytes in bf16) and rsqrt [T, 1], with the same forward values and the gradient formed in fp32:

    dn = (dy * w).float();  dx = (r * dn - x32 * r^3 * mean(dn * x32)).to(x.dtype)

(equal to autograd's up to fp32 rounding order). Qwen2.5-0.5B at T=256 without checkpointing:
2 x 24 x [256, 4864] bf16 = 120 MB less for the MLPs, 49 x 0.46 MB for the norms.

`install_lean(model)` swaps each gated MLP and RMSNorm whose class computes exactly the forms above
for a `LeanGatedMLP` / `LeanRMSNorm` module (as add_lora swaps Linear layers for LoRALinear): the
lean module takes over the original's children and parameters under the same names, so state
dicts, LoRA target names and PEFT keys do not change, and `print(model)` shows it. `remove_lean`
swaps the originals back (merge and unload call it). A module is swapped only when its class's
forward *is* one of the known forms (its AST, so formatting and comments do not matter; any added
branch fails closed) and the instance carries no forward of its own (one installed by accelerate,
Liger or `kernels`: that one is kept). tests/model/test_lean.py checks each family against the
plain model.
"""

from __future__ import annotations

import ast
import functools
import importlib
import inspect
import textwrap
from typing import Callable, Optional

import torch
from torch import nn

from .modules import replace_module

# The forward bodies lean modules replace, as ast.unparse writes them: (argument names, body).
# "gate_up": Llama, Qwen2/3, Mistral, Gemma, Gemma-2 MLPs; "fused": Phi-3's gate_up_proj MLP;
# "rms_norm": the Llama-form RMSNorm (Llama, Qwen2/3, Mistral, Phi-3; Gemma's differs: w + 1).
FORMS = {
    "gate_up": (("self", "x"), "down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))\n"
                               "return down_proj"),
    "fused": (("self", "hidden_states"), "up_states = self.gate_up_proj(hidden_states)\n"
                                         "gate, up_states = up_states.chunk(2, dim=-1)\n"
                                         "up_states = up_states * self.activation_fn(gate)\n"
                                         "return self.down_proj(up_states)"),
    "rms_norm": (("self", "hidden_states"), "input_dtype = hidden_states.dtype\n"
                                            "hidden_states = hidden_states.to(torch.float32)\n"
                                            "variance = hidden_states.pow(2).mean(-1, keepdim=True)\n"
                                            "hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)\n"
                                            "return self.weight * hidden_states.to(input_dtype)"),
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


class LeanGatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)) keeping only g = gate(x) and u = up(x) for backward (module
    docstring). Holds the replaced MLP's children under their own names (gate_proj, up_proj,
    down_proj, act_fn; Phi-3: gate_up_proj, down_proj, activation_fn).

    rebuild: rebuild the down projection's input in backward from g and u instead of keeping it.
    Off under gradient checkpointing, which already drops it (and whose saved-tensor hooks must see
    every tensor a checkpointed layer saves)."""

    def __init__(self, mlp: nn.Module, form: str, rebuild: bool = True):
        super().__init__()
        if form not in ("gate_up", "fused"):
            raise ValueError(f"LeanGatedMLP form must be 'gate_up' or 'fused', got {form!r}")
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.form, self.rebuild = form, rebuild
        self.__dict__["replaced"] = mlp  # not a child: its children are ours now (remove_lean gives them back)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.form == "gate_up":
            g, u, act = self.gate_proj(x), self.up_proj(x), self.act_fn          # [..., I] each
        else:
            g, u = self.gate_up_proj(x).chunk(2, dim=-1)                          # [..., I] each
            act = self.activation_fn
        p = _GatedProduct.apply(g, u, act)                                        # [..., I]
        if not (self.rebuild and torch.is_grad_enabled() and p.requires_grad):
            return self.down_proj(p)
        with _RebuildProduct(p, g.detach(), u.detach(), act):
            return self.down_proj(p)                                              # [..., H]

    def extra_repr(self) -> str:
        return f"lean: keeps gate and up outputs only, rebuild down input={self.rebuild}"


class LeanRMSNorm(nn.Module):
    """The Llama-form RMSNorm keeping its input in its own dtype for backward (`_RMSNorm`); the
    same `weight` parameter and `variance_epsilon` as the norm it replaces."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.weight = norm.weight
        self.variance_epsilon = norm.variance_epsilon
        self.__dict__["replaced"] = norm

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(hidden_states, self.weight, self.variance_epsilon)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}, lean: keeps its input in its own dtype"


def _form_of(cls: type) -> Optional[str]:
    """Which of FORMS `cls.forward` is (None: another forward, or its source is unavailable)."""
    return _form_of_function(cls.forward)


@functools.lru_cache(maxsize=None)
def _form_of_function(fn) -> Optional[str]:
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    node = tree.body[0]
    if not isinstance(node, ast.FunctionDef):
        return None
    body = [s for s in node.body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))]  # docstring
    key = (tuple(a.arg for a in node.args.args), "\n".join(ast.unparse(s) for s in body))
    return next((name for name, form in FORMS.items() if form == key), None)


def lean_form(module: nn.Module) -> Optional[str]:
    """The lean module `install_lean` would put in place of `module`: "gate_up" / "fused" (an MLP),
    "rms_norm", or None (unknown forward, or the instance carries a forward of its own)."""
    if isinstance(module, (LeanGatedMLP, LeanRMSNorm)) or "forward" in module.__dict__:
        return None
    return _form_of(type(module))


def install_lean(model: nn.Module, mlp: bool = True, norms: bool = True, rebuild: Optional[bool] = None) -> dict:
    """Swap every known gated MLP (`mlp`) and RMSNorm (`norms`) of `model` for its lean module;
    returns {"mlp": count, "norm": count}. `rebuild` (LeanGatedMLP) defaults to "not under gradient
    checkpointing" (model.is_gradient_checkpointing): enable checkpointing first."""
    if rebuild is None:  # transformers >= 5 names it activation checkpointing
        rebuild = not (getattr(model, "is_activation_checkpointing", False)
                       or getattr(model, "is_gradient_checkpointing", False))
    counts = {"mlp": 0, "norm": 0}
    for name, module in list(model.named_modules()):
        form = lean_form(module)
        if form in ("gate_up", "fused") and mlp:
            new, kind = LeanGatedMLP(module, form, rebuild), "mlp"
        elif form == "rms_norm" and norms:
            new, kind = LeanRMSNorm(module), "norm"
        else:
            continue
        if name:
            replace_module(model, name, new)
        else:
            raise ValueError("install_lean: pass the model that contains the MLP / norm, not the module itself")
        counts[kind] += 1
    return counts


def remove_lean(model: nn.Module) -> int:
    """Put back every module install_lean replaced (with its current children, e.g. LoRA layers or
    their merged copies); returns how many."""
    count = 0
    for name, module in list(model.named_modules()):
        if isinstance(module, (LeanGatedMLP, LeanRMSNorm)):
            original = module.replaced
            for child_name, child in module.named_children():
                setattr(original, child_name, child)
            if isinstance(module, LeanRMSNorm):
                original.weight = module.weight
            replace_module(model, name, original)
            count += 1
    return count


@functools.lru_cache(maxsize=None)
def lean_applies(model_type: str) -> dict:
    """{"mlp": bool, "norm": bool}: whether install_lean swaps the gated MLP / RMSNorm of
    transformers' `model_type` family (classes <Type>MLP / <Type>RMSNorm in modeling_<type>.py)."""
    try:
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    except ImportError:
        return {"mlp": False, "norm": False}
    prefix = model_type.capitalize()
    mlp, norm = getattr(module, prefix + "MLP", None), getattr(module, prefix + "RMSNorm", None)
    return {"mlp": mlp is not None and _form_of(mlp) in ("gate_up", "fused"),
            "norm": norm is not None and _form_of(norm) == "rms_norm"}
