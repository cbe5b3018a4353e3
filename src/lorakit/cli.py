"""`lorakit <command>`: every command is a module with `add_arguments(parser)` and `main(args)`, which
parses nothing itself and calls one recipe function."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Optional

from .config import ConfigError

log = logging.getLogger("lorakit")

# command -> (module under lorakit, add_arguments name, main name, help); `data preview` is nested.
COMMANDS = {
    "train": ("recipes.finetune", "add_arguments", "main", "fine-tune an adapter (YAML config and/or flags)"),
    "estimate": ("recipes.estimate", "add_arguments", "main",
                 "predict peak memory per component before a run; --fit BUDGET finds settings that fit"),
    "sweep": ("recipes.sweep", "add_arguments", "main",
              "train several ranks / methods / learning rates on the same data and compare them"),
    "report": ("report.html", "add_arguments", "main", "write a self-contained HTML report of a run or sweep folder"),
    "generate": ("recipes.generate", "add_generate_arguments", "main_generate", "generate text from a model (+ adapter)"),
    "chat": ("recipes.generate", "add_chat_arguments", "main_chat",
             "interactive chat (chat template, or ChatML when the tokenizer has none)"),
    "merge": ("recipes.merge", "add_arguments", "main", "merge an adapter into its base and save a plain 16-bit model"),
    "export": ("recipes.export", "add_arguments", "main",
               "write GGUF for llama.cpp / Ollama (merged model, f16..q4_k_m) or a llama.cpp LoRA GGUF"),
    "eval": ("recipes.evaluate", "add_arguments", "main", "validation loss / perplexity, and exact match, on a data file"),
    "quant-report": ("recipes.quant_report", "add_arguments", "main",
                     "4-bit quantization quality per layer (nf4/fp4/int4): error, KL, perplexity"),
    "demo": ("recipes.demo", "add_arguments", "main",
             "QLoRA end to end on the built-in tiny model and data (CPU, offline, minutes)"),
}


def _module(name: str):
    import importlib

    return importlib.import_module(f"lorakit.{name}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorakit", allow_abbrev=False,
                                     description="Fine-tune causal LMs with LoRA and QLoRA on the hardware you have.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, (module, add, run, help_text) in COMMANDS.items():
        p = sub.add_parser(command, help=help_text, allow_abbrev=False)
        mod = _module(module)
        getattr(mod, add)(p)
        p.set_defaults(func=getattr(mod, run))
    p = sub.add_parser("data", help="inspect training data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("preview", help="show examples with supervised tokens marked [[like this]], and statistics")
    preview = _module("recipes.data_preview")
    preview.add_arguments(q)
    q.set_defaults(func=preview.main)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    try:
        return args.func(args)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"lorakit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lorakit: interrupted (the last checkpoint is intact; continue with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
