"""What generating a batch of answers costs beyond the model's weights, and the batch that fits.

Greedy / sampled decoding with transformers' `generate` (no gradients), per batch of B prompts of
P tokens (left-padded to the longest) and N new tokens, bc bytes per compute-dtype element:

    kv cache    layers x 2 (k and v) x kv_heads x head_dim x B x (P + N) x bc      grows to the end
    prefill     B x P x (3 x intermediate + (heads + 2 x kv_heads) x head_dim + 2 x hidden) x bc
                the largest transient of one decoder layer's forward (gate, up and act(gate) * up of
                the MLP; q, k, v; the residual stream and a norm output); layers run one at a time
    logits      B x vocab x (bc + 4): the head's output for the last position and generate's fp32 copy
    dequant     the widest 4-bit layer's weight in bc (Linear4bit's reused buffer; 0 for 16-bit)

The head sees only the last position (transformers' logits_to_keep=1, and lorakit's generate keeps
that input contiguous, recipes/generate.py), so no [B, P, vocab] logits ever exist. Checked against
torch.profiler's live bytes during generate (tests/memory/test_generation_memory.py).
"""

from __future__ import annotations

from .shapes import ModelShape, resolve_shape

DEFAULT_MAX_BATCH = 16


def generation_bytes(shape: ModelShape, batch: int, prompt_len: int, new_tokens: int, compute_bytes: int = 2,
                     quantized: bool = True) -> dict:
    """Bytes of each part of a generation batch's workspace (module docstring) and their "total"."""
    bc, d = compute_bytes, shape.head_dim
    kv = shape.layers * 2 * shape.kv_heads * d * batch * (prompt_len + new_tokens) * bc
    prefill = batch * prompt_len * (3 * shape.intermediate + (shape.heads + 2 * shape.kv_heads) * d
                                    + 2 * shape.hidden) * bc
    logits = batch * shape.vocab * (bc + 4)
    widest = max(in_f * out_f for _, in_f, out_f, _ in shape.linear_layers())
    dequant = widest * bc if quantized else 0
    parts = {"kv_cache": kv, "prefill": prefill, "logits": logits, "dequant": dequant}
    return {**parts, "total": sum(parts.values())}


def generation_batch_size(model, prompt_len: int, new_tokens: int, budget_bytes: int, compute_bytes: int = 2,
                          quantized: bool = True, max_batch: int = DEFAULT_MAX_BATCH) -> int:
    """The largest batch (1 .. max_batch) whose generation workspace fits `budget_bytes` (at least 1)."""
    shape = resolve_shape(model)
    for batch in range(max_batch, 0, -1):
        if generation_bytes(shape, batch, prompt_len, new_tokens, compute_bytes, quantized)["total"] <= budget_bytes:
            return batch
    return 1
