"""A merged model as one GGUF file for llama.cpp / Ollama / LM Studio, written tensor by tensor.

    plan      the base's safetensors headers (+ the adapter, export/hf.py MergePlan): every tensor's
              GGUF name, shape and ggml type (export/keys.py) is known before any weight is read
    header    general.*, {arch}.* hyperparameters, tokenizer.ggml.* (export/vocab.py), tensor infos
    data      for each tensor in file order: read -> merge (lora.merge.merged_weight, in fp32) ->
              family transform -> encode (F32/F16/BF16 here, Q8_0/Q4_0/Q5_0 by gguf-py, Q4_K/Q6_K by
              export/kquants.py) -> written -> dropped

So memory holds one tensor and its encoding, never the model. The file is written next to its target
and renamed into place (utils/fs.atomic_file). lorakit marks its files with the metadata key
`general.lorakit.version` so --overwrite replaces only a GGUF lorakit wrote.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..utils.fs import atomic_file, check_output_file
from ..utils.memory import release_freed_memory
from . import kquants
from .hf import MergePlan, iter_merged_tensors, progress_bar, read_adapter_tensors
from .keys import (FILE_TYPES, QUANTS, Arch, ExportError, TensorNames, architecture, is_70b, tensor_type,
                   transform, write_hparams)
from .vocab import read_vocab

log = logging.getLogger(__name__)

LORAKIT_KEY = "general.lorakit.version"  # present in every GGUF lorakit writes: its mark of ownership
GGUF_PIN = "0.19"  # the gguf-py release line this writer is tested with (pyproject pins gguf==0.19.*)


def is_lorakit_gguf(path: str | Path) -> bool:
    """Whether `path` is a GGUF file lorakit wrote (it carries LORAKIT_KEY)."""
    try:
        from gguf import GGUFReader

        return LORAKIT_KEY in GGUFReader(str(path)).fields
    except Exception:  # not a GGUF at all, truncated, unreadable
        return False


@dataclass
class Entry:
    hf: str            # checkpoint tensor name
    name: str          # GGUF name
    shape: tuple       # numpy shape [rows, cols] (GGUF stores it reversed)
    qtype: str         # ggml type name


@dataclass
class ExportResult:
    path: Path
    seconds: float
    types: dict        # ggml type -> tensor count
    nbytes: int


ENCODE_ROWS_VALUES = 1 << 24  # values converted at once: the fp32 temporaries stay ~64 MB on any tensor


def encode_chunks(t: torch.Tensor, qtype: str):
    """One tensor in ggml type `qtype`, a slice of rows at a time (float32/float16 arrays, or uint8
    bytes [rows, row bytes]): memory holds one slice's fp32 copy and encoding, never a whole fp32
    copy or encoding of a 600 MB embedding."""
    rows = max(1, ENCODE_ROWS_VALUES // max(1, t.shape[-1])) if t.ndim > 1 else max(1, t.shape[0])
    for i in range(0, max(1, t.shape[0]), rows):
        yield _encode(t[i:i + rows], qtype)


def encode(t: torch.Tensor, qtype: str) -> np.ndarray:
    """The whole tensor encoded (small tensors, LoRA files): the slices of encode_chunks joined."""
    parts = list(encode_chunks(t, qtype))
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def write_tensor_chunks(w, chunks) -> None:
    """GGUFWriter.write_tensor_data for a tensor that arrives in slices: the next announced tensor's
    bytes, padded to the data alignment as the writer does (gguf-py 0.19 gguf_writer.py), written
    slice by slice so the whole encoding never exists at once."""
    from gguf.gguf_writer import WriterState

    if w.state not in (WriterState.TI_DATA, WriterState.WEIGHTS) or w.fout is None or len(w.fout) != 1:
        raise ValueError(f"GGUF writer in state {w.state}: tensor infos must be written first (one file)")
    fout = w.fout[0]
    name = next(iter(w.tensors[0]))
    info = w.tensors[0].pop(name)
    w.write_padding(fout, fout.tell())
    written = 0
    for part in chunks:
        part = np.ascontiguousarray(part)
        part.tofile(fout)
        written += part.nbytes
    if written != info.nbytes:
        raise ValueError(f"{name}: {written} bytes written, {info.nbytes} announced")
    w.write_padding(fout, written)
    w.state = WriterState.WEIGHTS


def _encode(t: torch.Tensor, qtype: str) -> np.ndarray:
    import gguf

    if qtype == "F32":
        return t.float().numpy()
    if qtype == "F16":
        return t.float().half().numpy()  # bf16 -> fp32 -> fp16 as convert_hf_to_gguf does
    if qtype == "BF16":
        b = t.to(torch.bfloat16).contiguous()
        return b.view(torch.int16).numpy().view(np.uint8).reshape(*b.shape[:-1], b.shape[-1] * 2)
    if qtype in kquants.BLOCK_BYTES:
        return kquants.quantize(t, qtype).numpy()
    return gguf.quants.quantize(t.float().numpy(), getattr(gguf.GGMLQuantizationType, qtype))


def _nbytes_shape(shape: tuple, qtype: str) -> tuple[np.dtype, tuple, int]:
    """(numpy dtype, shape as handed to add_tensor_info, nbytes) of an encoded tensor."""
    import gguf

    if qtype == "F32":
        return np.dtype(np.float32), shape, 4 * int(np.prod(shape))
    if qtype == "F16":
        return np.dtype(np.float16), shape, 2 * int(np.prod(shape))
    byte_shape = gguf.quant_shape_to_byte_shape(shape, getattr(gguf.GGMLQuantizationType, qtype))
    return np.dtype(np.uint8), byte_shape, int(np.prod(byte_shape))


def plan_entries(plan: MergePlan, arch: Arch, quant: str, tied: bool) -> list[Entry]:
    names = TensorNames(arch, tied)
    big = is_70b(arch)
    entries = []
    for file in plan.files:
        for hf, _, shape in plan.specs(file):
            name = names.gguf_name(hf)
            if name is None:
                continue
            entries.append(Entry(hf, name, shape, tensor_type(name, shape, quant, arch.n_layer, tied, big)))
    got = {e.name for e in entries}
    if "token_embd.weight" not in got:
        raise ExportError(f"{plan.folder}: no input embedding in the checkpoint")
    return entries


def export_gguf(model_path: str, out: str, quant: str = "q8_0", adapter_path: Optional[str] = None,
                overwrite: bool = False, progress: bool = True, name: Optional[str] = None) -> ExportResult:
    """Write base (+ adapter, merged in fp32 into the 16-bit base) as GGUF `out` (module docstring)."""
    from transformers import AutoConfig

    from ..model.load import resolve_model_path

    if quant not in QUANTS:
        raise ExportError(f"--quant {quant!r} is not allowed; choose one of {', '.join(QUANTS)}")
    start = time.perf_counter()
    folder = resolve_model_path(model_path)
    target = Path(out).expanduser()
    for src, what in ((folder, "the base model's folder (--model)"), (adapter_path, "the adapter folder (--adapter)")):
        if src is not None and Path(src).expanduser().resolve() == target.resolve():
            raise ExportError(f"{target} is {what}; lorakit never writes its output over its inputs")
    check_output_file(target, "GGUF export", overwrite, is_lorakit_gguf)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    arch = architecture(config)
    adapter = read_adapter_tensors(adapter_path) if adapter_path else None
    plan = MergePlan(folder, adapter)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    entries = plan_entries(plan, arch, quant, tied)
    n_vocab = next(e.shape[0] for e in entries if e.name == "token_embd.weight")
    if n_vocab != config.vocab_size:
        raise ExportError(f"{folder}: config.json vocab_size={config.vocab_size} but the embedding has {n_vocab} rows")
    vocab = read_vocab(folder, n_vocab)
    name = phi3_name(arch, vocab, name or folder.name)
    by_hf = {e.hf: e for e in entries}
    with atomic_file(target) as tmp:
        w = _writer(tmp, arch, quant, name, adapter_path)
        extra = write_hparams(w, arch)
        vocab.write(w)
        for gname, t in extra:
            w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32), t.numel() * 4)
        for e in entries:
            dtype, shape, nbytes = _nbytes_shape(e.shape, e.qtype)
            w.add_tensor_info(e.name, shape, dtype, nbytes, raw_dtype=_raw(e.qtype))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for _, t in extra:
            w.write_tensor_data(t.numpy())
        with progress_bar(len(entries), progress, desc=f"gguf {quant}") as bar:
            for hf, t in iter_merged_tensors(plan):
                e = by_hf.get(hf)
                if e is None:
                    continue
                t = transform(arch, hf, t)
                write_tensor_chunks(w, encode_chunks(t, e.qtype))
                del t
                bar.update(1)
                release_freed_memory()
        w.close()
    types: dict[str, int] = {}
    for e in entries:
        types[e.qtype] = types.get(e.qtype, 0) + 1
    return ExportResult(target, time.perf_counter() - start, types, target.stat().st_size)


PHI3_TOKENS = ("<unk>", "<s>", "</s>", "<|endoftext|>")


def phi3_name(arch: Arch, vocab, name: str) -> str:
    """llama.cpp has no GGUF field for "this special token eats the whitespace after it" (HF's
    rstrip); it applies Phi-3's rule when general.name contains "phi3" / "phi-3" (llama-vocab.cpp)
    and then looks up PHI3_TOKENS. So the name must say phi3 exactly when the tokenizer does that."""
    says = any(k in name.lower() for k in ("phi3", "phi-3"))
    if arch.name == "phi3" and vocab.rstrip_specials:
        missing = [t for t in PHI3_TOKENS if t not in vocab.tokens]
        if missing:
            raise ExportError(f"the Phi-3 tokenizer lacks {missing}, which llama.cpp's Phi-3 rules look up")
        return name if says else f"phi3-{name}"
    if says:
        log.warning("general.name %r would make llama.cpp apply Phi-3's special-token rule, which this "
                    "tokenizer does not have; writing it as %r", name, name.lower().replace("phi-3", "phi 3").replace("phi3", "phi 3"))
        return name.lower().replace("phi-3", "phi 3").replace("phi3", "phi 3")
    return name


def lorakit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lorakit")
    except PackageNotFoundError:
        return "unknown"


def _raw(qtype: str):
    import gguf

    return None if qtype in ("F32", "F16") else getattr(gguf.GGMLQuantizationType, qtype)


def _writer(path: Path, arch: Arch, quant: str, name: str, adapter_path: Optional[str]):
    import gguf

    logging.getLogger("gguf").setLevel(logging.WARNING)  # its INFO lines name our temporary file
    w = gguf.GGUFWriter(str(path), arch.name, use_temp_file=False)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_file_type(getattr(gguf.LlamaFileType, FILE_TYPES[quant][0]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_string(LORAKIT_KEY, lorakit_version())
    if adapter_path:
        w.add_string("general.lorakit.adapter", Path(adapter_path).name)
    return w
