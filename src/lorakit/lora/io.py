"""Adapters on disk in PEFT's format, exactly.

    adapter_config.json          peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   [r, in]
                                 base_model.model.<module path>.lora_B.weight   [out, r]
                                 base_model.model.<module path>.base_layer.bias (bias="lora_only"/"all")
                                 base_model.model.<module path>.weight          (modules_to_save)

`peft.PeftModel.from_pretrained(base, folder)` loads what `save_adapter` writes, and
`load_adapter` loads what PEFT writes.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import LoraConfig
from ..utils.fs import output_folder
from .inject import add_lora, lora_layers
from .layer import ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> model nesting

# PEFT LoraConfig fields that only matter for features lorakit does not implement: a non-default
# value is an error (loading would silently compute something else); the default is fine.
_UNSUPPORTED_IF_SET = {
    "use_dora": False, "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {}, "loftq_config": {}, "trainable_token_indices": None,
    "target_parameters": None, "layer_replication": None, "use_qalora": False, "megatron_config": None,
    "alora_invocation_tokens": None, "eva_config": None, "corda_config": None, "arrow_config": None,
}
# Fields lorakit reads, or that carry no behaviour.
_KNOWN = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "bias", "use_rslora", "fan_in_fan_out", "modules_to_save", "base_model_name_or_path", "revision",
    "inference_mode", "init_lora_weights", "auto_mapping", "peft_version", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "lorakit_version",
}


def adapter_config_dict(model: nn.Module, config: LoraConfig, base_model_name_or_path: Optional[str]) -> dict:
    names = [n for n, _ in lora_layers(model)]
    if isinstance(config.target_modules, str) and config.target_modules != "all-linear":
        targets = config.target_modules  # a regex: PEFT applies it the same way
    else:
        targets = sorted({n.split(".")[-1] for n in names})  # PEFT suffix list, as PEFT saves "all-linear"
    mts = [n for n, m in model.named_modules() if isinstance(m, ModulesToSave)]
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM",
        "r": config.r, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": targets, "exclude_modules": _jsonable(config.exclude_modules),
        "bias": config.bias, "use_rslora": config.use_rslora,
        "fan_in_fan_out": any(layer.fan_in_fan_out for _, layer in lora_layers(model)),
        "modules_to_save": sorted({n.split(".")[-1] for n in mts}) or None,
        "base_model_name_or_path": base_model_name_or_path,
        "init_lora_weights": True, "inference_mode": True, "use_dora": False,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable part of the model under PEFT's key names."""
    config: LoraConfig = model.lorakit_config
    out = {}
    for name, layer in lora_layers(model):
        out[f"{PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
        bias = getattr(layer.base_layer, "bias", None)
        if config.bias != "none" and bias is not None:
            out[f"{PREFIX}{name}.base_layer.bias"] = bias
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.requires_grad and ".module." not in name and ".base_layer." not in name:
                out[PREFIX + name] = p
    for name, module in model.named_modules():
        if isinstance(module, ModulesToSave):
            for pname, p in module.module.named_parameters():
                out[f"{PREFIX}{name}.{pname}"] = p
    # a parameter sharded by FSDP2 is gathered whole (full_tensor: a collective every rank calls)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().contiguous().cpu() for k, v in out.items()}


def write_adapter_files(model: nn.Module, folder: Path, base_model_name_or_path: Optional[str] = None,
                        tensors: Optional[dict] = None) -> None:
    """Write the two adapter files into an existing folder (not atomic; see save_adapter); `tensors`:
    adapter_state_dict(model) when already computed (on every rank of a distributed run)."""
    from safetensors.torch import save_file

    if not hasattr(model, "lorakit_config"):
        raise ValueError("this model has no lorakit adapters; call lorakit.add_lora first")
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    cfg = adapter_config_dict(model, model.lorakit_config, base)
    save_file(tensors if tensors is not None else adapter_state_dict(model), str(Path(folder) / WEIGHTS_NAME),
              metadata={"format": "pt"})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: Optional[str] = None,
                 overwrite: bool = False, tensors: Optional[dict] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors to `path` (a new or empty folder, or,
    with `overwrite`, a previous lorakit adapter folder), atomically; see utils/fs.py."""
    with output_folder(path, "adapter", overwrite) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path, tensors)
    return Path(path)


def read_adapter_config(path: str | Path) -> LoraConfig:
    """adapter_config.json -> LoraConfig; unknown fields warn, unsupported features are errors."""
    file = Path(path) / CONFIG_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist; an adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}: not valid JSON ({e})") from None
    if raw.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"{file}: peft_type={raw.get('peft_type')!r}; lorakit loads only 'LORA' adapters")
    for key, default in _UNSUPPORTED_IF_SET.items():
        if key in raw and raw[key] not in (default, None, {}, False):
            raise ValueError(f"{file}: {key}={raw[key]!r} is a PEFT feature lorakit does not support "
                             f"(allowed: {default!r})")
    unknown = sorted(set(raw) - _KNOWN - set(_UNSUPPORTED_IF_SET))
    if unknown:
        warnings.warn(f"{file}: ignoring unknown adapter_config fields {unknown}", stacklevel=3)
    targets = raw.get("target_modules") or "all-linear"
    return LoraConfig(
        r=int(raw["r"]), alpha=float(raw.get("lora_alpha", raw["r"])), dropout=float(raw.get("lora_dropout") or 0.0),
        target_modules=tuple(targets) if isinstance(targets, list) else targets,
        exclude_modules=_tuple_or(raw.get("exclude_modules")), modules_to_save=tuple(raw.get("modules_to_save") or ()),
        bias=raw.get("bias", "none"), use_rslora=bool(raw.get("use_rslora", False)),
    )


def _tuple_or(v):
    return tuple(v) if isinstance(v, list) else v


def load_adapter(model: nn.Module, path: str | Path, trainable: bool = True) -> nn.Module:
    """Load a PEFT-format LoRA adapter into `model` (adding the LoRA layers if it has none).

    Every tensor in the file must find its module with the same shape, and every adapted layer
    must get its weights; otherwise the error names the module.
    """
    from safetensors.torch import load_file

    path = Path(path)
    config = read_adapter_config(path)
    weights_file = path / WEIGHTS_NAME
    if not weights_file.is_file():
        raise FileNotFoundError(f"{weights_file} does not exist (only safetensors adapters are loaded; "
                                f"lorakit never unpickles adapter_model.bin)")
    tensors = {strip_prefix(k): v for k, v in load_file(str(weights_file)).items()}
    lora_names = sorted({k.rsplit(".lora_", 1)[0] for k in tensors if ".lora_" in k})
    if not hasattr(model, "lorakit_config"):
        missing = [n for n in lora_names if not _has_module(model, n)]
        if missing:
            raise ValueError(f"{weights_file}: the model has no module {missing[0]!r} "
                             f"({len(missing)} adapter modules missing): is this the right base model?")
        exact = tuple(lora_names)  # adapt exactly the layers the file has weights for
        add_lora(model, LoraConfig(**{**config.__dict__, "target_modules": exact, "exclude_modules": None}))
    _copy_into(model, tensors, weights_file)
    for name, p in model.named_parameters():
        if ".lora_A." in name or ".lora_B." in name or ".module." in name:
            p.requires_grad_(trainable)
    return model


def strip_prefix(key: str) -> str:
    """A PEFT file's tensor name -> the module path lorakit uses ("base_model.model." and ".default." dropped)."""
    key = key[len(PREFIX):] if key.startswith(PREFIX) else key
    return re.sub(r"\.(lora_[AB])\.default\.", r".\1.", key)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _copy_into(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    params = dict(model.named_parameters())
    # modules_to_save copies live at <name>.module.<param>; the file names them <name>.<param>
    for name, m in model.named_modules():
        if isinstance(m, ModulesToSave):
            for pname, p in m.module.named_parameters():
                params[f"{name}.{pname}"] = p
    expected = {f"{n}.lora_{ab}.weight" for n, _ in lora_layers(model) for ab in "AB"}
    absent = sorted(expected - set(tensors))
    if absent:
        raise ValueError(f"{source}: no weights for {absent[0]!r} ({len(absent)} missing); "
                         f"the adapter does not match this model's LoRA layers")
    with torch.no_grad():
        for key, value in tensors.items():
            target = params.get(key)
            if target is None:
                raise ValueError(f"{source}: tensor {key!r} has no matching parameter in the model")
            if tuple(target.shape) != tuple(value.shape):
                raise ValueError(f"{source}: {key!r} has shape {tuple(value.shape)} but the model's is "
                                 f"{tuple(target.shape)}; the adapter was trained for another base model or rank")
            target.copy_(value.to(target.dtype))
