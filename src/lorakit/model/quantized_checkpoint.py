"""The 4-bit checkpoint format: quantize once, reload the same bytes.

``save_quantized`` writes it; ``load_model`` detects the folder and reloads it without
re-quantizing (``StoredQuantizedLayers``). The quantization itself is quant/ (Linear4bit); this
module is only the files:

    config.json                  the model's transformers config, unchanged (no
                                 quantization_config: transformers must not take it for a
                                 bitsandbytes checkpoint; plain transformers cannot load it)
    generation_config.json       when the model has one
    lorakit_quantization.json    {"format": "lorakit-4bit", "version": 1,
                                  "quant_type": "nf4" | "fp4", "blocksize": 64, "double_quant": true,
                                  "compute_dtype": "bfloat16",
                                  "modules": ["model.layers.0.mlp.down_proj", ...]}   (sorted)
    model.safetensors            or model-00001-of-0000N.safetensors + model.safetensors.index.json
                                 (weight_map as transformers writes it), with
        <module>.weight_packed       uint8 [out, in/2]     row r = weight row r, element 2j in the
                                                           high nibble (lorakit.quant.nf4 layout)
        <module>.weight_absmax, .weight_quant_map, .weight_nested_absmax, .weight_nested_quant_map,
        <module>.weight_nested_offset, .weight_quant_state   the QuantState (quant/state.py)
        <module>.bias                in the compute dtype
        every other parameter        in the dtype it has in memory; a tied output head is stored
                                     once (as the input embedding), as transformers does

The tensors are exactly ``Linear4bit.state_dict()``, so the packed codes and scales that come
back are the bytes that were saved. Each file is written tensor by tensor (no second copy of
a shard in memory), a layer's tensors next to each other so a reader can rebuild it as soon
as they have arrived. Files follow the safetensors format
(https://github.com/huggingface/safetensors#format).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..dtypes import long_name
from ..quant.linear4bit import STATE_PREFIX, Linear4bit
from ..quant.state import META_KEY, NESTED_KEYS, STATE_KEYS, QuantState, decode_metadata
from ..utils.safetensors_io import write_safetensors
from .modules import is_conv1d, replace_module

QUANT_CONFIG_NAME = "lorakit_quantization.json"
FORMAT_NAME, FORMAT_VERSION = "lorakit-4bit", 1
_META = STATE_PREFIX + META_KEY
_STORED = ("weight_packed",) + tuple(STATE_PREFIX + k for k in STATE_KEYS)  # one Linear4bit's tensors
_NESTED = tuple(STATE_PREFIX + k for k in NESTED_KEYS)
_BASE = tuple(k for k in _STORED if k not in _NESTED)
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default shard size (5 GB)


# ---- saving -----------------------------------------------------------------------------------
def save_quantized(model: nn.Module, folder: Union[str, Path], tokenizer=None,
                   max_shard_size: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False) -> Path:
    """Write a 4-bit model (from ``load_model(..., quantization="nf4"|"fp4")``) so that
    ``load_model(folder)`` reloads it without quantizing again (format: module docstring).

    The model must have no LoRA adapters (save those with save_adapter; merged models are
    16-bit and save with save_pretrained). The folder must be new or empty, or a previous
    save_quantized folder with `overwrite`; it is written atomically (utils/fs.py).
    """
    from ..utils.fs import output_folder

    layers = {n: m for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    if not layers:
        raise ValueError("save_quantized: the model has no Linear4bit layer; load it with "
                         "quantization='nf4' or 'fp4' (16-bit models save with save_pretrained)")
    if getattr(model, "lorakit_config", None) is not None:  # set by add_lora / load_adapter
        raise ValueError("save_quantized: the model has LoRA adapters; save the base model before add_lora "
                         "(or after lorakit.unload), and the adapter with lorakit.save_adapter")
    tensors = _tensors_to_save(model, layers)
    info = _quantization_info(layers)
    with output_folder(folder, "quantized", overwrite) as tmp:
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        (tmp / QUANT_CONFIG_NAME).write_text(json.dumps(info, indent=2) + "\n")
        _write_shards(tensors, tmp, max_shard_size)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return Path(folder)


def _tensors_to_save(model: nn.Module, layers: dict[str, Linear4bit]) -> dict[str, torch.Tensor]:
    """Name -> tensor in module order; each Linear4bit's state tensors together; tied copies once."""
    out, seen = {}, set()
    for name, p in model.named_parameters():  # remove_duplicate=True: a tied head is stored once
        module_name = name.rpartition(".")[0]
        if module_name in layers:
            continue  # its bias goes with the layer below
        out[name] = p.detach()
    for name, layer in layers.items():
        for key, value in layer.state_dict().items():
            out[f"{name}.{key}"] = value.detach()
    for key, t in out.items():  # storage shared between two names would be written twice
        if t.data_ptr() in seen and t.numel():
            raise ValueError(f"save_quantized: tensor {key!r} shares memory with another saved tensor")
        seen.add(t.data_ptr())
    order = {n: i for i, (n, _) in enumerate(model.named_modules())}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0].rpartition(".")[0], -1)))


def _quantization_info(layers: dict[str, Linear4bit]) -> dict:
    first = next(iter(layers.values()))
    kinds = {(m.quant_type, m.blocksize, m.double_quant, m.compute_dtype) for m in layers.values()}
    if len(kinds) > 1:
        raise ValueError(f"save_quantized: Linear4bit layers differ in (quant_type, blocksize, double_quant, "
                         f"compute_dtype): {sorted(map(str, kinds))}; lorakit writes one setting per model")
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "quant_type": first.quant_type,
            "blocksize": first.blocksize, "double_quant": bool(first.double_quant),
            "compute_dtype": long_name(first.compute_dtype),
            "modules": sorted(layers)}


def _write_shards(tensors: dict[str, torch.Tensor], folder: Path, max_shard_size: int) -> None:
    shards, current, size = [], {}, 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_size:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    if len(shards) == 1:
        write_safetensors(shards[0], folder / "model.safetensors")
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_safetensors(shard, folder / file)
        weight_map.update({name: file for name in shard})
        total += sum(t.numel() * t.element_size() for t in shard.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


# ---- loading ----------------------------------------------------------------------------------
def read_quantization_info(folder: Union[str, Path]) -> Optional[dict]:
    """The lorakit_quantization.json of a save_quantized folder, checked; None for other folders."""
    path = Path(folder) / QUANT_CONFIG_NAME
    if not path.is_file():
        return None
    info = json.loads(path.read_text())
    if info.get("format") != FORMAT_NAME or info.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format {info.get('format')!r} version {info.get('version')!r} is not supported "
                         f"(this lorakit reads {FORMAT_NAME!r} version {FORMAT_VERSION})")
    missing = [k for k in ("quant_type", "blocksize", "double_quant", "modules") if k not in info]
    if missing:
        raise ValueError(f"{path}: missing keys {missing}")
    return info


def check_requested(info: dict, folder: Path, quantization: Optional[str]) -> None:
    """A stored 4-bit checkpoint loads as stored; asking for another 4-bit type is an error."""
    if quantization is not None and quantization != info["quant_type"]:
        raise ValueError(f"model.quantization={quantization!r}, but {folder} is already stored quantized as "
                         f"{info['quant_type']!r} (lorakit save_quantized); pass quantization=None or "
                         f"{info['quant_type']!r} to load it as stored")


class StoredQuantizedLayers:
    """Rebuilds the Linear4bit layers of a save_quantized checkpoint as their tensors stream in.

    ``accepts(name)`` says whether a checkpoint tensor belongs to a stored 4-bit layer; ``add``
    keeps it and, once the layer's tensors are complete, replaces the skeleton's layer with a
    Linear4bit holding exactly those bytes; ``finish`` raises if a layer stayed incomplete.
    """

    def __init__(self, info: dict, compute_dtype: torch.dtype, device: torch.device):
        self.modules = set(info["modules"])
        self.compute_dtype, self.device = compute_dtype, device
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.built: set[str] = set()

    def accepts(self, name: str) -> bool:
        module, _, key = name.rpartition(".")
        return module in self.modules and key in _STORED

    def add(self, model: nn.Module, name: str, tensor: torch.Tensor) -> None:
        module, _, key = name.rpartition(".")
        parts = self.pending.setdefault(module, {})
        parts[key] = tensor.to(self.device)
        if _META not in parts:
            return
        nested = decode_metadata(parts[_META])["nested_blocksize"] is not None
        need = _STORED if nested else _BASE
        if all(k in parts for k in need):
            self._build(model, module, self.pending.pop(module))

    def _build(self, model: nn.Module, module: str, parts: dict[str, torch.Tensor]) -> None:
        old = model.get_submodule(module)
        state = QuantState.from_dict(parts, STATE_PREFIX)
        shape = tuple(old.weight.shape)  # the skeleton's (meta) weight
        expected = shape[::-1] if is_conv1d(old) else shape  # Conv1D stores [in, out]
        if tuple(state.shape) != expected:
            raise ValueError(f"{module}.weight_packed: stored 4-bit weight has shape {tuple(state.shape)}, the "
                             f"model expects {expected}; is this checkpoint for {type(model).__name__}?")
        packed = parts["weight_packed"].reshape(expected[0], expected[1] // 2)  # [out, in/2]
        layer = Linear4bit.from_quantized(packed, state, getattr(old, "bias", None), self.compute_dtype)
        layer.replaces_conv1d = is_conv1d(old)  # merge writes a Conv1D back (lora/merge.py)
        replace_module(model, module, layer)
        self.built.add(module)

    def finish(self, folder: Path) -> None:
        for module, parts in self.pending.items():
            missing = [f"{module}.{k}" for k in _STORED if k not in parts and (k in _BASE or _META in parts)]
            raise ValueError(f"{folder}: 4-bit layer {module!r} is incomplete; missing tensor {missing[0]!r}")
        absent = sorted(self.modules - self.built)
        if absent:
            raise ValueError(f"{folder}: {QUANT_CONFIG_NAME} lists {len(absent)} 4-bit layers with no tensors, "
                             f"e.g. missing tensor {absent[0] + '.weight_packed'!r}")
