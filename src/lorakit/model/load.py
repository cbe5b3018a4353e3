"""Load a Hugging Face causal LM tensor by tensor, quantizing target layers as they arrive.

    config.json -> model skeleton with parameters on the meta device (no memory)
    for each tensor in the safetensors shards (read with plain file reads, not mmap):
        target Linear weight -> quantize_4bit -> Linear4bit   (the fp16 copy is dropped at once)
        anything else        -> cast to the compute dtype and put in place

So the full-precision model never exists in memory: the peak is the final model plus one tensor
(tests/model/test_load_memory.py measures it). Embeddings, norms and the output head
(`skip_modules`) stay in the compute dtype.

On CUDA each tensor is read into host memory (one at a time: the reader's buffer and the loop's
reference are both dropped before the next read), copied to the GPU and, for a target weight,
quantized there (quant/kernels' Triton kernel, else the reference) and dropped: host RAM holds one
16-bit tensor (the largest is the embedding or head: 1 GB for Llama-3-8B), the GPU the 4-bit model
plus one 16-bit weight and its quantization temporaries. The bytes equal a CPU load's.

A weight preparer (`prepare`, the WeightPreparer protocol below; lora/init.py ResidualInit for
PiSSA / OLoRA) may rewrite the weights of the layers it selects as they arrive, before they are
quantized or cast: then the residual W - s B0 A0 is what a 4-bit base stores, computed from the
16-bit tensor while it is the only one in memory. The loader keeps the preparer on the model
(`model.lorakit_prepared`) for add_lora, which takes the factors it recorded.

On CPU the frozen input embedding is not read at all (`mmap_embeddings`): it is a copy-on-write
memory map of its bytes in the safetensors file, so only the pages of rows the model looks up
become resident (writes, if any, go to private pages; the file never changes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from pathlib import Path
from typing import Iterator, Optional, Protocol, Union

import torch
from torch import nn

from ..config import ModelConfig
from ..precision import resolve_dtype
from ..quant.linear4bit import Linear4bit
from ..utils.memory import release_freed_memory
from ..utils.safetensors_io import iter_safetensors
from . import quantized_checkpoint
from .modules import is_conv1d, is_linear, replace_module
from .targets import name_matches, output_head_names

log = logging.getLogger(__name__)
PREPARED_ATTR = "lorakit_prepared"  # where load_from_config leaves its weight preparer (read by add_lora)


class WeightPreparer(Protocol):
    """Rewrites selected linear weights as they stream in (module docstring)."""

    def select(self, model: nn.Module) -> set[str]:
        """Names of the linear layers to rewrite, chosen on the (meta) model skeleton."""

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """weight [out, in] as read (on the target device) -> the weight to store [out, in]."""


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    single = folder / "model.safetensors"
    if single.is_file():
        return [single]
    found = sorted(folder.glob("*.safetensors"))
    if found:
        return found
    bins = sorted(folder.glob("*.bin"))
    hint = " (only pickle .bin files found; lorakit never unpickles weights: convert them to safetensors)" if bins else ""
    raise FileNotFoundError(f"{folder}: no *.safetensors weights{hint}")


def resolve_model_path(name_or_path: str) -> Path:
    """A local folder as is; otherwise a hub id, fetched (config, safetensors, tokenizer) when online."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path}: no config.json; a model folder needs config.json and *.safetensors")
        return path
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"]))
    except Exception as e:  # offline, unknown id, gated model...
        raise FileNotFoundError(f"{name_or_path!r} is not a local folder and could not be fetched from the hub: {e}") from None


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """While building a model, create parameters on the meta device (no memory) but buffers for
    real, so computed non-persistent buffers (rotary inv_freq, masks) are correct. Scoped to the
    `with` block; nothing is patched outside it."""
    original = nn.Module.register_parameter

    def register(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(module, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def quantize_targets(model: nn.Module, skip_modules: tuple[str, ...]) -> set[str]:
    """Names of the linear layers to store in 4 bits: every Linear but the output head and `skip_modules`."""
    heads = output_head_names(model)
    return {n for n, m in model.named_modules()
            if n and is_linear(m) and n not in heads and not name_matches(n, skip_modules)}


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(value, requires_grad=False)
    elif attr in module._buffers:
        module._buffers[attr] = value
    else:
        raise KeyError(name)


def load_model(name_or_path: str, quantization: Optional[str] = None, double_quant: bool = True,
               compute_dtype: Union[str, torch.dtype] = "auto", blocksize: int = 64,
               skip_modules: tuple[str, ...] = ("lm_head",), trust_remote_code: bool = False,
               device: Union[str, torch.device, None] = None, load_tokenizer: bool = True,
               mmap_embeddings: bool = True, prepare: Optional[WeightPreparer] = None):
    """Load (model, tokenizer) from a local folder or hub id; `quantization` "nf4"/"fp4" stores the
    target Linear weights in 4 bits as they are read; `mmap_embeddings` maps the input embedding
    from the file on CPU; `prepare` rewrites selected weights first (module docstring). The model
    is returned in eval mode with every parameter frozen (add_lora decides what trains). The
    public form of `load_from_config`."""
    cfg = ModelConfig(name_or_path=name_or_path, quantization=quantization, double_quant=double_quant,
                      blocksize=blocksize, skip_modules=skip_modules, trust_remote_code=trust_remote_code,
                      mmap_embeddings=mmap_embeddings)
    device = default_device(device)
    return load_from_config(cfg, resolve_dtype(compute_dtype, device), device, load_tokenizer, prepare)


def default_device(device: Union[str, torch.device, None] = None) -> torch.device:
    """`device`, or the current CUDA device when there is one, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def load_from_config(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, load_tokenizer: bool = True,
                     prepare: Optional[WeightPreparer] = None):
    """(model, tokenizer) for `cfg` (model.* of a RunConfig) in compute dtype `dtype` on `device`;
    `prepare`: a WeightPreparer (module docstring)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = resolve_model_path(cfg.name_or_path)
    stored_info = quantized_checkpoint.read_quantization_info(folder)  # a save_quantized folder: its 4-bit bytes
    if stored_info is not None:
        quantized_checkpoint.check_requested(stored_info, folder, cfg.quantization)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.trust_remote_code)
    with parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code, dtype=dtype)
    for module in model.modules():  # buffers to the device; parameters stay meta until read
        for key, buf in module._buffers.items():
            if buf is not None:
                module._buffers[key] = buf.to(device)
    stored = None
    if stored_info is not None:
        targets = set(stored_info["modules"])
        stored = quantized_checkpoint.StoredQuantizedLayers(stored_info, dtype, device)
    else:
        targets = quantize_targets(model, cfg.skip_modules) if cfg.quantization else set()
    if prepare is not None and stored is not None:
        raise ValueError(f"{folder} holds already-quantized 4-bit weights; a weight preparer (lora.init pissa/olora) "
                         f"needs the 16-bit checkpoint the quantized one was made from")
    prepared = prepare.select(model) if prepare is not None else set()
    _fill_from_checkpoint(model, folder, targets, cfg, dtype, device, stored, (prepare, prepared))
    if prepare is not None:
        setattr(model, PREPARED_ATTR, prepare)
    model.eval()
    model.config._name_or_path = cfg.name_or_path
    tokenizer = load_tokenizer_for(folder, cfg.trust_remote_code) if load_tokenizer else None
    return model, tokenizer


def _fill_from_checkpoint(model: nn.Module, folder: Path, targets: set[str], cfg: ModelConfig, dtype: torch.dtype,
                          device: torch.device, stored: Optional[quantized_checkpoint.StoredQuantizedLayers] = None,
                          preparer: tuple = (None, frozenset())) -> None:
    """Read every checkpoint tensor into the meta skeleton, one at a time: prepared weights are
    rewritten first, target weights become Linear4bit layers as they arrive, the rest is cast to
    `dtype` and put in place."""
    prepare, prepared = preparer
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    unexpected = []
    mapped = frozenset(_input_embedding_names(model)) if cfg.mmap_embeddings and device.type == "cpu" else frozenset()
    for file in checkpoint_files(folder):
        for name, tensor in iter_safetensors(file, mapped):
            try:
                if stored is not None and stored.accepts(name):  # already 4-bit: kept as stored
                    stored.add(model, name, tensor)
                    expected.discard(name.rpartition(".")[0] + ".weight")
                    continue
                if name not in expected:
                    unexpected.append(name)
                    continue
                expected.discard(name)
                module_name, _, attr = name.rpartition(".")
                if module_name in prepared and attr == "weight":
                    conv = is_conv1d(model.get_submodule(module_name))
                    w = prepare(module_name, (tensor.t() if conv else tensor).to(device))  # [out, in]
                    w = w.to(tensor.dtype)         # stored (or quantized) from the file's dtype, as without a preparer
                    tensor = w.t() if conv else w  # back in the file's layout (Conv1D: [in, out])
                if module_name in targets and attr == "weight":
                    old = model.get_submodule(module_name)  # meta skeleton; its bias may already be real
                    if is_conv1d(old):  # GPT-2 Conv1D stores W^T: [in, out] -> [out, in]
                        tensor = tensor.t()
                    layer = Linear4bit.from_weight(tensor.to(device), getattr(old, "bias", None), cfg.quantization,
                                                   cfg.blocksize, cfg.double_quant, dtype)
                    layer.replaces_conv1d = is_conv1d(old)  # merge writes a Conv1D back (lora/merge.py)
                    replace_module(model, module_name, layer)
                    old = tensor = None  # the 16-bit weight is dropped here
                    if device.type == "cpu":
                        release_freed_memory()  # the layer's temporaries: back to the OS, not heap holes
                    continue
                value = tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)
                module = model.get_submodule(module_name)
                if isinstance(module, Linear4bit) and attr == "bias":
                    module.bias = nn.Parameter(value, requires_grad=False)  # bias stored after its weight
                else:
                    _set_tensor(model, name, value)
            finally:
                tensor = None  # before the reader allocates the next one: host RAM holds one tensor at a time
    if stored is not None:
        stored.finish(folder)
    _tie_head(model)
    missing = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if missing:
        raise ValueError(f"{folder}: the checkpoint has no tensor for {missing[0]!r} ({len(missing)} missing); "
                         f"is it a {type(model).__name__} checkpoint?")
    if unexpected:
        warnings.warn(f"{folder}: ignored {len(unexpected)} checkpoint tensors the model has no place for, "
                      f"e.g. {unexpected[:3]}", stacklevel=3)


def _input_embedding_names(model: nn.Module) -> list[str]:
    """Parameter names of the input embedding's weight (the one tensor looked up row by row)."""
    emb = model.get_input_embeddings()
    return [f"{n}.weight" for n, m in model.named_modules() if m is emb and n]


def _tie_head(model: nn.Module) -> None:
    """Checkpoints with tied embeddings store the matrix once (as embed_tokens)."""
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is not None and inp is not None and out.weight.device.type == "meta" and getattr(model.config, "tie_word_embeddings", False):
        out.weight = inp.weight


def load_tokenizer_for(folder: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if not any((folder / n).exists() for n in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        log.warning("%s has no tokenizer files; returning tokenizer=None", folder)
        return None
    return AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
