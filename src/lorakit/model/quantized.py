"""4-bit models in memory and on disk: quantize once, reload the same bytes.

In memory
---------
``quantize_weight`` is ``quantize_4bit`` run over a few rows at a time (byte-exact with it), so
quantizing a layer while loading needs ~30 bytes of fp32/int64 temporaries per weight of one
chunk, not of the whole matrix; ``load_model`` builds its Linear4bit layers through
``quantize_linear``.

On disk (``save_quantized``; ``load_model`` detects the folder and reloads it without
re-quantizing)
-------------------------------------------------------------------------------------------------
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
import math
import struct
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..quant.linear4bit import Linear4bit
from ..quant.nf4 import DOUBLE_QUANT_BLOCKSIZE, check_quant_args, double_quantize, quantize_4bit
from ..quant.state import QuantState, decode_metadata

QUANT_CONFIG_NAME = "lorakit_quantization.json"
FORMAT_NAME, FORMAT_VERSION = "lorakit-4bit", 1
# Weights quantized per step at load: the reference quantize_4bit needs ~30 bytes of temporaries
# per weight (fp32 copy, scaled values, int64 indices), so 2**18 weights bound them to ~8 MB.
# Small, same-sized temporaries also keep the allocator from fragmenting: on bench/bench_load.py's
# 336M-parameter model, whole-matrix quantization peaked at 1250-1550 MB RSS, chunks at ~623 MB.
QUANT_CHUNK_WEIGHTS = 2**18
_STORED = ("weight_packed", "weight_absmax", "weight_quant_map", "weight_nested_absmax",
           "weight_nested_quant_map", "weight_nested_offset", "weight_quant_state")
_NESTED = ("weight_nested_absmax", "weight_nested_quant_map", "weight_nested_offset")
_BASE = tuple(k for k in _STORED if k not in _NESTED)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
# safetensors dtype names (format spec above); the inverse of load.py's reader table
_ST_NAMES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
             torch.uint8: "U8", torch.bool: "BOOL"}
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # transformers' save_pretrained default shard size (5 GB)


# ---- quantizing in memory ---------------------------------------------------------------------
def quantize_weight(weight: torch.Tensor, quant_type: str = "nf4", blocksize: int = 64, double_quant: bool = True,
                    chunk_weights: int = QUANT_CHUNK_WEIGHTS) -> tuple[torch.Tensor, QuantState]:
    """``quantize_4bit(weight)`` for a 2-D weight [out, in], computed over chunks of whole rows.

    Byte-exact with quantize_4bit: each chunk holds a multiple of `blocksize` weights, so its
    blocks are the whole tensor's blocks (only the last chunk may end in a partial block, as
    the whole tensor does); each chunk goes through quantize_4bit without double quantization
    (so registered fast kernels run), and the fp32 absmax of all chunks is double-quantized at
    once, as quantize_4bit does. Returns (packed uint8 [out, in/2], QuantState).
    """
    check_quant_args(quant_type, blocksize)
    rows, cols = weight.shape
    if weight.numel() <= chunk_weights or cols % 2:
        packed, state = quantize_4bit(weight, quant_type, blocksize, double_quant)
        return packed.reshape(rows, -1) if cols % 2 == 0 else packed, state
    step = blocksize // math.gcd(cols, blocksize)  # rows per chunk must hold whole blocks
    chunk_rows = max(step, chunk_weights // cols // step * step)
    packed = torch.empty(rows, cols // 2, dtype=torch.uint8, device=weight.device)  # [out, in/2]
    absmax = torch.empty(math.ceil(weight.numel() / blocksize), dtype=torch.float32, device=weight.device)  # [n_blocks]
    for r0 in range(0, rows, chunk_rows):
        part = weight[r0:r0 + chunk_rows]  # [chunk_rows, in]
        part_packed, part_state = quantize_4bit(part, quant_type, blocksize, double_quant=False)
        packed[r0:r0 + part.shape[0]] = part_packed.view(part.shape[0], cols // 2)  # [(chunk_rows*in)/2, 1] -> rows
        b0 = r0 * cols // blocksize
        absmax[b0:b0 + part_state.absmax.numel()] = part_state.absmax
        code = part_state.code
        del part_packed, part_state
    state = QuantState(weight.shape, weight.dtype, blocksize, quant_type, absmax, code)
    if double_quant:
        codes, absmax2, offset, code2 = double_quantize(absmax)
        state = QuantState(weight.shape, weight.dtype, blocksize, quant_type, codes, code, offset=offset,
                           absmax2=absmax2, code2=code2.to(weight.device), blocksize2=DOUBLE_QUANT_BLOCKSIZE)
    return packed, state


def linear4bit_from_quantized(packed: torch.Tensor, state: QuantState, bias: Optional[torch.Tensor],
                              compute_dtype: torch.dtype) -> Linear4bit:
    """A Linear4bit holding already-quantized codes (no quantization happens here).

    Builds the layer the way Linear4bit.from_weight does after its quantize_4bit call; a public
    ``Linear4bit.from_quantized`` would be the better home for this (proposed to quant/)."""
    out_features, in_features = state.shape
    layer = Linear4bit.__new__(Linear4bit)
    nn.Module.__init__(layer)
    layer._configure(in_features, out_features, state.quant_type, state.blocksize, state.nested, compute_dtype)
    layer._set_quantized(packed, state)
    b = None if bias is None else bias.detach().to(compute_dtype).clone()
    layer.bias = None if b is None else nn.Parameter(b, requires_grad=False)
    return layer


def quantize_linear(weight: torch.Tensor, bias: Optional[torch.Tensor], quant_type: str, blocksize: int,
                    double_quant: bool, compute_dtype: torch.dtype) -> Linear4bit:
    """Linear4bit.from_weight with the chunked quantizer above (same bytes, bounded temporaries)."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [out_features, in_features], got shape {tuple(weight.shape)}")
    packed, state = quantize_weight(weight, quant_type, blocksize, double_quant)
    return linear4bit_from_quantized(packed, state, bias, compute_dtype)


_LIBC_TRIM: list = []  # [malloc_trim or None], looked up once


def release_freed_memory() -> None:
    """Hand heap pages that are already free back to the OS (glibc ``malloc_trim(0)``); a no-op
    where there is no glibc. Changes no tensor and no allocator setting.

    Why: quantizing layer after layer frees megabytes of temporaries between long-lived packed
    weights; glibc keeps such holes mapped, so the process grows by whatever fragmentation the
    allocation order happened to produce. On bench/bench_load.py's 336M-parameter model the
    chunked load peaked at 623-704 MB RSS over runs without this call, 621-623 MB with it after
    each layer (the model alone is 258 MB; importing torch + transformers + the model code 338 MB).
    """
    if not _LIBC_TRIM:
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC_TRIM.append(getattr(libc, "malloc_trim", None))
        except OSError:
            _LIBC_TRIM.append(None)
    if _LIBC_TRIM[0] is not None:
        _LIBC_TRIM[0](0)


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
    adapted = [n for n, m in model.named_modules() if type(m).__name__ in ("LoRALinear", "ModulesToSave")]
    if adapted:
        raise ValueError(f"save_quantized: the model has adapters ({adapted[0]}, ...); save the base model "
                         "before add_lora, or the adapter with lorakit.save_adapter")
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
            "compute_dtype": _DTYPE_NAMES.get(first.compute_dtype, str(first.compute_dtype)),
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


def write_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """One safetensors file, written tensor by tensor: u64 little-endian header length N, N bytes
    of JSON (padded with spaces to a multiple of 8, as the reference writer does), then the data
    of each tensor in order, row-major."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, t in tensors.items():
        if t.dtype not in _ST_NAMES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {t.dtype}, which safetensors cannot store")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": _ST_NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)


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
        if "weight_quant_state" not in parts:
            return
        nested = decode_metadata(parts["weight_quant_state"])["nested_blocksize"] is not None
        need = _STORED if nested else _BASE
        if all(k in parts for k in need):
            self._build(model, module, self.pending.pop(module))

    def _build(self, model: nn.Module, module: str, parts: dict[str, torch.Tensor]) -> None:
        from ..lora.inject import replace_module
        from ..lora.layer import is_conv1d

        old = model.get_submodule(module)
        state = QuantState.from_dict(parts, "weight_")
        shape = tuple(old.weight.shape)  # the skeleton's (meta) weight
        expected = shape[::-1] if is_conv1d(old) else shape  # Conv1D stores [in, out]
        if tuple(state.shape) != expected:
            raise ValueError(f"{module}.weight_packed: stored 4-bit weight has shape {tuple(state.shape)}, the "
                             f"model expects {expected}; is this checkpoint for {type(model).__name__}?")
        packed = parts["weight_packed"].reshape(expected[0], expected[1] // 2)  # [out, in/2]
        layer = linear4bit_from_quantized(packed, state, getattr(old, "bias", None), self.compute_dtype)
        layer.replaces_conv1d = is_conv1d(old)  # merge writes a Conv1D back (lora/merge.py)
        replace_module(model, module, layer)
        self.built.add(module)

    def finish(self, folder: Path) -> None:
        for module, parts in self.pending.items():
            missing = [f"{module}.{k}" for k in _STORED if k not in parts and (k in _BASE or "weight_quant_state" in parts)]
            raise ValueError(f"{folder}: 4-bit layer {module!r} is incomplete; missing tensor {missing[0]!r}")
        absent = sorted(self.modules - self.built)
        if absent:
            raise ValueError(f"{folder}: {QUANT_CONFIG_NAME} lists {len(absent)} 4-bit layers with no tensors, "
                             f"e.g. missing tensor {absent[0] + '.weight_packed'!r}")
