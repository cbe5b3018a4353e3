"""Decode one batch of prompts: the core every generation path shares (eval --exact-match, generate,
chat, the demo, the samples a run writes while it trains). recipes/generate.py adds text, batching
by length and by memory; this module works on token ids.

    prompts  left-padded to the longest: input_ids [B, P] (pad_id), attention_mask [B, P] (0 on pads)
    model.generate(...)  greedy when temperature == 0, else sampling at that temperature
    result   the new ids of each row, [B, <= max_new_tokens] (up to and including EOS)
"""

from __future__ import annotations

import torch
from torch import nn

from .modules import model_device


def _contiguous_input(module, args):
    """Forward pre-hook for the output head during generation. transformers hands the head only the
    last position, hidden[:, -1:, :] ([B, 1, H] with a batch stride of T*H); torch's CPU matmul does
    not fold such a strided 3-D input into one [B, H] @ [H, V] product but broadcasts the head weight
    to [B, H, V] and copies it (Qwen2.5-0.5B's 152k-row head at B=16: 4.3 GB and ~20 s per token,
    measured). A contiguous copy of the B rows costs nothing."""
    return (args[0].contiguous(),) + tuple(args[1:])


@torch.no_grad()
def generate_ids(model: nn.Module, prompts: list[list[int]], pad_id: int, eos_id: int, max_new_tokens: int,
                 temperature: float = 0.0) -> list[list[int]]:
    """The new token ids for each prompt (module docstring); the model's train/eval mode is kept."""
    if not prompts:
        return []
    longest = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), longest), pad_id, dtype=torch.long)      # [B, P]
    attention_mask = torch.zeros_like(input_ids)                                     # [B, P]
    for b, p in enumerate(prompts):
        input_ids[b, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        attention_mask[b, longest - len(p):] = 1
    device = model_device(model)
    kwargs = dict(do_sample=temperature > 0, max_new_tokens=max_new_tokens, pad_token_id=pad_id, eos_token_id=eos_id)
    if temperature > 0:
        kwargs["temperature"] = temperature
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    was_training = model.training
    model.eval()
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(_contiguous_input) if head is not None else None
    try:
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), **kwargs)
    finally:
        if hook is not None:
            hook.remove()
        model.train(was_training)
    new = out[:, longest:].tolist()                                                  # [B, new tokens]
    return [_until_eos(row, eos_id, pad_id) for row in new]


def _until_eos(row: list[int], eos_id: int, pad_id: int) -> list[int]:
    """A row of generate's output up to its first EOS (finished rows are padded with pad_id after it)."""
    if eos_id in row:
        return row[: row.index(eos_id) + 1]
    return row
