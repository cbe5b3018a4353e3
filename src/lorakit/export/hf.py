"""Merge an adapter into a 16-bit checkpoint on disk, tensor by tensor, in bounded memory.

    for each shard of the base (model.safetensors or model-0000k-of-0000N.safetensors):
        header -> the output shard's header (same names, shapes; dtype: the stored one, or --precision)
        for each tensor, in file order:
            adapted weight  W [out, in] (Conv1D: stored [in, out], transposed in and out again)
                            -> lora.merge.merged_weight(W, A, B, scaling) in fp32 -> output dtype
            bias / module the adapter replaces (bias="all"/"lora_only", modules_to_save) -> the adapter's
            anything else   -> as stored
            written at once and dropped
    + model.safetensors.index.json (sharded input), config.json, generation_config.json, tokenizer files

So memory holds one tensor (+ its fp32 merge temporaries) and the adapter, never a shard or the
model: peak ~ adapter + 3 x largest weight in fp32 + the process itself. The per-layer arithmetic is
`lorakit.lora.merge.merged_weight`, the same function the in-memory `lorakit.merge` calls, so both
give the same bits (tests/export/test_merge_stream.py). `iter_merged_tensors` is also what the GGUF
export reads (export/gguf.py), so a GGUF of base + adapter equals the GGUF of the merged folder.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch

from ..config import LoraConfig
from ..dtypes import FROM_SAFETENSORS_CODE, long_name
from ..lora.io import WEIGHTS_NAME, read_adapter_config, strip_prefix
from ..lora.merge import merged_weight
from ..model import quantized_checkpoint
from ..model.load import checkpoint_files, resolve_model_path
from ..model.modules import is_conv1d
from ..utils.fs import output_folder
from ..utils.memory import release_freed_memory
from ..utils.safetensors_io import iter_safetensors, read_safetensors_header, write_safetensors_stream

log = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
# Files copied from the base folder beside the merged weights (those that exist).
SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "chat_template.jinja", "chat_template.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json")


@dataclass
class AdapterTensors:
    """A PEFT-format LoRA adapter by the base checkpoint's tensor names.

    lora:    "<module>.weight" -> (A [r, in], B [out, r])   (fp32 as stored, or whatever it was saved in)
    replace: "<name>"          -> a tensor that replaces the base's (biases trained with bias="all" /
                                  "lora_only", modules_to_save copies)
    """

    config: LoraConfig
    scaling: float
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    replace: dict[str, torch.Tensor] = field(default_factory=dict)
    source: Optional[Path] = None

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.lora.values()) + sum(t.nbytes for t in self.replace.values())


def lora_scaling(config: LoraConfig) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA: computed exactly as LoRALinear does (lora/layer.py)."""
    return config.alpha / (math.sqrt(config.r) if config.use_rslora else config.r)


def read_adapter_tensors(path: str | Path) -> AdapterTensors:
    """Read `adapter_config.json` + `adapter_model.safetensors` (features lorakit cannot merge, such
    as DoRA or rank patterns, are refused by read_adapter_config; tensors of unknown kinds here)."""
    from safetensors.torch import load_file

    path = Path(path)
    config = read_adapter_config(path)  # raises for rank_pattern, alpha_pattern, ...
    if config.use_dora or config.residual_init:
        what = "DoRA (use_dora)" if config.use_dora else f"lora.init={config.init!r} (it applies to a residual base)"
        raise ValueError(f"{path}: a {what} adapter is merged in memory, not tensor by tensor: run `lorakit merge` "
                         "(which does so for it) and export the merged folder")
    file = path / WEIGHTS_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist (only safetensors adapters are read; lorakit never "
                                f"unpickles adapter_model.bin)")
    out = AdapterTensors(config=config, scaling=lora_scaling(config), source=path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(str(file)).items():
        name = strip_prefix(key)
        if ".lora_A." in name or ".lora_B." in name:
            module, _, rest = name.rpartition(".lora_")
            if rest not in ("A.weight", "B.weight"):
                raise ValueError(f"{file}: tensor {key!r} is not a LoRA weight lorakit can merge")
            pairs.setdefault(module, {})[rest[0]] = value
        elif "lora_embedding" in name or "lora_magnitude" in name or ".lora_" in name:
            raise ValueError(f"{file}: tensor {key!r} (embedding LoRA / DoRA) is not something lorakit can merge; "
                             f"only LoRA on linear layers is")
        elif name.endswith(".base_layer.bias"):
            out.replace[name.removesuffix(".base_layer.bias") + ".bias"] = value
        else:
            out.replace[name] = value  # bias="all" biases, modules_to_save parameters
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{file}: {module!r} has lora_{next(iter(ab))} but not its partner")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"{file}: {module!r} lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form B @ A")
        if a.shape[0] != config.r:
            raise ValueError(f"{file}: {module!r} has rank {a.shape[0]} but adapter_config.json says r={config.r}; "
                             f"per-layer ranks (rank_pattern) are not supported")
        out.lora[module + ".weight"] = (a, b)
    return out


def _conv1d_weights(folder: Path) -> tuple[set[str], bool, set[str]]:
    """(names of weights stored transposed as GPT-2 Conv1D [in, out], whether the config ties the
    output head to the input embedding, the output head's weight name), from a model skeleton on the meta device (no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    conv = {f"{n}.weight" for n, m in model.named_modules() if is_conv1d(m)}
    tied = bool(getattr(model.config.get_text_config(), "tie_word_embeddings", False))
    heads = {f"{n}.weight" for n, m in model.named_modules() if m is model.get_output_embeddings()}
    return conv, tied, heads


class MergePlan:
    """Which tensor of the base gets what, checked against the checkpoint headers before anything is
    written: every adapted weight and replaced tensor must exist with matching shapes."""

    def __init__(self, folder: Path, adapter: Optional[AdapterTensors], dtype: Optional[torch.dtype] = None):
        self.folder, self.adapter, self.dtype = folder, adapter, dtype
        if quantized_checkpoint.read_quantization_info(folder) is not None:
            raise ValueError(f"{folder} is a lorakit 4-bit checkpoint; merging and export need the original "
                             f"16-bit base (the one the 4-bit copy was made from), never the 4-bit weights")
        self.files = checkpoint_files(folder)
        self.headers = {f: read_safetensors_header(f)[0] for f in self.files}
        self.conv1d, tied, heads = _conv1d_weights(folder)
        if adapter is None:
            return
        stored = {n: info for h in self.headers.values() for n, info in h.items()}
        for name, (a, b) in adapter.lora.items():
            if name not in stored:
                hint = " (the output head is tied to the input embedding and stored once)" if name in heads else ""
                raise ValueError(f"{adapter.source}: the adapter adapts {name[:-7]!r}, which {folder} has no weight "
                                 f"for{hint}; is this the base model the adapter was trained on?")
            shape = tuple(stored[name]["shape"])
            want = (a.shape[1], b.shape[0]) if name in self.conv1d else (b.shape[0], a.shape[1])
            if shape != want:
                raise ValueError(f"{adapter.source}: {name!r} is {shape} in {folder} but the adapter's B @ A is {want}; "
                                 f"the adapter was trained for another base model")
        for name, t in adapter.replace.items():
            if name not in stored:
                raise ValueError(f"{adapter.source}: the adapter holds {name!r}, which {folder} has no tensor for"
                                 + (" (a tied output head: merge the adapter in memory, or untie it)" if name in heads else ""))
            if tuple(stored[name]["shape"]) != tuple(t.shape):
                raise ValueError(f"{adapter.source}: {name!r} is {tuple(t.shape)} but {tuple(stored[name]['shape'])} in {folder}")
        if tied and any(n in heads for n in list(adapter.lora) + list(adapter.replace)):
            raise ValueError(f"{adapter.source}: the adapter changes the output head, which {folder} ties to the "
                             f"input embedding; a merged checkpoint cannot hold both")

    def out_dtype(self, stored: torch.dtype) -> torch.dtype:
        return self.dtype if self.dtype is not None and stored.is_floating_point else stored

    def specs(self, file: Path) -> list[tuple[str, torch.dtype, tuple]]:
        """(name, output dtype, shape) of each tensor of `file`, in file order."""
        items = sorted(self.headers[file].items(), key=lambda kv: kv[1]["data_offsets"][0])
        return [(n, self.out_dtype(FROM_SAFETENSORS_CODE[i["dtype"]]), tuple(i["shape"])) for n, i in items]

    def tensors(self, file: Path) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, merged tensor in its output dtype), one at a time, in file order."""
        lora = self.adapter.lora if self.adapter else {}
        replace = self.adapter.replace if self.adapter else {}
        for name, t in iter_safetensors(file):
            dtype = self.out_dtype(t.dtype)
            if name in lora:
                a, b = lora[name]
                conv = name in self.conv1d
                w = merged_weight(t.t() if conv else t, a, b, self.adapter.scaling)  # [out, in] fp32
                t = (w.t() if conv else w).to(dtype).contiguous()                    # stored layout
                del w
            elif name in replace:
                t = replace[name].to(dtype).contiguous()
            else:
                t = t.to(dtype)
            yield name, t
            del t  # the caller has written it: drop it before the next tensor is read


def iter_merged_tensors(plan: MergePlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor of the merged checkpoint, one at a time (shard after shard, file order)."""
    for file in plan.files:
        yield from plan.tensors(file)


def stream_merge(model_path: str, adapter_path: str, out: str, dtype: Optional[torch.dtype] = None,
                 overwrite: bool = False, progress: bool = True) -> Path:
    """base + adapter -> a merged checkpoint folder, tensor by tensor (module docstring). `dtype`
    None keeps each tensor's stored dtype; a float dtype casts every float tensor to it."""
    protect = [(model_path, "the base model's folder (--model)"), (adapter_path, "the adapter folder (--adapter)")]
    folder = resolve_model_path(model_path)
    plan = MergePlan(folder, read_adapter_tensors(adapter_path), dtype)
    sharded = len(plan.files) > 1
    total = sum(len(h) for h in plan.headers.values())
    with output_folder(out, "merge", overwrite, protect=protect) as tmp, progress_bar(total, progress) as bar:
        weight_map, total_size = {}, 0
        for i, file in enumerate(plan.files):
            name = file.name if sharded else "model.safetensors"
            specs = plan.specs(file)

            def each():
                for _, t in plan.tensors(file):
                    yield t
                    del t
                    bar.update(1)
                    release_freed_memory()  # the merge temporaries: back to the OS, not heap holes

            write_safetensors_stream(tmp / name, specs, each())
            for n, dt, shape in specs:
                weight_map[n] = name
                total_size += dt.itemsize * math.prod(shape)
        if sharded:
            (tmp / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total_size},
                                                      "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        _copy_side_files(folder, tmp, dtype)
    return Path(out)


def _copy_side_files(folder: Path, out: Path, dtype: Optional[torch.dtype]) -> None:
    for name in SIDE_FILES:
        src = folder / name
        if not src.is_file():
            continue
        if name == "config.json" and dtype is not None:
            cfg = json.loads(src.read_text(encoding="utf-8"))
            cfg["dtype"] = long_name(dtype)
            cfg.pop("torch_dtype", None)
            (out / name).write_text(json.dumps(cfg, indent=2) + "\n", encoding="utf-8")
        else:
            shutil.copyfile(src, out / name)


class progress_bar:
    """tqdm over tensors (plain lines when not a terminal); a no-op with progress=False."""

    def __init__(self, total: int, enabled: bool, desc: str = "merge"):
        self.total, self.enabled, self.desc, self.bar = total, enabled, desc, None

    def __enter__(self):
        if self.enabled:
            import sys

            from tqdm import tqdm

            tty = sys.stderr.isatty()
            self.bar = tqdm(total=self.total, desc=self.desc, unit="tensor", disable=False,
                            mininterval=0.5 if tty else 10.0, ncols=None if tty else 80)
        return self

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.close()
        return False

