"""`lorakit export`: a model (+ adapter) as GGUF for llama.cpp / Ollama / LM Studio, or the adapter
alone as a llama.cpp LoRA GGUF. Formats, quant types and measured numbers: docs/export.md.

    lorakit export --model M [--adapter A] --format gguf --quant q4_k_m --out model.gguf [--ollama]
    lorakit export --model M --adapter A --format gguf-lora --out adapter.gguf
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..export.keys import QUANTS


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True,
                   help="the 16-bit base model folder (config.json + *.safetensors + tokenizer.json) or hub id; for a "
                        "QLoRA adapter, the original 16-bit model it was trained from (never a 4-bit copy)")
    p.add_argument("--adapter", help="LoRA adapter folder (lorakit or PEFT format): merged in fp32 into the base "
                                     "(--format gguf) or written alone (--format gguf-lora)")
    p.add_argument("--format", choices=["gguf", "gguf-lora"], default="gguf",
                   help="gguf: the whole (merged) model; gguf-lora: the adapter alone for llama.cpp's --lora "
                        "(refused for DoRA, rank/alpha patterns, trained biases/modules, lm_head LoRA on tied embeddings)")
    p.add_argument("--quant", default=None,
                   help=f"gguf: one of {', '.join(QUANTS)} (default q8_0; q4_k_m and q6_k follow llama-quantize's "
                        f"mix: Q6_K output head, attn_v/ffn_down in some layers); gguf-lora: f32, f16 (default) or bf16")
    p.add_argument("--out", required=True, help="the .gguf file to write (new, or a lorakit GGUF with --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out (and the Modelfile) when lorakit wrote them; a file lorakit did not write is never replaced")
    p.add_argument("--ollama", action="store_true",
                   help="also write an Ollama Modelfile beside the GGUF (FROM, TEMPLATE from the chat template, "
                        "PARAMETER stop) and print the `ollama create` command")
    p.add_argument("--name", help="general.name in the GGUF (default: the model folder's name)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(args: argparse.Namespace) -> int:
    if args.format == "gguf-lora":
        from ..export.gguf_lora import export_gguf_lora

        if not args.adapter:
            raise ValueError("--format gguf-lora needs --adapter (the adapter folder to convert)")
        if args.ollama:
            raise ValueError("--ollama needs --format gguf: current Ollama no longer accepts LoRA adapters; "
                             "export the merged model instead")
        res = export_gguf_lora(args.model, args.adapter, args.out, quant=args.quant or "f16", overwrite=args.overwrite)
        print(f"LoRA GGUF -> {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.seconds:.1f} s); "
              f"use: llama-cli -m <base.gguf> --lora {res.path}")
        return 0
    from ..export.gguf import export_gguf

    res = export_gguf(args.model, args.out, quant=args.quant or "q8_0", adapter_path=args.adapter,
                      overwrite=args.overwrite, progress=not args.no_progress, name=args.name)
    mix = ", ".join(f"{n} {t}" for t, n in sorted(res.types.items()))
    print(f"GGUF -> {res.path} ({res.nbytes / 2**20:.1f} MiB, {res.seconds:.1f} s; tensors: {mix})")
    if args.ollama:
        from transformers import AutoTokenizer

        from ..export.ollama import write_modelfile
        from ..model.load import resolve_model_path

        tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model), trust_remote_code=False)
        path, command, fmt = write_modelfile(Path(res.path), tok.chat_template, tok.eos_token, args.overwrite)
        if fmt is None:
            print(f"warning: the chat template is not one lorakit translates (ChatML, Llama-3, Gemma, Phi-3, Mistral, "
                  f"Alpaca); {path} has no TEMPLATE, so Ollama will guess the prompt format")
        print(f"Ollama Modelfile -> {path}\n{command}")
    return 0
