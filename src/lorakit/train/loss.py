"""Causal-LM cross-entropy without fp32 logits for the whole batch.

    hidden = decoder(input_ids)                        [B, T, H]   (compute dtype)
    h, y   = hidden[:, :-1], labels[:, 1:]             position t predicts token t+1
    keep   = y != IGNORE_INDEX                         only supervised positions get logits
    loss_sum = sum over chunks of `chunk` rows of CE(lm_head(h_chunk).float(), y_chunk)

Each chunk runs under activation checkpointing, so backward keeps only the chunk's hidden rows and
recomputes its [chunk, V] logits: peak memory is O(chunk * V) instead of O(B * T * V) (a 151,936
token vocabulary at T=1024 would be 600 MB of fp32 logits per sequence). Returned as a *sum*; the
trainer divides by the supervised-token count of the whole optimizer step (the one place that
normalisation happens).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..data.tokenize import IGNORE_INDEX


def count_supervised(labels: torch.Tensor) -> int:
    """Number of loss terms in a batch: shifted labels that are not IGNORE_INDEX."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _head_logits(model: nn.Module, head: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """lm_head plus the model's own output transform (Gemma-2 soft-capping, Cohere logit scale)."""
    logits = head(h).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    scale = getattr(model.config, "logit_scale", None)
    if scale and isinstance(scale, (int, float)):
        logits = logits * scale
    return logits


def _chunk_ce_sum(model: nn.Module, head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_head_logits(model, head, h), y, reduction="sum")


def causal_lm_loss_sum(model: nn.Module, batch: dict, chunk_size: int = 1024) -> torch.Tensor:
    """Sum of next-token CE over the supervised positions of `batch` (input_ids, labels,
    attention_mask or position_ids). A 0-dim fp32 tensor."""
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    out = model.base_model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
    hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state      # [B, T, H]
    labels = batch["labels"]
    y = labels[:, 1:]                                                          # [B, T-1]
    keep = y != IGNORE_INDEX
    h = hidden[:, :-1][keep]                                                   # [N, H] supervised rows
    y = y[keep]                                                                # [N]
    head = model.get_output_embeddings()
    total = hidden.new_zeros((), dtype=torch.float32)
    need_ckpt = torch.is_grad_enabled() and h.requires_grad
    for start in range(0, h.shape[0], chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if need_ckpt:
            total = total + checkpoint(_chunk_ce_sum, model, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(model, head, hc, yc)
    return total
