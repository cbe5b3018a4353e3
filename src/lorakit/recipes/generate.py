"""`lorakit generate` and `lorakit chat`, and what eval and the demo share with them: loading a base
(+ adapter) for inference, the prompt a row gives, batched greedy decoding, chat turns, exact match."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from ..config import ConfigError
from ..data.formats import CHATML, format_prompt, render
from ..data.tokenize import pad_token_id
from ..model.modules import model_device


def prompt_and_answer(record: dict, fmt: str, tokenizer=None, template: str = "alpaca") -> tuple[str, str]:
    """(prompt text, reference answer) for a row: the prompt is everything before the last
    supervised run of segments, exactly as training rendered it; the answer is that run's text
    without a chat end-of-turn marker."""
    segments = render(record, fmt, tokenizer, template)
    last = max(i for i, (_, sup) in enumerate(segments) if sup)
    first = last
    while first > 0 and segments[first - 1][1]:
        first -= 1
    prompt = "".join(t for t, _ in segments[:first])
    answer = "".join(t for t, _ in segments[first:last + 1])
    for marker in (CHATML["end"], getattr(tokenizer, "eos_token", None) or "\0"):
        if answer.endswith(marker):
            answer = answer[: -len(marker)]
    return prompt, answer


def chat_prompt(messages: list[dict], tokenizer) -> str:
    """The conversation so far plus the assistant header, via the tokenizer's chat template or ChatML."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    text = "".join(CHATML["start"].format(role=m["role"]) + m["content"] + CHATML["end"] + CHATML["sep"] for m in messages)
    return text + CHATML["start"].format(role="assistant")


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             batch_size: int = 16, stop: Optional[list[str]] = None) -> list[str]:
    """Continue each prompt (greedy when temperature == 0), left-padded batches; the new text only."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = pad_token_id(tokenizer)
    device = model_device(model)
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True)
            enc = {k: enc[k].to(device) for k in ("input_ids", "attention_mask")}  # no token_type_ids: causal LMs take none
            kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad,
                          eos_token_id=tokenizer.eos_token_id)
            if temperature > 0:
                kwargs["temperature"] = temperature
            else:
                kwargs.update(temperature=None, top_p=None, top_k=None)
            out = model.generate(**enc, **kwargs)
            new = out[:, enc["input_ids"].shape[1]:]                     # [B, new tokens]
            texts = tokenizer.batch_decode(new, skip_special_tokens=True)
            outputs += [_cut(t, stop) for t in texts]
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return outputs


def _cut(text: str, stop: Optional[list[str]]) -> str:
    for s in stop or ():
        if s in text:
            text = text[: text.index(s)]
    return text


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions equal to their reference after stripping surrounding whitespace."""
    if not references:
        return 0.0
    return sum(p.strip() == r.strip() for p, r in zip(predictions, references)) / len(references)


# ------------------------------------------------------------------ command line (generate, chat; eval shares these)


def add_model_arguments(p: argparse.ArgumentParser, adapter: bool = True) -> None:
    """--model, --adapter, --quantization, --precision: a base (+ adapter) for inference."""
    p.add_argument("--model", required=True, help="model folder (config.json + *.safetensors + tokenizer) or hub id")
    if adapter:
        p.add_argument("--adapter", help="LoRA adapter folder (lorakit or PEFT format)")
    p.add_argument("--quantization", choices=["nf4", "fp4"], default=None, help="load the base in 4 bits")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"], help="compute dtype")


def load_for_inference(args: argparse.Namespace):
    """(model in eval mode, tokenizer) from add_model_arguments' flags."""
    from ..lora.init import weight_preparer
    from ..lora.io import load_adapter, read_adapter_config
    from ..model.load import load_model

    adapter = getattr(args, "adapter", None)
    prepare = weight_preparer(read_adapter_config(adapter)) if adapter else None  # pissa/olora: the residual base
    model, tokenizer = load_model(args.model, quantization=args.quantization, compute_dtype=args.precision,
                                  prepare=prepare)
    if tokenizer is None:
        raise FileNotFoundError(f"{args.model}: no tokenizer files")
    if getattr(args, "adapter", None):
        load_adapter(model, args.adapter, trainable=False)
    return model.eval(), tokenizer


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--prompt", help="prompt text")
    p.add_argument("--prompt-file", help="read the prompt from a file")
    p.add_argument("--template", choices=["raw", "alpaca", "alpaca_short", "chat"], default="raw",
                   help="raw text, the alpaca/dolly instruction template used in training (data.template), or the chat template")
    p.add_argument("--context", help="input/context section for --template alpaca")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def templated_prompt(text: str, template: str, tokenizer, context: str = "") -> str:
    """The prompt text as training rendered it: raw, an alpaca/dolly template, or one chat user turn."""
    if template in ("alpaca", "alpaca_short"):
        return format_prompt(text, context or "", template)
    if template == "chat":
        return chat_prompt([{"role": "user", "content": text}], tokenizer)
    return text


def main_generate(args: argparse.Namespace) -> int:
    prompt = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if prompt is None:
        raise ConfigError("give --prompt TEXT or --prompt-file FILE")
    model, tokenizer = load_for_inference(args)
    prompt = templated_prompt(prompt, args.template, tokenizer, args.context)
    print(generate(model, tokenizer, [prompt], args.max_new_tokens, args.temperature)[0])
    return 0


def add_chat_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--system", help="system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)


def main_chat(args: argparse.Namespace) -> int:
    model, tokenizer = load_for_inference(args)
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
