"""`lorakit eval`: loss / perplexity over a data file (the training step's own loss), and exact match
by generation."""

from __future__ import annotations

import argparse
import math

from ..config import DataConfig
from ..data import Batches, build_examples, detect_format, load_records, pad_token_id
from ..model.modules import model_device
from ..train.loop import evaluate
from ..train.step import TrainStep
from .generate import add_model_arguments, exact_match, generate, load_for_inference, prompt_and_answer, trained_template


def evaluate_dataset(model, tokenizer, path: str, fmt: str = "auto", template: str = "auto", max_seq_len: int = 512,
                     exact_match_limit: int = 0, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    records = load_records(path)
    fmt = detect_format(records, path) if fmt == "auto" else fmt
    examples, _ = build_examples(records, tokenizer, DataConfig(path=path, format=fmt, template=template, max_seq_len=max_seq_len))
    batches = Batches(examples, batch_size, 0, pad_token_id(tokenizer), shuffle=False)
    loss = evaluate(TrainStep(model), batches, model_device(model))
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(examples)}
    if exact_match_limit:
        pairs = [prompt_and_answer(r, fmt, tokenizer, template) for r in records[:exact_match_limit]]
        preds = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
        out.update(exact_match=exact_match(preds, [a for _, a in pairs]), exact_match_n=len(pairs))
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--data", required=True, help="data file (.jsonl/.json/.csv/.parquet)")
    p.add_argument("--format", default="auto", help="row format (auto-detected by default)")
    p.add_argument("--template", default=None, choices=["auto", "chat", "alpaca", "alpaca_short"],
                   help="how rows become prompts, as data.template in training [default: the template the adapter was "
                        "trained with, from its run_config.yaml; auto without an adapter]")
    p.add_argument("--max-seq-len", type=int, default=512)
    p.add_argument("--exact-match", type=int, default=0, metavar="N",
                   help="also generate answers for the first N rows and score exact match (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=64)


def main(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_inference(args)
    template = args.template or trained_template(args.adapter, "auto")
    res = evaluate_dataset(model, tokenizer, args.data, fmt=args.format, template=template, max_seq_len=args.max_seq_len,
                           exact_match_limit=args.exact_match, max_new_tokens=args.max_new_tokens)
    print(f"loss {res['loss']:.4f}  perplexity {res['perplexity']:.3f}  ({res['examples']} examples)")
    if "exact_match" in res:
        print(f"exact match {100 * res['exact_match']:.1f}% on {res['exact_match_n']} examples")
    return 0
