"""The adapter alone as a llama.cpp LoRA GGUF (`llama-cli -m base.gguf --lora adapter.gguf`).

    general.type = "adapter", general.architecture = the base's, adapter.type = "lora",
    adapter.lora.alpha (f32), no tokenizer, no hyperparameters (llama.cpp reads them from the base)
    <gguf name of the base weight>.lora_a   A [r, in]   (ggml ne {in, r})
    <gguf name of the base weight>.lora_b   B [out, r]  (ggml ne {r, out}); for the llama family the
                                            rows of B of q_proj / k_proj get the base's rope permutation
                                            (W' = P W, so P (W + s B A) = W' + s (P B) A)

llama.cpp computes y += user_scale * alpha / r * B (A x), r = B's columns. rsLoRA's alpha / sqrt(r)
is folded in by writing alpha * sqrt(r). What that file cannot say is refused here, never dropped:
DoRA, per-layer rank or alpha patterns (one alpha per file), trained biases or full modules
(modules_to_save), embedding LoRA, and an lm_head LoRA where the base has no output.weight (tied
embeddings, Gemma-2): merge those with --format gguf instead.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from ..utils.fs import atomic_file, check_output_file
from .gguf import LORAKIT_KEY, ExportResult, encode, is_lorakit_gguf, lorakit_version
from .hf import MergePlan, read_adapter_tensors
from .keys import ExportError, TensorNames, architecture, llama_permute

LORA_QUANTS = ("f32", "f16", "bf16")


def export_gguf_lora(model_path: str, adapter_path: str, out: str, quant: str = "f16",
                     overwrite: bool = False) -> ExportResult:
    import gguf
    from transformers import AutoConfig

    from ..model.load import resolve_model_path

    if quant not in LORA_QUANTS:
        raise ExportError(f"--quant {quant!r} is not allowed with --format gguf-lora; choose one of "
                          f"{', '.join(LORA_QUANTS)} (llama.cpp merges and applies unquantized adapters only)")
    start = time.perf_counter()
    folder = resolve_model_path(model_path)
    target = Path(out).expanduser()
    check_output_file(target, "GGUF LoRA export", overwrite, is_lorakit_gguf)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    arch = architecture(config)
    adapter = read_adapter_tensors(adapter_path)
    plan = MergePlan(folder, adapter)  # checks every adapted weight exists in this base with the right shape
    cfg = adapter.config
    if adapter.replace:
        names = sorted(adapter.replace)
        raise ExportError(f"{adapter_path}: the adapter also trains full tensors ({names[0]!r}, {len(names)} in all: "
                          f"bias={cfg.bias!r} / modules_to_save); a llama.cpp LoRA file holds only LoRA pairs. "
                          f"Use --format gguf to merge them")
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = TensorNames(arch, tied)
    c = arch.config
    n_head, n_kv = c.num_attention_heads, getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    pairs = []
    for hf in sorted(adapter.lora, key=_order(plan)):
        if hf in plan.conv1d:
            raise ExportError(f"{hf!r} is a Conv1D weight; llama.cpp has no such layer")
        gname = names.gguf_name(hf)
        if gname is None:
            raise ExportError(f"{adapter_path}: the adapter adapts {hf[:-7]!r}, which llama.cpp's {arch.name} model "
                              f"does not have as a separate tensor (tied embeddings reuse token_embd); use --format gguf")
        a, b = adapter.lora[hf]
        if arch.name == "llama" and hf.endswith("self_attn.q_proj.weight"):
            b = llama_permute(b, n_head)
        elif arch.name == "llama" and hf.endswith("self_attn.k_proj.weight"):
            b = llama_permute(b, n_kv)
        pairs.append((gname, a, b))
    alpha = cfg.alpha * (math.sqrt(cfg.r) if cfg.use_rslora else 1.0)  # llama.cpp divides by r itself
    qtype = quant.upper()
    with atomic_file(target) as tmp:
        logging.getLogger("gguf").setLevel(logging.WARNING)
        w = gguf.GGUFWriter(str(tmp), arch.name, use_temp_file=False)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_name(Path(adapter_path).name)
        w.add_string("adapter.type", "lora")
        w.add_float32("adapter.lora.alpha", float(alpha))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_string(LORAKIT_KEY, lorakit_version())
        for gname, a, b in pairs:
            for suffix, t in ((".lora_a", a), (".lora_b", b)):
                data = encode(t.float(), qtype)
                w.add_tensor(gname + suffix, data, raw_dtype=None if qtype in ("F32", "F16") else gguf.GGMLQuantizationType.BF16)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return ExportResult(target, time.perf_counter() - start, {qtype: 2 * len(pairs)}, target.stat().st_size)


def _order(plan: MergePlan):
    """Sort adapted weights as they are stored in the base checkpoint (file, offset)."""
    pos = {}
    for i, f in enumerate(plan.files):
        for j, (name, _, _) in enumerate(plan.specs(f)):
            pos[name] = (i, j)
    return lambda name: pos.get(name, (len(plan.files), 0))
