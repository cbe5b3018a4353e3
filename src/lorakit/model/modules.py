"""Layer helpers every other package uses: what a linear layer is, its weight as [out, in], and
replacing a module in place. A leaf module (torch, transformers' Conv1D, quant.linear4bit only),
so model/, lora/ and train/ import it and never each other sideways.

The three linear layer kinds lorakit meets:

    nn.Linear        weight [out, in]
    Conv1D           transformers' GPT-2 layer, weight stored transposed as [in, out] (nf = out)
    Linear4bit       lorakit's frozen 4-bit layer (quant/linear4bit.py), packed [out, in/2] + state
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..quant.linear4bit import Linear4bit


def is_conv1d(layer: nn.Module) -> bool:
    return isinstance(layer, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, transformers' Conv1D (GPT-2) or lorakit's Linear4bit."""
    return isinstance(module, (nn.Linear, Conv1D, Linear4bit))


def linear_features(layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear, a transformers Conv1D or a Linear4bit."""
    if is_conv1d(layer):
        in_f, out_f = layer.weight.shape  # Conv1D stores W^T: [in, out]
        return in_f, out_f
    if hasattr(layer, "in_features") and hasattr(layer, "out_features"):
        return layer.in_features, layer.out_features
    raise TypeError(f"{type(layer).__name__} is not a linear layer lorakit can adapt")


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as [out, in] in fp32 (dequantized for 4-bit layers, transposed for Conv1D)."""
    if isinstance(layer, Linear4bit):
        return layer.dequantize(torch.float32)
    w = layer.weight.detach().float()
    return w.t() if is_conv1d(layer) else w


def compute_dtype_of(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: a Linear4bit's compute_dtype, else its weight's dtype."""
    return layer.compute_dtype if isinstance(layer, Linear4bit) else layer.weight.dtype


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where the module called `name` is (the one way lorakit changes a model's layers)."""
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: the device of its first parameter (or buffer)."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
