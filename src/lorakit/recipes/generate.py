"""`lorakit generate` and `lorakit chat`, and what eval and the demo share with them: loading a base
(+ adapter) for inference, the prompt a row gives, batched greedy decoding, chat turns, exact match."""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from ..config import ConfigError
from ..data.formats import CHATML, format_prompt, instruction_messages, render, resolve_template
from ..data.tokenize import pad_token_id
from ..dtypes import short_name
from ..model.generation import generate_ids
from ..model.modules import model_device


def prompt_and_answer(record: dict, fmt: str, tokenizer=None, template: str = "auto") -> tuple[str, str]:
    """(prompt text, reference answer) for a row: the prompt is everything before the last
    supervised run of segments, exactly as training rendered it; the answer is that run's first
    segment (a chat turn's content, without the end-of-turn marker that follows it as its own segment)."""
    segments = render(record, fmt, tokenizer, template)
    last = max(i for i, (_, sup) in enumerate(segments) if sup)
    first = last
    while first > 0 and segments[first - 1][1]:
        first -= 1
    prompt = "".join(t for t, _ in segments[:first])
    answer = segments[first][0]
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


GENERATION_BUDGET_FLOOR = 64 * 2**20  # tiny models: a training row's activations are a few MiB


def generation_budget(model, seq_len: int) -> int:
    """The memory a generation batch may use beyond the weights: what one training row of `seq_len`
    tokens needs for its activations, loss and workspace (memory/estimate.py), at least 64 MiB, so
    that generating (eval --exact-match, generate, chat, samples during training) stays within
    what training the same model needs."""
    from ..memory.estimate import Settings, estimate
    from ..quant.linear4bit import Linear4bit

    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point() and not p.requires_grad), torch.float32)
    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    s = Settings(method="qlora" if quantized else "lora", seq_len=max(seq_len, 2), batch_size=1,
                 dtype=short_name(dtype),
                 device="cuda" if model_device(model).type == "cuda" else "cpu")
    c = estimate(model, s).components
    return max(GENERATION_BUDGET_FLOOR, c["activations"] + c["logits_loss"] + c["workspace"])


def _batches(lengths: list[int], order: list[int], model, max_new_tokens: int, batch_size: Optional[int],
             max_batch: int) -> list[list[int]]:
    """Prompt indices per batch, in length order: `batch_size` each, or (None) the largest batch whose
    generation workspace (memory/generation.py) fits generation_budget for its longest prompt."""
    if batch_size is not None:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    from ..memory.generation import generation_bytes
    from ..memory.shapes import resolve_shape
    from ..quant.linear4bit import Linear4bit

    shape = resolve_shape(model)
    bc = next((p.element_size() for p in model.parameters() if p.is_floating_point() and not p.requires_grad), 4)
    quantized = any(isinstance(m, Linear4bit) for m in model.modules())
    budget = generation_budget(model, max(lengths) + max_new_tokens)
    out, i = [], 0
    while i < len(order):
        b = min(max_batch, len(order) - i)
        while b > 1 and generation_bytes(shape, b, lengths[order[i + b - 1]], max_new_tokens, bc,
                                         quantized)["total"] > budget:
            b -= 1
        out.append(order[i:i + b])
        i += b
    return out


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             batch_size: Optional[int] = None, stop: Optional[list[str]] = None, max_batch: int = 16) -> list[str]:
    """Continue each prompt (greedy when temperature == 0); the new text only. Prompts are batched in
    order of length (less padding; model/generation.py decodes each batch), the answers returned in
    the given order; `batch_size` None picks each batch from the memory it needs (at most `max_batch`)."""
    ids = tokenizer(prompts, add_special_tokens=True)["input_ids"] if prompts else []
    lengths = [len(p) for p in ids]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    answers: dict[int, str] = {}
    for batch in (_batches(lengths, order, model, max_new_tokens, batch_size, max_batch) if prompts else []):
        new = generate_ids(model, [ids[i] for i in batch], pad_token_id(tokenizer), tokenizer.eos_token_id,
                           max_new_tokens, temperature)
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        answers.update({i: _cut(t, stop) for i, t in zip(batch, texts)})
    return [answers[i] for i in range(len(prompts))]


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


def trained_template(adapter: Optional[str], default: str) -> str:
    """The data.template the adapter was trained with: read from the run's run_config.yaml beside the
    adapter (a run folder's adapter/ and best_adapter/, or inside a checkpoint), else `default`."""
    if adapter:
        import yaml
        from pathlib import Path

        for folder in (Path(adapter), Path(adapter).parent):
            path = folder / "run_config.yaml"
            if path.is_file():
                template = ((yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("data") or {}).get("template")
                if template:
                    return template
    return default


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
    p.add_argument("--template", choices=["raw", "auto", "alpaca", "alpaca_short", "chat"], default=None,
                   help="how the prompt is wrapped: raw text, the alpaca/dolly instruction template, the chat template, "
                        "or auto (chat when the tokenizer has one) [default: the data.template the adapter was trained "
                        "with, from its run_config.yaml; raw without an adapter]")
    p.add_argument("--context", help="input/context section for --template alpaca")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def templated_prompt(text: str, template: str, tokenizer, context: str = "") -> str:
    """The prompt text as training rendered it: raw, an alpaca/dolly template, or one chat user turn
    (data/formats.py instruction_messages: the context after a blank line)."""
    if template == "raw":
        return text
    template = resolve_template(template, tokenizer)
    if template == "chat":
        return chat_prompt(instruction_messages(text, context or ""), tokenizer)
    return format_prompt(text, context or "", template)


def main_generate(args: argparse.Namespace) -> int:
    prompt = open(args.prompt_file, encoding="utf-8").read() if args.prompt_file else args.prompt
    if prompt is None:
        raise ConfigError("give --prompt TEXT or --prompt-file FILE")
    model, tokenizer = load_for_inference(args)
    template = args.template or trained_template(args.adapter, "raw")
    prompt = templated_prompt(prompt, template, tokenizer, args.context)
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
