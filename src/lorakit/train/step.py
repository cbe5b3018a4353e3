"""One step's forward and loss, as one nn.Module: what DDP / FSDP2 wrap, what everything calls.

    TrainStep(model, objective=SFT())(batch) -> (loss_sum, units)
        hidden   = model.base_model(input_ids, attention_mask | position_ids)     [B, T, H]
        sft:  loss_sum = sum over supervised positions t of CE(head(hidden[:, t]), labels[:, t+1])
              (train/loss.py: fused head + cross-entropy, or the chunked reference); units = their number
        dpo / orpo: loss_sum = the pair losses summed, units = the pairs (train/objectives.py)
        units is a 0-dim tensor on the batch's device (no host sync)

The loss is a *sum*: the loop divides by the units of the whole optimizer step (the one place that
normalisation happens), so accumulated micro-batches give one big batch's gradient. The objective's
metrics (DPO's rewards/*, logps/*) are summed over the calls until `take_stats()` hands them over.

Why one module: under DistributedDataParallel the gradient all-reduce is armed by the wrapper's
forward, and under FSDP2 the root's parameters (embeddings, final norm, head) are gathered by its
pre-forward hook. A loss that called `model.base_model` and read `head.weight` from outside the
model would skip both, silently. So training, evaluation, the memory harness and the benchmarks all
call this module, and distributed training wraps it, not the model. DPO's reference pass (the same
model with its adapters off) runs inside the same forward for the same reason.
"""

from __future__ import annotations

import torch
from torch import nn

from .objectives import SFT


class TrainStep(nn.Module):
    """forward(batch) -> (loss_sum fp32 [], units int64/fp32 []) (module docstring).

    batch: input_ids [B, T], labels [B, T] (IGNORE_INDEX where not supervised), and attention_mask
    [B, T] (padded batches) or position_ids [B, T] (packed rows); preference batches also `pairs`
    (data/collate.py collate_pairs). fused_loss=False runs the chunked reference loss
    (model.fast_paths: false); loss_chunk_size is its rows per chunk."""

    def __init__(self, model: nn.Module, loss_chunk_size: int = 1024, fused_loss: bool = True, objective=None):
        super().__init__()
        self.model = model
        self.loss_chunk_size, self.fused_loss = loss_chunk_size, fused_loss
        self.objective = objective or SFT()
        self._stats: dict[str, torch.Tensor] = {}

    def hidden_states(self, batch: dict) -> torch.Tensor:
        """The decoder's last hidden states [B, T, H] (no head: the loss applies it to the rows it needs)."""
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        out = self.model.base_model(input_ids=batch["input_ids"], use_cache=False, **kwargs)
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        loss, units, stats = self.objective(self, batch)
        for k, v in stats.items():
            self._stats[k] = v if k not in self._stats else self._stats[k] + v
        return loss, units

    def take_stats(self) -> dict[str, torch.Tensor]:
        """The objective's metric sums since the last call (empty for SFT), and reset them."""
        stats, self._stats = self._stats, {}
        return stats
