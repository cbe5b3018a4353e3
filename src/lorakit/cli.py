"""`lorakit <command>`: each command parses its flags and calls one recipe function."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
from typing import Optional

from .config import ConfigError, RunConfig, field_docs, load_config

log = logging.getLogger("lorakit")
SECTIONS = typing.get_type_hints(RunConfig)  # section name -> its dataclass


# ------------------------------------------------------------------ shared helpers


def _load_for_inference(args):
    """Base model (+ adapter) for generate / chat / eval."""
    from .lora.io import load_adapter
    from .model.load import load_model

    model, tokenizer = load_model(args.model, quantization=args.quantization, compute_dtype=args.precision)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer files")
    if args.adapter:
        load_adapter(model, args.adapter, trainable=False)
    return model.eval(), tokenizer


def _add_model_args(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    p.add_argument("--model", required=True, help="model folder (config.json + *.safetensors + tokenizer) or hub id")
    if adapter:
        p.add_argument("--adapter", help="LoRA adapter folder (lorakit or PEFT format)")
    p.add_argument("--quantization", choices=["nf4", "fp4"], default=None, help="load the base in 4 bits")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="compute dtype")


# ------------------------------------------------------------------ train


def _add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="YAML config file (sections: model, lora, data, train)")
    p.add_argument("--model", dest="shortcut_model", help="shortcut for --model.name_or_path")
    p.add_argument("--data", dest="shortcut_data", help="shortcut for --data.path")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a train.output_dir that holds a previous lorakit run (only lorakit's files "
                        "there are replaced); without it lorakit writes only into a new or empty folder")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one field, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")
    p.add_argument("--fit-memory", dest="shortcut_fit", metavar="SIZE", help="shortcut for --train.fit_memory (e.g. 15GiB)")
    for section, cls in SECTIONS.items():
        group = p.add_argument_group(f"{section} options (YAML section '{section}:')")
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            group.add_argument(f"--{section}.{f.name}", dest=f"field:{section}.{f.name}", metavar="VALUE",
                               help=f"{docs.get(f.name, '')} [default: {default!r}]".replace("%", "%%"))


def config_from_args(args) -> RunConfig:
    """RunConfig from a parsed `train` (or `sweep`) command line: YAML file, then --set overrides,
    shortcuts and --section.field flags, in that order."""
    overrides = list(args.set)
    for attr, key in (("shortcut_model", "model.name_or_path"), ("shortcut_data", "data.path"),
                      ("shortcut_fit", "train.fit_memory")):
        if getattr(args, attr, None):
            overrides.append(f"{key}={getattr(args, attr)}")
    for key, value in vars(args).items():
        if key.startswith("field:") and value is not None:
            overrides.append(f"{key[len('field:'):]}={value}")
    cfg = load_config(args.config, overrides)
    if not cfg.model.name_or_path:
        raise ConfigError("model.name_or_path is not set; give --model PATH or model.name_or_path in the config")
    if not cfg.data.path:
        raise ConfigError("data.path is not set; give --data FILE or data.path in the config")
    return cfg


def cmd_train(args) -> int:
    from .recipes.finetune import finetune

    cfg = config_from_args(args)
    out = finetune(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    r = out.result
    print(f"{r.stopped_reason}: {r.steps} steps in {r.seconds:.1f} s, {r.tokens_per_s:.0f} tokens/s")
    if r.best_val_loss is not None:
        print(f"best validation loss {r.best_val_loss:.4f} at step {r.best_step} -> {r.run_dir / 'best_adapter'}")
    print(f"final adapter -> {r.run_dir / 'adapter'}; metrics -> {r.run_dir / 'metrics.jsonl'}")
    print(f"peak memory {r.peak_memory_bytes / 2**20:.0f} MiB measured, {out.predicted_peak_bytes / 2**20:.0f} MiB "
          f"predicted allocated (on CPU the measure is peak RSS, which includes the process itself)")
    print(f"report -> {r.run_dir / 'report.html'}")
    return 0


# ------------------------------------------------------------------ generate / chat


def cmd_generate(args) -> int:
    from .data.formats import format_prompt
    from .recipes.generate import chat_prompt, generate

    model, tokenizer = _load_for_inference(args)
    prompt = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if prompt is None:
        raise ConfigError("give --prompt TEXT or --prompt-file FILE")
    if args.template in ("alpaca", "alpaca_short"):
        prompt = format_prompt(prompt, args.context or "", args.template)
    elif args.template == "chat":
        prompt = chat_prompt([{"role": "user", "content": prompt}], tokenizer)
    print(generate(model, tokenizer, [prompt], args.max_new_tokens, args.temperature)[0])
    return 0


def cmd_chat(args) -> int:
    from .recipes.generate import chat_prompt, generate

    model, tokenizer = _load_for_inference(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print("chat with the model; an empty line or Ctrl-D ends", file=sys.stderr)
    for line in sys.stdin:
        if not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = generate(model, tokenizer, [chat_prompt(messages, tokenizer)], args.max_new_tokens, args.temperature)[0]
        messages.append({"role": "assistant", "content": reply.strip()})
        print(f"assistant: {reply.strip()}", flush=True)
    return 0


# ------------------------------------------------------------------ merge / eval / data


def cmd_merge(args) -> int:
    from .recipes.merge import merge_to_folder

    report = merge_to_folder(args.model, args.adapter, args.out, quantization=args.quantization,
                             precision=args.precision, verify=args.verify, max_kl=args.max_kl,
                             overwrite=args.overwrite)
    if report is not None:
        print(report)
    print(f"merged model -> {args.out}")
    return 0


def cmd_eval(args) -> int:
    from .recipes.evaluate import evaluate_dataset

    model, tokenizer = _load_for_inference(args)
    res = evaluate_dataset(model, tokenizer, args.data, fmt=args.format, template=args.template, max_seq_len=args.max_seq_len,
                           exact_match_limit=args.exact_match, max_new_tokens=args.max_new_tokens)
    print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  ({res['examples']} examples)")
    if "exact_match" in res:
        print(f"exact match {100 * res['exact_match']:.1f}% on {res['exact_match_n']} examples")
    return 0


def cmd_data_preview(args) -> int:
    from .config import DataConfig
    from .data import build_examples, load_records, preview, stats_text
    from .model.load import load_tokenizer_for, resolve_model_path

    tokenizer = load_tokenizer_for(resolve_model_path(args.model))
    cfg = DataConfig(path=args.data, format=args.format, max_seq_len=args.max_seq_len,
                     train_on_inputs=args.train_on_inputs)
    examples, stats = build_examples(load_records(args.data), tokenizer, cfg)
    print(preview(examples, tokenizer, n=args.n, color=sys.stdout.isatty()))
    print(stats_text(stats))
    return 0


def cmd_demo(args) -> int:
    from .recipes.demo import run_demo

    return run_demo(args.out, progress=not args.no_progress, overwrite=args.overwrite)


# ------------------------------------------------------------------ parser


def build_parser() -> argparse.ArgumentParser:
    from .recipes import estimate as estimate_cmd
    from .recipes import quant_report as quant_report_cmd
    from .recipes import sweep as sweep_cmd
    from .report import html as report_cmd

    parser = argparse.ArgumentParser(prog="lorakit", allow_abbrev=False,
                                     description="Fine-tune causal LMs with LoRA and QLoRA on the hardware you have.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="fine-tune an adapter (YAML config and/or flags)", allow_abbrev=False)
    _add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("estimate", help="predict peak memory per component before a run; --fit BUDGET finds settings that fit")
    estimate_cmd.add_arguments(p)
    p.set_defaults(func=estimate_cmd.main)

    p = sub.add_parser("sweep", help="train several ranks / methods / learning rates on the same data and compare them",
                       allow_abbrev=False)
    sweep_cmd.add_arguments(p)
    p.set_defaults(func=sweep_cmd.main)

    p = sub.add_parser("report", help="write a self-contained HTML report of a run or sweep folder")
    report_cmd.add_arguments(p)
    p.set_defaults(func=report_cmd.main)

    p = sub.add_parser("generate", help="generate text from a model (+ adapter)", allow_abbrev=False)
    _add_model_args(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from a file")
    p.add_argument("--template", choices=["raw", "alpaca", "alpaca_short", "chat"], default="raw",
                   help="raw text, the alpaca/dolly instruction template used in training (data.template), or the chat template")
    p.add_argument("--context", help="input/context section for --template alpaca")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat (chat template, or ChatML when the tokenizer has none)")
    _add_model_args(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("merge", help="merge an adapter into its base and save a plain 16-bit model")
    _add_model_args(p, adapter=False)
    p.add_argument("--adapter", required=True, help="adapter folder")
    p.add_argument("--out", required=True, help="output folder for the merged model (+ tokenizer): new or empty, "
                   "or a previous lorakit merge output with --overwrite")
    p.add_argument("--overwrite", action="store_true",
                   help="replace a previous lorakit merge in --out (only the files lorakit wrote there)")
    p.add_argument("--verify", action="store_true", help="compare logits before/after on sample text and fail above --max-kl")
    p.add_argument("--max-kl", type=float, default=1e-3, help="largest KL divergence (nats/token) --verify accepts")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("eval", help="validation loss / perplexity, and exact match, on a data file")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="data file (.jsonl/.json/.csv/.parquet)")
    p.add_argument("--format", default="auto", help="row format (auto-detected by default)")
    p.add_argument("--template", default="alpaca", choices=["alpaca", "alpaca_short"], help="prompt template (as data.template in training)")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--exact-match", type=int, default=0, metavar="N",
                   help="also generate answers for the first N rows and score exact match (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("data", help="inspect training data")
    dsub = p.add_subparsers(dest="data_command", required=True, metavar="SUBCOMMAND")
    q = dsub.add_parser("preview", help="show examples with supervised tokens marked [[like this]], and statistics")
    q.add_argument("--data", required=True)
    q.add_argument("--model", required=True, help="model folder whose tokenizer to use")
    q.add_argument("--format", default="auto")
    q.add_argument("--max-seq-len", type=int, default=512)
    q.add_argument("--train-on-inputs", action="store_true")
    q.add_argument("-n", type=int, default=3, help="examples to show")
    q.set_defaults(func=cmd_data_preview)

    p = sub.add_parser("quant-report", help="4-bit quantization quality per layer (nf4/fp4/int4): error, KL, perplexity")
    quant_report_cmd.add_arguments(p)
    p.set_defaults(func=quant_report_cmd.main)

    p = sub.add_parser("demo", help="QLoRA end to end on the built-in tiny model and data (CPU, offline, minutes)")
    p.add_argument("--out", default="runs/demo", help="run folder (a previous demo run there is replaced)")
    p.add_argument("--overwrite", action="store_true", help="also replace a previous (non-demo) lorakit run in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_demo)
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
