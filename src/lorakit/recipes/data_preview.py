"""`lorakit data preview`: examples with the supervised tokens marked, and the length / truncation
statistics, exactly as training would tokenize them."""

from __future__ import annotations

import argparse
import sys

from ..config import DataConfig
from ..data import build_examples, load_records, preview, stats_text
from ..model.load import load_tokenizer_for, resolve_model_path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True)
    p.add_argument("--model", required=True, help="model folder whose tokenizer to use")
    p.add_argument("--format", default="auto")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--train-on-inputs", action="store_true")
    p.add_argument("-n", type=int, default=3, help="examples to show")


def main(args: argparse.Namespace) -> int:
    tokenizer = load_tokenizer_for(resolve_model_path(args.model))
    cfg = DataConfig(path=args.data, format=args.format, max_seq_len=args.max_seq_len,
                     train_on_inputs=args.train_on_inputs)
    examples, stats = build_examples(load_records(args.data), tokenizer, cfg)
    print(preview(examples, tokenizer, n=args.n, color=sys.stdout.isatty()))
    print(stats_text(stats))
    return 0
