"""Causal-LM cross-entropy from the decoder's hidden states, without fp32 logits for the whole batch.

    hidden = decoder(input_ids)                        [B, T, H]   (compute dtype; train/step.py)
    h, y   = hidden[:, :-1], labels[:, 1:]             position t predicts token t+1
    keep   = y != IGNORE_INDEX                         only supervised positions get logits
    loss_sum = sum over chunks of `chunk` rows of CE(lm_head(h_chunk).float(), y_chunk)

Each chunk runs under activation checkpointing, so backward keeps only the chunk's hidden rows and
recomputes its [chunk, V] logits: peak memory is O(chunk * V) instead of O(B * T * V) (a 151,936
token vocabulary at T=1024 would be 600 MB of fp32 logits per sequence). Returned as a *sum*; the
trainer divides by the supervised-token count of the whole optimizer step (the one place that
normalisation happens).

Fast path (the common case: a frozen bias-free Linear head, no logit soft-capping or scaling):
`LinearCrossEntropySum` computes the same sum in blocks of `HEAD_ROWS` rows by `HEAD_COLS`
vocabulary columns with an online softmax and, when training, the gradient w.r.t. the hidden rows
in the same pass. Per step that is 2 head matmuls instead of 3 (forward, recompute, backward), each
slice of the head weight read from memory once for both, and a few passes over fp32 logits that
stay in cache; peak memory O(rows * cols) of one block whatever the vocabulary or chunk size (block
sizes per device: `head_blocks`). The
general path stays for every other head, and for `fused=False` (model.fast_paths: false), where it
is the reference the fast path is tested against. `saved_bytes_per_row` and `transient_bytes` state
what each path holds, for the memory planner.
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


def _chunk_ce(model: nn.Module, head: nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(_head_logits(model, head, h), y, reduction="none")                    # [n]


# Block sizes of the fast path: rows of h and vocabulary columns of the head formed at once. Per
# block the path holds [rows, cols] logits in the compute dtype and in fp32 (6 bytes each: 12.6 MB
# for 256 x 8192) instead of whole [rows, V] rows. Measured on 2 CPU cores, bf16, Qwen2.5's
# [151936, 896] head, 255 rows, both head matmuls of a step: whole-vocabulary row blocks of 64 rows
# 0.51 s (the 272 MB weight is streamed from memory once per block and matmul), vocabulary blocks of
# 2048-32768 columns over all 255 rows 0.36-0.39 s (each [cols, H] slice of the weight is read
# from memory once and stays in cache for the second matmul).
HEAD_ROWS = 256
HEAD_COLS = 8192
# On a GPU every (row block, vocabulary slice) costs ~12 kernel launches, and a [256, H] x [H, 8192]
# matmul is too small to fill the device: with the CPU's blocks, Llama-3's 128,256-token vocabulary
# and 2,048 supervised rows take 8 x 16 blocks = ~1,500 launches per micro-batch. Blocks of
# 2048 x 16384 take 1 x 8 (~100 launches), each matmul ~275 GFLOP at H = 4096; the block's logits
# cost 2048 * 16384 * 6 B = 201 MB transient (bf16 + fp32), a small part of even a T4's 15 GB.
# Not yet measured on a GPU (bench/bench_gpu.py measures the step that contains it).
GPU_HEAD_ROWS = 2048
GPU_HEAD_COLS = 16384


def head_blocks(device) -> tuple[int, int]:
    """(rows, vocabulary columns) of the fast path's blocks for tensors on `device`: the CPU's
    cache-sized HEAD_ROWS x HEAD_COLS, or GPU_HEAD_ROWS x GPU_HEAD_COLS on any other device."""
    if torch.device(device).type == "cpu":
        return HEAD_ROWS, HEAD_COLS
    return GPU_HEAD_ROWS, GPU_HEAD_COLS
# Transient bytes per element of the [chunk, vocab] logits while one chunk of the general path runs
# backward (under checkpoint: recomputed fp32 logits, the log_softmax output, and the grads of
# both); measured with torch.profiler memory events, torch 2.13. Gemma-2 soft-capping adds tanh's
# saved output and its gradient, fp32.
GENERAL_BYTES_PER_LOGIT = 12
SOFTCAP_BYTES_PER_LOGIT = 8


class LinearCrossEntropySum(torch.autograd.Function):
    """CE(h_i @ W^T, y_i) for every row i, [N] fp32, for a frozen head weight W [V, H], without keeping
    logits (the SFT loss sums them; DPO / ORPO sum them per sequence: train/objectives.py).

    forward, per block of rows r, over vocabulary slices c (online softmax, as flash attention):
        z    = (h_r @ W_c^T).float()                                 [r, c]
        m'   = max(m, max_c z);  a = exp(m - m')                     running max, rescale factor [r]
        e    = exp(z - m')                                           [r, c] (in place)
        s    = a * s + sum_c e                                       running sum of exp [r]
        acc  = a * acc + (e.to(h.dtype) @ W_c).float()               [r, H], with_grad only
        m    = m'
      lse_i = log s_i + m_i;  loss_i = lse_i - z_i[y_i]
      with_grad: G_r = acc / s - W[y_r]  = (softmax(z) - onehot(y)) @ W                     [r, H]
    backward: dL/dh_i = (g_i * G_i).to(h.dtype); no gradient for the frozen W (nor for y).

    The gradient is formed in the forward pass while the logits exist (as Liger-Kernel's fused
    linear cross-entropy does), so backward needs no second head matmul; it is linear in the
    incoming g_i of each row, which is applied at the end. Each weight slice is used by both matmuls while
    it is in cache. Saved: G fp32 [N, H]; never [N, V].
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, with_grad: bool) -> torch.Tensor:
        vocab = weight.shape[0]
        if y.device.type != "cpu":  # checked on the device, no host sync per micro-batch
            torch._assert_async(((y >= 0) & (y < vocab)).all(), "a label is outside the model's vocabulary")
        elif y.numel() and (int(y.min()) < 0 or int(y.max()) >= vocab):
            bad = y[(y < 0) | (y >= vocab)][0]
            raise ValueError(f"label {int(bad)} is outside the model's vocabulary [0, {vocab}) "
                             "(labels must be token ids or -100 to ignore a position)")
        losses = torch.empty(y.shape, dtype=torch.float32, device=h.device)                  # [N]
        grad_h = torch.empty(h.shape, dtype=torch.float32, device=h.device) if with_grad else None  # [N, H]
        head_rows, head_cols = head_blocks(h.device)
        for start in range(0, h.shape[0], head_rows):
            rows = slice(start, start + head_rows)
            hr, yr = h[rows], y[rows]                                                # [r, H], [r]
            m = torch.full(yr.shape, float("-inf"), device=h.device)                 # running max [r]
            s = torch.zeros(yr.shape, device=h.device)                               # running sum [r]
            target = torch.zeros(yr.shape, device=h.device)                          # z_i[y_i] [r]
            acc = torch.zeros(hr.shape, device=h.device) if with_grad else None      # [r, H] fp32
            for v0 in range(0, vocab, head_cols):
                wc = weight[v0:v0 + head_cols]                                      # [c, H] view
                zc = hr @ wc.t()                                                     # [r, c] compute dtype
                z = zc.float()                                                       # [r, c] (zc itself if fp32)
                col = yr - v0
                inside = (col >= 0) & (col < wc.shape[0])
                picked = z.gather(1, col.clamp(0, wc.shape[0] - 1)[:, None]).squeeze(1)
                target = torch.where(inside, picked, target)
                m_new = torch.maximum(m, z.amax(dim=1))                              # [r]
                a = (m - m_new).exp_()                                               # [r], 0 on the first slice
                e = z.sub_(m_new[:, None]).exp_()                                    # [r, c] in place
                s = s.mul_(a).add_(e.sum(dim=1))
                if with_grad:
                    acc.mul_(a[:, None]).add_(zc.copy_(e) @ wc)  # e rounded into zc's buffer, @ [c, H]
                m = m_new
                del zc, z, e  # free this slice's [r, c] buffers before the next allocates its own
            losses[rows] = s.log() + m - target
            if with_grad:
                grad_h[rows] = acc.div_(s[:, None]).sub_(weight[yr].float())
        ctx.save_for_backward(grad_h)
        ctx.dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (grad_h,) = ctx.saved_tensors
        if grad_h is None:
            raise RuntimeError("LinearCrossEntropySum was called without with_grad; it cannot backpropagate")
        return (grad_h * grad[:, None]).to(ctx.dtype), None, None, None


def fast_head(model: nn.Module, head: nn.Module, dtype: torch.dtype) -> bool:
    """True when the fast path computes exactly what _chunk_ce would: a plain frozen Linear head
    without bias in the activations' dtype, and no logit soft-capping / scaling in the model config."""
    config = model.config
    return (type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad
            and head.weight.dtype == dtype and not getattr(config, "final_logit_softcapping", None)
            and not isinstance(getattr(config, "logit_scale", None), (int, float)))


def lm_loss_sum(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
                fused: bool = True) -> torch.Tensor:
    """Sum of next-token CE over the supervised positions: hidden [B, T, H] (the decoder's output),
    labels [B, T] (IGNORE_INDEX where not supervised). A 0-dim fp32 tensor."""
    losses, _ = token_losses(model, hidden, labels, chunk_size, fused)
    return losses.sum()


def token_losses(model: nn.Module, hidden: torch.Tensor, labels: torch.Tensor, chunk_size: int = 1024,
                 fused: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token CE of every supervised position, and the row it belongs to.

        y = labels[:, 1:], keep = y != IGNORE_INDEX       position t predicts token t+1
        losses [N] fp32 = CE(head(hidden[:, :-1][keep]), y[keep]),  rows [N] = batch row of each

    -losses summed per row is each sequence's log-probability of its supervised tokens (DPO, ORPO).
    The fused path when the head allows it (fast_head), else chunks of `chunk_size` rows under
    activation checkpointing: never [N, V] fp32 logits at once."""
    y = labels[:, 1:]                                                          # [B, T-1]
    keep = y != IGNORE_INDEX
    rows = keep.nonzero()[:, 0]                                                # [N] batch row of each kept position
    h = hidden[:, :-1][keep]                                                   # [N, H] supervised rows
    y = y[keep]                                                                # [N]
    head = model.get_output_embeddings()
    if fused and fast_head(model, head, h.dtype):
        return LinearCrossEntropySum.apply(h, head.weight, y, torch.is_grad_enabled() and h.requires_grad), rows
    need_ckpt = torch.is_grad_enabled() and h.requires_grad
    parts = []
    for start in range(0, h.shape[0], chunk_size):
        hc, yc = h[start:start + chunk_size], y[start:start + chunk_size]
        if need_ckpt:
            parts.append(checkpoint(_chunk_ce, model, head, hc, yc, use_reentrant=False))
        else:
            parts.append(_chunk_ce(model, head, hc, yc))
    return (torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)), rows


# ---- what each path holds (read by memory/activations.py) ----------------------------------------
def saved_bytes_per_row(hidden: int, compute_bytes: int, fused: bool) -> int:
    """Bytes the loss keeps for backward per supervised row.

    general: the hidden row (compute dtype) kept by checkpoint + the int64 index of the boolean row
    selection + the bool mask. fused: the fp32 gradient of the row it formed in forward + the mask."""
    return 4 * hidden + 1 if fused else hidden * compute_bytes + 8 + 1


def transient_bytes(rows: int, hidden: int, vocab: int, compute_bytes: int, fused: bool, chunk_size: int,
                    softcap: bool = False, device: str = "cpu") -> int:
    """Peak bytes the loss allocates beyond what it keeps, for `rows` supervised rows.

    fused: one block's [rows, cols] logits (head_blocks(device)) in the compute dtype, then fp32 (in place from
    there on; the rounded exponentials go back into the compute-dtype buffer): 4 + bc bytes per logit
    (4 when bc is fp32), freed before the next slice; the block's running gradient [HEAD_ROWS, H] in
    fp32 and one slice's product in bc; plus the [N, H] gradient of the hidden rows (fp32, then bc).
    general: GENERAL_BYTES_PER_LOGIT (+ SOFTCAP_BYTES_PER_LOGIT) per logit of a chunk_size chunk."""
    if fused:
        per = 4 + (compute_bytes if compute_bytes != 4 else 0)
        head_rows, head_cols = head_blocks(device)
        r = min(head_rows, rows)
        cols = min(head_cols, vocab)
        return r * cols * per + r * hidden * (4 + compute_bytes) + rows * hidden * (4 + compute_bytes)
    per = GENERAL_BYTES_PER_LOGIT + (SOFTCAP_BYTES_PER_LOGIT if softcap else 0)
    return min(chunk_size, rows) * vocab * per
