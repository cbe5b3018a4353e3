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

Fast path (the common case: a frozen bias-free Linear head, no logit soft-capping or scaling):
`_LinearCrossEntropySum` computes the same sum in row blocks of `_HEAD_ROWS` and, when training,
the gradient w.r.t. the hidden rows in the same pass (softmax - onehot formed in place on the
block's logits). Per step that is 2 head matmuls instead of 3 (forward, recompute, backward) and
~4 passes over [rows, V] fp32 instead of ~10 (log_softmax twice, its backward, dtype copies), with
peak memory O(_HEAD_ROWS * V) whatever the chunk size. The general path stays for every other head.
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


# Rows of logits formed at once by the fast path. Per block the path holds the logits in the compute
# dtype and in fp32 (6 bytes x rows x V: 58 MB for 64 rows of Qwen2.5's 151,936-token vocabulary;
# the gradient reuses the compute-dtype buffer). Measured on 2 CPU cores, bf16, [rows, 896] x
# [896, 151936]: 64 rows 324 / 285 GFLOP/s (logits / gradient matmul), 128 rows 334 / 347,
# 32 rows 220 / 196: 64 keeps the head near full speed at half the transient memory of 128, which
# set the step's peak RSS (bench/SPEED.md).
_HEAD_ROWS = 64


class _LinearCrossEntropySum(torch.autograd.Function):
    """sum_i CE(h_i @ W^T, y_i) for a frozen head weight W [V, H], without keeping logits.

    forward, per block of rows c:
        z   = (h_c @ W^T).float()                                   [c, V]
        lse = log(sum_v exp(z - max z)) + max z                     [c]
        loss += sum_i (lse_i - z_i[y_i])                            0-dim fp32
        with_grad: G_c = ((softmax(z) - onehot(y)).to(h.dtype) @ W).float()   [c, H]
                   (the rounded probabilities overwrite the block's compute-dtype logits)
    backward: dL/dh = (g * G).to(h.dtype); no gradient for the frozen W (nor for y).

    The gradient is formed in the forward pass while the block's logits exist (as Liger-Kernel's
    fused linear cross-entropy does), so backward needs no second head matmul; it is linear in the
    incoming scalar g, which is applied at the end. Saved: G fp32 [N, H]; never [N, V].
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, with_grad: bool) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if with_grad else None  # [N, H]
        for start in range(0, h.shape[0], _HEAD_ROWS):
            rows = slice(start, start + _HEAD_ROWS)
            zc = h[rows] @ weight.t()                                           # [c, V] compute dtype
            z = zc.float()                                                      # [c, V] (zc itself if fp32)
            target = z.gather(1, y[rows, None]).squeeze(1)                      # [c]
            zmax = z.amax(dim=1, keepdim=True)                                  # [c, 1]
            expz = z.sub_(zmax).exp_()                                          # [c, V], in place
            denom = expz.sum(dim=1)                                             # [c]
            total += (denom.log() + zmax.squeeze(1) - target).sum()
            if with_grad:
                p = expz.div_(denom[:, None])                                   # softmax, in place
                p[torch.arange(p.shape[0], device=p.device), y[rows]] -= 1.0    # - onehot(y)
                grad_h[rows] = zc.copy_(p) @ weight  # [c, V] rounded into zc's buffer, @ [V, H] -> [c, H]
                del p
            del zc, z, expz  # free this block's [c, V] buffers before the next block allocates its own
        ctx.save_for_backward(grad_h)
        ctx.dtype = h.dtype
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("_LinearCrossEntropySum was called without with_grad; it cannot backpropagate")
        return (grad_h * grad).to(ctx.dtype), None, None, None


def _fast_head(model: nn.Module, head: nn.Module, h: torch.Tensor) -> bool:
    """True when the fast path computes exactly what _chunk_ce_sum would: a plain frozen Linear head
    without bias in h's dtype, and no logit soft-capping / scaling in the model config."""
    config = model.config
    return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
            and head.weight.dtype == h.dtype and not getattr(config, "final_logit_softcapping", None)
            and not isinstance(getattr(config, "logit_scale", None), (int, float)))


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
    if _fast_head(model, head, h):
        return _LinearCrossEntropySum.apply(h, head.weight, y, torch.is_grad_enabled() and h.requires_grad)
    total = hidden.new_zeros((), dtype=torch.float32)
    need_ckpt = torch.is_grad_enabled() and h.requires_grad
    for start in range(0, h.shape[0], chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if need_ckpt:
            total = total + checkpoint(_chunk_ce_sum, model, head, hc, yc, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(model, head, hc, yc)
    return total
