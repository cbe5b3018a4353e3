"""Generation and exact-match scoring: the prompt a row gives, batched greedy decoding, chat turns."""

from __future__ import annotations

from typing import Optional

import torch

from ..data.formats import CHATML, render


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
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    outputs: list[str] = []
    try:
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True).to(device)
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
