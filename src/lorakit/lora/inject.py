"""Put adapters into a model, freeze everything else, and take them out again."""

from __future__ import annotations

from typing import Iterator

import torch
from torch import nn

from ..config import LoraConfig
from ..model.lean import remove_lean
from ..model.load import PREPARED_ATTR  # the loader's weight preparer (lora/init.py ResidualInit), if any
from ..model.modules import compute_dtype_of, replace_module
from ..model.targets import find_targets, name_matches
from ..quant.linear4bit import Linear4bit
from .embedding import LoRAEmbedding
from .init import ResidualInit, init_residual_
from .layer import LoRALinear, ModulesToSave

ADAPTER_PARAMS = (".lora_A.", ".lora_B.", ".lora_embedding_A", ".lora_embedding_B", ".lora_magnitude_vector")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every LoRA layer: LoRALinear and LoRAEmbedding."""
    for name, module in model.named_modules():
        if isinstance(module, (LoRALinear, LoRAEmbedding)):
            yield name, module


def is_adapter_param(name: str) -> bool:
    return any(k in name for k in ADAPTER_PARAMS)


def add_lora(model: nn.Module, config: LoraConfig) -> nn.Module:
    """Wrap the target layers of `model` in LoRALinear (in place) and freeze all other weights.

    Returns the same model object. Trainable afterwards: lora_A/lora_B (lora_embedding_A/B for
    embedding tables, lora_magnitude_vector with DoRA), the `modules_to_save` copies, and biases
    per `config.bias`. With lora.init pissa/olora the adapted base weights become the residual
    (lora/init.py), from the factors the loader computed when the model was loaded with
    `prepare=ResidualInit(config)` (required for a 4-bit base), else from the dense weights now.
    """
    if any(True for _ in adapter_layers(model)):
        raise ValueError("this model already has LoRA adapters; call lorakit.unload(model) first")
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    prepared = getattr(model, PREPARED_ATTR, None)
    shared = _shared_weights(model) if config.residual_init else set()
    for name in targets:
        base = model.get_submodule(name)
        replace_module(model, name, _wrap(base, name, config, prepared, shared))
    if hasattr(model, PREPARED_ATTR):
        delattr(model, PREPARED_ATTR)  # its factors now live in the layers (initial_lora_A/B)
    _wrap_modules_to_save(model, config.modules_to_save)
    _set_bias_trainable(model, config.bias)
    model.lorakit_config = config  # read by save_adapter / merge; a plain attribute, no patching
    return model


def _wrap(base: nn.Module, name: str, config: LoraConfig, prepared, shared: set) -> nn.Module:
    """The LoRA layer for one target, initialised as config.init says."""
    if isinstance(base, nn.Embedding):
        dtype = torch.float32 if config.adapter_dtype == "float32" else base.weight.dtype
        layer = LoRAEmbedding(base, config.r, config.alpha, config.use_rslora, adapter_dtype=dtype,
                              branch_dtype=config.branch_dtype, use_dora=config.use_dora)
        if config.residual_init:
            layer.keep_initial_()  # embeddings keep their base: A0 = B0 = 0 for the conversion
        return layer
    dtype = torch.float32 if config.adapter_dtype == "float32" else compute_dtype_of(base)
    residual = config.residual_init
    layer = LoRALinear(base, config.r, config.alpha, config.dropout, config.use_rslora, adapter_dtype=dtype,
                       branch_dtype=config.branch_dtype, use_dora=config.use_dora and not residual,
                       init=config.init)
    if residual:
        if id(getattr(base, "weight", None)) in shared:
            raise ValueError(f"{name}: lora.init={config.init!r} rewrites the base weight to its residual, but this "
                             f"weight is tied to another module (e.g. a tied lm_head); use lora.init default/gaussian")
        layer.use_dora = config.use_dora
        init_residual_(layer, name, config, prepared if isinstance(prepared, ResidualInit) else None)
    return layer


def _shared_weights(model: nn.Module) -> set[int]:
    """ids of parameters held by more than one module (tied weights)."""
    seen: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, n in seen.items() if n > 1}


def _wrap_modules_to_save(model: nn.Module, names: tuple[str, ...]) -> None:
    if not names:
        return
    found = [n for n, m in model.named_modules()
             if n and name_matches(n, names) and not isinstance(m, (LoRALinear, LoRAEmbedding, ModulesToSave))
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
    for name, layer in list(adapter_layers(model)):
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
    base model's weights (4-bit weights as their number of weights, LoRA matrices, DoRA magnitudes
    and the frozen originals kept by modules_to_save excluded), so one 4096x4096 layer at r=8 gives
    (65,536, 16,777,216)."""
    trainable = total = 0
    for name, p in model.named_parameters():
        trainable += p.numel() if p.requires_grad else 0
        if ".original_module." not in name and not is_adapter_param(name):
            total += p.numel()
    for module in model.modules():
        if isinstance(module, Linear4bit):
            total += module.in_features * module.out_features
    return trainable, total


def format_trainable(model: nn.Module) -> str:
    """'trainable 65,536 of 16,777,216 (0.39%)'."""
    trainable, total = count_parameters(model)
    return f"trainable {trainable:,} of {total:,} ({100.0 * trainable / max(total, 1):.2f}%)"
