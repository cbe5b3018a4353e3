"""One step's forward and loss, as one nn.Module: what DDP / FSDP2 wrap, what everything calls.

    TrainStep(model)(batch) -> (loss_sum, n_tokens)
        hidden   = model.base_model(input_ids, attention_mask | position_ids)     [B, T, H]
        loss_sum = sum over supervised positions t of CE(head(hidden[:, t]), labels[:, t+1])
                   (train/loss.py: fused head + cross-entropy, or the chunked reference)
        n_tokens = number of those positions (a 0-dim tensor on the batch's device; no host sync)

The loss is a *sum*: the loop divides by the supervised tokens of the whole optimizer step (the one
place that normalisation happens), so accumulated micro-batches give one big batch's gradient.

Why one module: under DistributedDataParallel the gradient all-reduce is armed by the wrapper's
forward, and under FSDP2 the root's parameters (embeddings, final norm, head) are gathered by its
pre-forward hook. A loss that called `model.base_model` and read `head.weight` from outside the
model would skip both, silently. So training, evaluation, the memory harness and the benchmarks all
call this module, and distributed training wraps it, not the model.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.tokenize import IGNORE_INDEX
from .loss import lm_loss_sum


class TrainStep(nn.Module):
    """forward(batch) -> (loss_sum fp32 [], n_tokens int64 []) for a causal LM (module docstring).

    batch: input_ids [B, T], labels [B, T] (IGNORE_INDEX where not supervised), and attention_mask
    [B, T] (padded batches) or position_ids [B, T] (packed rows). fused_loss=False runs the chunked
    reference loss (model.fast_paths: false); loss_chunk_size is its rows per chunk."""

    def __init__(self, model: nn.Module, loss_chunk_size: int = 1024, fused_loss: bool = True):
        super().__init__()
        self.model = model
        self.loss_chunk_size, self.fused_loss = loss_chunk_size, fused_loss

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        out = self.model.base_model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
        hidden = out[0] if isinstance(out, tuple) else out.last_hidden_state       # [B, T, H]
        labels = batch["labels"]                                                     # [B, T]
        loss = lm_loss_sum(self.model, hidden, labels, self.loss_chunk_size, self.fused_loss)
        return loss, (labels[:, 1:] != IGNORE_INDEX).sum()
