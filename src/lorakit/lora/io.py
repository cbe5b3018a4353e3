"""Adapters on disk in PEFT's format, exactly.

    adapter_config.json          peft_type "LORA", task_type "CAUSAL_LM", r, lora_alpha, ...
    adapter_model.safetensors    base_model.model.<module path>.lora_A.weight   [r, in]
                                 base_model.model.<module path>.lora_B.weight   [out, r]
                                 base_model.model.<module path>.lora_magnitude_vector [out] (DoRA)
                                 base_model.model.<embedding>.lora_embedding_A  [r, vocab]
                                 base_model.model.<embedding>.lora_embedding_B  [dim, r]
                                 base_model.model.<module path>.base_layer.bias (bias="lora_only"/"all")
                                 base_model.model.<module path>.weight          (modules_to_save)

`peft.PeftModel.from_pretrained(base, folder)` loads what `save_adapter` writes, and
`load_adapter` loads what PEFT writes.

PiSSA / OLoRA (lora.init): `adapter/` is the adapter as trained, with `init_lora_weights: "pissa"`
(or "olora", ...) in its config, as PEFT saves it: it applies to the *residual* base, which PEFT
and lorakit both recompute from the original base when they load it (for a 4-bit base lorakit
quantizes that residual, as in training). With lora.save_converted, `adapter/as_lora/` holds the
same update as a plain rank-2r LoRA of the *original* base (PEFT's
`path_initial_model_for_weight_conversion` output): A' = [A; A0], B' = [B, -B0], r' = 2r,
alpha' = 2 alpha (sqrt(2) alpha with rsLoRA), init_lora_weights: true. It loads anywhere a LoRA does
(vLLM, llama.cpp conversion, next to other adapters); on a 4-bit base it is not exact, since the
quantized original is not the quantized residual plus A0 B0.
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
from .embedding import LoRAEmbedding
from .inject import adapter_layers, add_lora, is_adapter_param, lora_layers
from .layer import ModulesToSave

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's PeftModel -> LoraModel -> model nesting
CONVERTED_DIR = "as_lora"  # <adapter>/as_lora/: a pissa/olora adapter as a plain LoRA of the original base

# PEFT LoraConfig fields that only matter for features lorakit does not implement: a non-default
# value is an error (loading would silently compute something else); the default is fine.
_UNSUPPORTED_IF_SET = {
    "lora_bias": False, "layers_to_transform": None, "layers_pattern": None,
    "rank_pattern": {}, "alpha_pattern": {}, "loftq_config": {}, "trainable_token_indices": None,
    "target_parameters": None, "layer_replication": None, "use_qalora": False, "megatron_config": None,
    "alora_invocation_tokens": None, "eva_config": None, "corda_config": None, "arrow_config": None,
}
# Fields lorakit reads, or that carry no behaviour.
_KNOWN = {
    "peft_type", "task_type", "r", "lora_alpha", "lora_dropout", "target_modules", "exclude_modules",
    "bias", "use_rslora", "fan_in_fan_out", "modules_to_save", "base_model_name_or_path", "revision",
    "inference_mode", "init_lora_weights", "auto_mapping", "peft_version", "megatron_core",
    "qalora_group_size", "ensure_weight_tying", "lorakit_version", "use_dora",
}


def peft_init_value(init: str):
    """lora.init -> PEFT's init_lora_weights (True for "default")."""
    return True if init == "default" else init


def init_from_peft(value, file: Path) -> str:
    """PEFT's init_lora_weights -> lora.init. Inits that leave the base as it is only decide the
    starting weights, which loading replaces; those that rewrite the base must be reproduced."""
    if value is True or value is False or value is None:
        return "default"
    from ..config import ConfigError, LoraConfig

    try:
        return LoraConfig(init=str(value)).init
    except ConfigError:
        raise ValueError(f"{file}: init_lora_weights={value!r} is a PEFT initialisation lorakit does not support "
                         f"(allowed: true, false, 'gaussian', 'pissa', 'pissa_niter_N', 'olora')") from None


def adapter_config_dict(model: nn.Module, config: LoraConfig, base_model_name_or_path: Optional[str]) -> dict:
    names = [n for n, _ in adapter_layers(model)]
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
        "init_lora_weights": peft_init_value(config.init), "inference_mode": True, "use_dora": config.use_dora,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "revision": None,
    }


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable part of the model under PEFT's key names."""
    config: LoraConfig = model.lorakit_config
    out = {}
    for name, layer in adapter_layers(model):
        a_key, b_key = _ab_keys(layer)
        out[f"{PREFIX}{name}.{a_key}"], out[f"{PREFIX}{name}.{b_key}"] = _ab(layer)
        if layer.lora_magnitude_vector is not None:
            out[f"{PREFIX}{name}.lora_magnitude_vector"] = layer.lora_magnitude_vector
        if isinstance(layer, LoRAEmbedding):
            continue
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


def _ab_keys(layer) -> tuple[str, str]:
    if isinstance(layer, LoRAEmbedding):
        return "lora_embedding_A", "lora_embedding_B"
    return "lora_A.weight", "lora_B.weight"


def _ab(layer) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(layer, LoRAEmbedding):
        return layer.lora_embedding_A, layer.lora_embedding_B
    return layer.lora_A.weight, layer.lora_B.weight


def converted_state_dict(model: nn.Module, tensors: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The pissa/olora adapter as a plain LoRA of the original base (module docstring): per layer
    A' = [A; A0] [2r, in], B' = [B, -B0] [out, 2r], so s B' A' = s (B A - B0 A0). `tensors`: the
    adapter's own, when already gathered (adapter_state_dict)."""
    out = dict(tensors) if tensors is not None else adapter_state_dict(model)
    for name, layer in adapter_layers(model):
        a_key, b_key = _ab_keys(layer)
        a0, b0 = layer.initial_lora_A.detach().cpu(), layer.initial_lora_B.detach().cpu()
        a, b = out[f"{PREFIX}{name}.{a_key}"], out[f"{PREFIX}{name}.{b_key}"]
        out[f"{PREFIX}{name}.{a_key}"] = torch.cat([a, a0.to(a.dtype)], dim=0).contiguous()   # [2r, in]
        out[f"{PREFIX}{name}.{b_key}"] = torch.cat([b, -b0.to(b.dtype)], dim=1).contiguous()  # [out, 2r]
    return out


def converted_config_dict(cfg: dict) -> dict:
    """PEFT's conversion: r' = 2r, alpha' keeps the scaling (2 alpha, or sqrt(2) alpha with rsLoRA)."""
    alpha = cfg["lora_alpha"] * (2 ** 0.5 if cfg["use_rslora"] else 2)
    return {**cfg, "r": 2 * cfg["r"], "lora_alpha": alpha, "init_lora_weights": True}


def write_adapter_files(model: nn.Module, folder: Path, base_model_name_or_path: Optional[str] = None,
                        converted: bool = False, tensors: Optional[dict] = None) -> None:
    """Write the two adapter files into an existing folder (not atomic; see save_adapter);
    `converted`: the pissa/olora adapter as a plain LoRA of the original base; `tensors`:
    adapter_state_dict(model) when already computed (on every rank of a distributed run)."""
    from safetensors.torch import save_file

    if not hasattr(model, "lorakit_config"):
        raise ValueError("this model has no lorakit adapters; call lorakit.add_lora first")
    base = base_model_name_or_path or getattr(getattr(model, "config", None), "_name_or_path", None) or None
    cfg = adapter_config_dict(model, model.lorakit_config, base)
    if converted:
        tensors = converted_state_dict(model, tensors)
    elif tensors is None:
        tensors = adapter_state_dict(model)
    if converted:
        cfg = converted_config_dict(cfg)
    Path(folder).mkdir(exist_ok=True)
    save_file(tensors, str(Path(folder) / WEIGHTS_NAME), metadata={"format": "pt"})
    (Path(folder) / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")


def save_adapter(model: nn.Module, path: str | Path, base_model_name_or_path: Optional[str] = None,
                 overwrite: bool = False, tensors: Optional[dict] = None) -> Path:
    """Write adapter_config.json + adapter_model.safetensors to `path` (a new or empty folder, or,
    with `overwrite`, a previous lorakit adapter folder), atomically; see utils/fs.py. A pissa/olora
    adapter also gets `as_lora/` (module docstring) unless lora.save_converted is false."""
    config = getattr(model, "lorakit_config", None)
    with output_folder(path, "adapter", overwrite) as tmp:
        write_adapter_files(model, tmp, base_model_name_or_path, tensors=tensors)
        if config is not None and config.residual_init and config.save_converted:
            write_adapter_files(model, tmp / CONVERTED_DIR, base_model_name_or_path, converted=True, tensors=tensors)
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
        use_dora=bool(raw.get("use_dora") or False), init=init_from_peft(raw.get("init_lora_weights", True), file),
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
        if is_adapter_param(name) or ".module." in name:
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
    expected = {f"{n}.{key}" for n, layer in adapter_layers(model)
                for key in _ab_keys(layer) + (("lora_magnitude_vector",) if layer.lora_magnitude_vector is not None else ())}
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
