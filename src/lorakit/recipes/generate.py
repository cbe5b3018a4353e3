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
from ..dtypes import short_name
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


def _contiguous_input(module, args):
    """Forward pre-hook for the output head during generation. transformers hands the head only the
    last position, hidden[:, -1:, :] ([B, 1, H] with a batch stride of T*H); torch's CPU matmul does
    not fold such a strided 3-D input into one [B, H] @ [H, V] product but broadcasts the head weight
    to [B, H, V] and copies it (Qwen2.5-0.5B's 152k-row head at B=16: 4.3 GB and ~20 s per token,
    measured). A contiguous copy of the B rows costs nothing."""
    return (args[0].contiguous(),) + tuple(args[1:])


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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, temperature: float = 0.0,
             batch_size: Optional[int] = None, stop: Optional[list[str]] = None, max_batch: int = 16) -> list[str]:
    """Continue each prompt (greedy when temperature == 0), left-padded batches; the new text only.
    Prompts are batched in order of length (less padding), the answers returned in the given order;
    `batch_size` None picks each batch from the memory it needs (at most `max_batch` prompts)."""
    was_training = model.training
    model.eval()
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    pad = pad_token_id(tokenizer)
    device = model_device(model)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    answers: dict[int, str] = {}
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        for ids in (_batches(lengths, order, model, max_new_tokens, batch_size, max_batch) if prompts else []):
            chunk = [prompts[i] for i in ids]
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
            answers.update({i: _cut(t, stop) for i, t in zip(ids, texts)})
    finally:
        if hook is not None:
            hook.remove()
        tokenizer.padding_side = side
        model.train(was_training)
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


def load_for_inference(args: argparse.Namespace):
    """(model in eval mode, tokenizer) from add_model_arguments' flags."""
    from ..lora.io import load_adapter
    from ..model.load import load_model

    model, tokenizer = load_model(args.model, quantization=args.quantization, compute_dtype=args.precision)
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
