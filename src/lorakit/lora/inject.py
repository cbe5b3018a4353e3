"""Put adapters into a model, freeze everything else, and take them out again."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..config import LoraConfig
from ..model.lean import remove_lean
from ..model.modules import compute_dtype_of, replace_module
from ..model.targets import find_targets, name_matches
from ..quant.linear4bit import Linear4bit
from .layer import LoRALinear, ModulesToSave


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the target layers of `model` in LoRALinear (in place) and freeze all other weights.

    Returns the same model object. Trainable afterwards: lora_A/lora_B, the `modules_to_save`
    copies, and biases per `config.bias`.
    """
    if any(True for _ in lora_layers(model)):
        raise ValueError("this model already has LoRA adapters; call lorakit.unload(model) first")
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    for name in targets:
        base = model.get_submodule(name)
        dtype = torch.float32 if config.adapter_dtype == "float32" else compute_dtype_of(base)
        replace_module(model, name, LoRALinear(base, config.r, config.alpha, config.dropout,
                                               config.use_rslora, adapter_dtype=dtype,
                                               branch_dtype=config.branch_dtype))
    _wrap_modules_to_save(model, config.modules_to_save)
    _set_bias_trainable(model, config.bias)
    model.lorakit_config = config  # read by save_adapter / merge; a plain attribute, no patching
    return model


def _wrap_modules_to_save(model: nn.Module, names: tuple[str, ...]) -> None:
    if not names:
        return
    found = [n for n, m in model.named_modules()
             if n and name_matches(n, names) and not isinstance(m, (LoRALinear, ModulesToSave))
             and ".original_module" not in n and ".module" not in n]
    missing = [k for k in names if not any(n == k or n.endswith("." + k) for n in found)]
    if missing:
        raise ValueError(f"lora.modules_to_save: no module named {missing}; top-level modules: "
                         f"{sorted({n for n, _ in model.named_modules() if n.count('.') <= 1 and n})}")
    for name in found:
        replace_module(model, name, ModulesToSave(model.get_submodule(name)))


def _set_bias_trainable(model: nn.Module, mode: str) -> None:
    if mode == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias") and ".original_module." not in name:
                p.requires_grad_(True)
    elif mode == "lora_only":
        for _, layer in lora_layers(model):
            bias = getattr(layer.base_layer, "bias", None)
            if isinstance(bias, nn.Parameter):
                bias.requires_grad_(True)


def unload(model: nn.Module) -> nn.Module:
    """Remove every adapter and put the original layers back (the base model, unchanged: lean
    training modules, model/lean.py, are swapped back too)."""
    for name, layer in list(lora_layers(model)):
        replace_module(model, name, layer.base_layer)
    for name, module in list(model.named_modules()):
        if isinstance(module, ModulesToSave):
            replace_module(model, name, module.original_module)
    remove_lean(model)
    if hasattr(model, "lorakit_config"):
        del model.lorakit_config
    return model


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total): trainable counts every parameter that requires grad; total counts the
    base model's weights (4-bit weights as their number of weights, LoRA matrices and the frozen
    originals kept by modules_to_save excluded), so one 4096x4096 layer at r=8 gives
    (65,536, 16,777,216)."""
    trainable = total = 0
    for name, p in model.named_parameters():
        trainable += p.numel() if p.requires_grad else 0
        if ".original_module." not in name and ".lora_A." not in name and ".lora_B." not in name:
            total += p.numel()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            total += module.in_features * module.out_features
    return trainable, total


def format_trainable(model: nn.Module) -> str:
    """'trainable 65,536 of 16,777,216 (0.39%)'."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
