"""`lorakit eval`: loss / perplexity over a data file, and exact match by generation."""

from __future__ import annotations

import math


from ..config import DataConfig
from ..data import build_examples, detect_format, load_records
from ..train.loop import Batches, evaluate
from .generate import exact_match, generate, prompt_and_answer


def evaluate_dataset(model, tokenizer, path: str, fmt: str = "auto", template: str = "alpaca", max_seq_len: int = 512,
                     exact_match_limit: int = 0, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    records = load_records(path)
    fmt = detect_format(records, path) if fmt == "auto" else fmt
    examples, _ = build_examples(records, tokenizer, DataConfig(path=path, format=fmt, template=template, max_seq_len=max_seq_len))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    loss = evaluate(model, Batches(examples, batch_size, 0, pad, shuffle=False), device, 1024)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "examples": len(examples)}
    if exact_match_limit:
        pairs = [prompt_and_answer(r, fmt, tokenizer, template) for r in records[:exact_match_limit]]
        preds = generate(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
        out.update(exact_match=exact_match(preds, [a for _, a in pairs]), exact_match_n=len(pairs))
    return out
