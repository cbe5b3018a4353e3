"""`lorakit merge`: base + adapter -> one plain 16-bit transformers folder (+ tokenizer).

Two paths, the same bits (tests/export/test_merge_stream.py):
    streaming (default): a 16-bit base on disk + adapter, merged tensor by tensor (export/hf.py);
                         memory ~ adapter + one tensor, whatever the model's size
    in memory:           with --verify (compares logits, so it needs the model), --quantization (merge
                         onto the dequantized 4-bit weights), or a lorakit 4-bit checkpoint as --model
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional


from ..lora.init import weight_preparer
from ..lora.io import load_adapter, read_adapter_config
from ..lora.merge import MergeReport, merge
from ..model.load import load_model
from ..model.modules import model_device
from ..utils.fs import check_output_folder, output_folder

# Sample text for --verify when the caller gives none: varied words, digits and punctuation.
VERIFY_TEXT = ("The quick brown fox jumps over the lazy dog. In 1969, 3 astronauts flew 384,400 km to the Moon; "
               "question: what is 12 * 7? answer: 84.")


def streams(model_path: str, quantization: Optional[str], verify: bool, adapter: Optional[str] = None) -> bool:
    """Whether `lorakit merge` takes the streaming path: a 16-bit safetensors base, no --verify,
    no --quantization, and a plain LoRA adapter (DoRA, pissa/olora residual bases and embedding
    LoRA merge in memory)."""
    from ..model import quantized_checkpoint
    from ..model.load import resolve_model_path

    if verify or quantization is not None:
        return False
    if adapter is not None:
        config = read_adapter_config(adapter)
        if config.use_dora or config.residual_init or _adapts_embeddings(adapter):
            return False
    return quantized_checkpoint.read_quantization_info(resolve_model_path(model_path)) is None


def _adapts_embeddings(adapter: str) -> bool:
    from safetensors import safe_open

    from ..lora.io import WEIGHTS_NAME

    with safe_open(str(Path(adapter) / WEIGHTS_NAME), framework="pt") as f:
        return any("lora_embedding" in k for k in f.keys())


def merge_to_folder(model_path: str, adapter: str, out: str, quantization: Optional[str] = None,
                    precision: str = "auto", verify: bool = False, max_kl: float = 1e-3,
                    overwrite: bool = False) -> Optional[MergeReport]:
    """Load the base (in 16 bits, or dequantized from 4 bits with `quantization` to merge onto exactly
    the weights a QLoRA adapter was trained against), add the adapter, merge in fp32, save into
    `out`: a new or empty folder, or with `overwrite` a previous merge output (utils/fs.py)."""
    protect = [(model_path, "the base model's folder (--model)"), (adapter, "the adapter folder (--adapter)")]
    check_output_folder(out, "merge", overwrite, protect=protect)  # before minutes of loading, not after
    # a pissa/olora adapter applies to the residual base: computed from the 16-bit weights as they
    # load, and that residual is what --quantization quantizes, as in training (lora/init.py)
    prepare = weight_preparer(read_adapter_config(adapter))
    model, tokenizer = load_model(model_path, quantization=quantization, compute_dtype=precision, prepare=prepare)
    load_adapter(model, adapter, trainable=False)
    sample = None
    if verify:
        if tokenizer is None:
            raise FileNotFoundError(f"{model_path}: --verify needs the model's tokenizer")
        sample = tokenizer(VERIFY_TEXT, return_tensors="pt")["input_ids"].to(model_device(model))
    merged = merge(model, verify=sample, max_kl=max_kl)
    with output_folder(out, "merge", overwrite, protect=protect) as tmp:
        merged.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return getattr(merged, "lorakit_merge_report", None)


def add_arguments(p: argparse.ArgumentParser) -> None:
    from .generate import add_model_arguments

    add_model_arguments(p, adapter=False)
    p._option_string_actions["--precision"].help = (
        "dtype of the merged weights: auto keeps each tensor's stored dtype (streaming) or picks the device's "
        "compute dtype (in memory); bf16/fp16/fp32 cast every float tensor")
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model (+ tokenizer): new or empty, "
                   "or a previous lorakit merge output with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous lorakit merge in --out (only the files lorakit wrote there)")
    p.add_argument("--verify", action="store_true",
                   help="compare logits before/after on sample text and fail above --max-kl; this loads the whole "
                        "model into memory (the in-memory merge) instead of merging tensor by tensor")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--max-kl", type=float, default=1e-3, help="largest KL divergence (nats/token) --verify accepts")


def main(args: argparse.Namespace) -> int:
    if streams(args.model, args.quantization, args.verify, args.adapter):
        from ..dtypes import to_dtype
        from ..export.hf import stream_merge

        dtype = None if args.precision == "auto" else to_dtype(args.precision)
        stream_merge(args.model, args.adapter, args.out, dtype=dtype, overwrite=args.overwrite,
                     progress=not args.no_progress)
        print(f"merged model -> {args.out} (streamed tensor by tensor)")
        return 0
    report = merge_to_folder(args.model, args.adapter, args.out, quantization=args.quantization,
                             precision=args.precision, verify=args.verify, max_kl=args.max_kl,
                             overwrite=args.overwrite)
    if report is not None:
        print(report)
    print(f"merged model -> {args.out}")
    return 0
