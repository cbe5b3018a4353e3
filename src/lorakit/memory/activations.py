"""What a training step holds besides the weights: saved activations, loss buffers, workspace.

Saved activations are the tensors autograd keeps for backward, enumerated per decoder layer of a
Llama-style model as transformers 5 builds it (RMSNorm -> q/k/v -> RoPE -> attention -> o ->
residual -> RMSNorm -> gate/up -> act * up -> down -> residual). Per token (N = batch * seq_len
tokens), with compute dtype of bc bytes and LoRA A/B of ab bytes:

    each RMSNorm          4*H + 4     its input in fp32 (a copy unless already fp32) + rsqrt
                                      (the very first norm saves nothing under LoRA: the
                                      embedding output does not require grad)
    each group of Linear  LoRA, with the branch in eb bytes (bc by default, lora.branch_dtype;
    layers reading one    ab with "adapter"): the input each adapted layer's lora_A saves -- one
    input (q/k/v, o,      shared tensor when eb == bc, else an eb-dtype copy per adapted layer --
    gate/up, down)        plus r*eb per adapted layer for lora_A's output (saved by lora_B / the
                          addmm). A frozen Linear or Linear4bit saves only its weight (no new memory).
                          full: the input once, in bc.
    attention, sdpa       (q + k + v + out) in bc + heads*4 (fp32 logsumexp): flash/efficient
                          kernels, and transformers passes enable_gqa so k/v keep kv_heads
    attention, eager      q, k, v repeated to `heads` in bc + heads*T*4 (fp32 softmax) + heads*T*bc
                          (its cast back to bc, unless fp32) [+ heads*T*bc with Gemma-2 soft-capping]
    MLP                   3*I*bc (gate, act(gate), up)

    DoRA (lora.use_dora)  per adapted layer d = W x' + s B A x' [out] in eb, kept for the magnitude's
                          gradient, + out*(4 + eb) bytes per layer (the detached norm, fp32, and m/n - 1)
    embedding LoRA        the token ids (int64), A^T[ids] [r] in eb (+ with DoRA the update's input,
                          [hidden] in eb), + B^T in eb when eb != ab; and the first layer's inputs
                          now need gradients (its first norm and A copies are saved as in later layers)

plus, once: RoPE cos/sin [T, head_dim] x 2, the final norm, and the loss's supervised hidden rows
(`train/loss.py`). With gradient checkpointing a layer keeps only its input (H*bc per token) and
one layer at a time is recomputed in full during backward; with QLoRA each layer also keeps the
outputs of its adapted 4-bit layers that are no wider than their input, which the recomputation
replays (model/replay.py). These counts were checked tensor by
tensor with torch.autograd.graph.saved_tensors_hooks (tests/memory/test_memory_activations.py).
"""

from __future__ import annotations

from .shapes import ModelShape

# quant/dynamic.py _LUT_SIZE (65536 grid points, bitsandbytes' kLUTSize) int64 indices.
LOOKUP_TABLE_BYTES = 65536 * 8


def fused_loss(shape: ModelShape, s) -> bool:
    """True when train/loss.py's fused head + cross-entropy runs (a frozen plain head, no logit
    soft-capping, fast paths on); else its general chunked path."""
    return s.fused_loss and not shape.logit_softcap and s.method != "full"


def loss_saved_per_row(shape: ModelShape, s) -> int:
    """Bytes the loss keeps for backward per supervised row (train/loss.py saved_bytes_per_row)."""
    from ..train.loss import saved_bytes_per_row

    return saved_bytes_per_row(shape.hidden, s.compute_bytes, fused_loss(shape, s))


def dequant_bytes_per_weight(s) -> int:
    """Transient bytes per weight while a 4-bit weight is rebuilt on `s.device`, asked of the kernel
    registry: a registered fast kernel that can run here (C on the CPU, Triton on CUDA) writes the
    compute-dtype weight directly; else the PyTorch reference's peak (quant/nf4.py)."""
    from ..quant import kernels
    from ..quant.nf4 import reference_dequant_bytes_per_weight

    if kernels.fast_kernel("dequantize_4bit", s.device) is not None:
        return s.compute_bytes
    return reference_dequant_bytes_per_weight(s.device, s.compute_bytes)


def lean(shape: ModelShape, s, part: str) -> bool:
    """True when training swaps in the lean module for this family's gated MLP (part "mlp") or
    RMSNorm ("norm") (model/lean.py, model.lean_activations)."""
    from ..model.lean import lean_applies

    return s.lean_activations and lean_applies(shape.model_type)[part]



def norm_saved_per_token(shape: ModelShape, s) -> int:
    """Bytes one RMSNorm keeps per token: its fp32 input copy + rsqrt, or (lean) its input as it is."""
    return (s.compute_bytes if lean(shape, s, "norm") else 4) * shape.hidden + 4


def _groups(shape: ModelShape) -> list[tuple[int, list[int]]]:
    """(input width, indices into shape.linear_layers()) for Linear layers that read the same input."""
    names = [n for n, *_ in shape.linear_layers()]
    h, q = shape.hidden, shape.heads * shape.head_dim
    attn_in = [i for i, n in enumerate(names) if n.startswith("self_attn.") and not n.endswith("o_proj")]
    mlp_in = [i for i, n in enumerate(names) if n.startswith("mlp.") and not n.endswith("down_proj")]
    return [(h, attn_in), (q, [names.index("self_attn.o_proj")]), (h, mlp_in),
            (shape.intermediate, [names.index("mlp.down_proj")])]


def _linear_inputs(shape: ModelShape, s, row: list[bool]) -> int:
    """Per-token bytes saved for the Linear layers' backward in one decoder layer."""
    bc, ab = s.compute_bytes, s.branch_bytes
    # CUDA's fused dropout keeps a bool mask; the CPU kernel keeps its mask in the input dtype
    mask = 1 if s.device == "cuda" else bc
    total = 0
    for g, (width, idx) in enumerate(_groups(shape)):
        t = sum(row[i] for i in idx)
        # sdpa returns its output as [B, T, heads, d] in memory, so o_proj's input (the output
        # transposed back) is a view of a tensor attention already saved; the lean MLP rebuilds
        # down_proj's input from gate and up in backward instead of keeping it (model/lean.py)
        shared = (g == 1 and shape.attn_impl == "sdpa") or (g == 3 and lean(shape, s, "mlp"))
        if s.method == "full":
            total += 0 if shared else width * bc
        elif t:
            if s.lora_dropout > 0:  # each adapted layer: its dropout mask + its own dropped input
                total += t * width * (mask + ab)
            elif ab == bc:  # `.to(branch dtype)` is a no-op: every lora_A saves the same tensor
                total += 0 if shared else width * bc
            else:
                total += t * width * ab
            total += t * s.rank * ab  # lora_A output, saved by lora_B
    return total + _dora_per_token(shape, s, row)


def _dora_per_token(shape: ModelShape, s, row: list[bool]) -> int:
    """DoRA: each adapted layer keeps d = W x' + s B A x' [out] in the branch dtype (lora/layer.py)."""
    if not getattr(s, "use_dora", False) or s.method == "full":
        return 0
    return sum(out_f * s.branch_bytes for (_, _, out_f, _), on in zip(shape.linear_layers(), row) if on)


def _dora_per_layer(shape: ModelShape, s, row: list[bool]) -> int:
    """DoRA's per-layer (not per-token) saved tensors: the norm n [out] fp32 and m / n [out] in eb."""
    if not getattr(s, "use_dora", False) or s.method == "full":
        return 0
    return sum(out_f * (4 + s.branch_bytes) for (_, _, out_f, _), on in zip(shape.linear_layers(), row) if on)


def embedding_bytes(shape: ModelShape, s) -> int:
    """What an adapted input embedding (lora/embedding.py) keeps for backward."""
    from .estimate import embedding_adapted

    if s.method == "full" or not embedding_adapted(shape, s.targets):
        return 0
    n, eb = s.batch_size * s.seq_len, s.branch_bytes
    per_token = 8 + s.rank * eb + (shape.hidden * eb if s.use_dora else 0)
    const = shape.hidden * s.rank * eb if eb != s.adapter_bytes else 0
    const += shape.hidden * (4 + eb) if s.use_dora else 0
    return n * per_token + const


def _attention(shape: ModelShape, s) -> int:
    """Per-token bytes saved by RoPE + attention in one layer."""
    bc, d, t = s.compute_bytes, shape.head_dim, s.seq_len
    q, kv = shape.heads * d, shape.kv_heads * d
    v = (q + 2 * kv) if shape.fused_qkv else kv  # a fused qkv output stays alive as v's base
    if shape.attn_impl == "eager":
        per = 3 * q * bc if shape.kv_heads < shape.heads else (q + kv) * bc + v * bc
        per += shape.heads * t * (4 + (bc if bc != 4 else 0))
        per += shape.heads * t * bc if shape.attn_softcap else 0
        return per
    return (q + kv + q) * bc + v * bc + shape.heads * 4


def layer_bytes(shape: ModelShape, s, row: list[bool], first: bool) -> int:
    """Bytes one decoder layer saves for backward (no checkpointing)."""
    from .estimate import embedding_adapted

    n = s.batch_size * s.seq_len
    first = first and not embedding_adapted(shape, s.targets)  # an adapted embedding's output needs grad
    norms = shape.norms_per_layer - (1 if first and s.method != "full" else 0)
    per_token = norms * norm_saved_per_token(shape, s) + _linear_inputs(shape, s, row) + _attention(shape, s)
    # gated MLP: gate output, act(gate) and up output; the lean MLP keeps gate and up only
    per_token += (2 if lean(shape, s, "mlp") else 3) * shape.intermediate * s.compute_bytes
    return n * per_token + _branch_weight_copies(shape, s, row, first) + _dora_per_layer(shape, s, row)


def _replayed_per_token(shape: ModelShape, s, row: list[bool]) -> int:
    """Bytes per token of the frozen outputs a checkpointed layer keeps for replay
    (model/replay.py): adapted frozen base layers (4-bit or 16-bit) with out_features <= in_features."""
    if s.method == "full" or not s.ckpt_replay:
        return 0
    return sum(out_f * s.compute_bytes for (_, in_f, out_f, _), on in zip(shape.linear_layers(), row)
               if on and out_f <= in_f)


def _branch_weight_copies(shape: ModelShape, s, row: list[bool], first: bool) -> int:
    """Compute-dtype copies of A and B that a branch running in another dtype than its weights
    saves for backward (fp32 adapters, bf16 branch): r * (in + out) * bc per adapted layer, less
    A where the input needs no gradient (q/k/v of the first layer read the frozen embeddings)."""
    if s.method == "full" or s.branch_bytes == s.adapter_bytes:
        return 0
    total = 0
    for (name, in_f, out_f, _), on in zip(shape.linear_layers(), row):
        if on:
            reads_embeddings = first and name.startswith("self_attn.") and not name.endswith("o_proj")
            total += s.rank * ((0 if reads_embeddings else in_f) + out_f) * s.branch_bytes
    return total


def activation_bytes(shape: ModelShape, s, adapted: list[list[bool]]) -> dict:
    """Saved-for-backward bytes at the end of the forward pass (see the module docstring)."""
    bc = s.compute_bytes
    n = s.batch_size * s.seq_len
    n_sup = s.batch_size * (s.seq_len - 1)  # every position supervised
    layers = [layer_bytes(shape, s, row, i == 0) for i, row in enumerate(adapted)]
    rope = 2 * s.seq_len * shape.head_dim * bc
    final = n * norm_saved_per_token(shape, s) + n_sup * loss_saved_per_row(shape, s)  # final norm, loss rows
    final += embedding_bytes(shape, s)
    if s.grad_ckpt:  # each layer keeps its input (+ replayed frozen outputs); backward recomputes one layer at a time
        kept = sum(n * (shape.hidden * bc + _replayed_per_token(shape, s, row)) for row in adapted)
        recompute = max(layers)
    else:
        kept, recompute = sum(layers), 0
    return {"total": kept + rope + final, "recompute": recompute, "per_layer": max(layers), "final": final + rope}


def loss_buffer_bytes(shape: ModelShape, s) -> int:
    """Peak transient bytes of the cross-entropy for a micro-batch (train/loss.py transient_bytes)."""
    from ..train.loss import transient_bytes

    n_sup = s.batch_size * (s.seq_len - 1)
    return transient_bytes(n_sup, shape.hidden, shape.vocab, s.compute_bytes, fused_loss(shape, s),
                           s.loss_chunk_size, bool(shape.logit_softcap), s.device)


def workspace_bytes(shape: ModelShape, s, adapted, act: dict, loss: int) -> dict:
    """Lookup tables of the 8-bit quantizers, plus the transient bytes while the decoder layers run
    backward beyond the loss buffers (which are
    freed by then): the recomputed layer under checkpointing, the widest dequantized 4-bit weight,
    and the layer's gradient buffers. Returned as the excess over `loss`, so that
    activations + logits_loss + workspace is the larger of the two peaks."""
    n = s.batch_size * s.seq_len
    widest = max(in_f * out_f for _, in_f, out_f, _ in shape.linear_layers())
    dequant = dequant_bytes_per_weight(s) * widest if s.method == "qlora" else 0
    # the MLP's backward holds grads of two [N, intermediate] tensors in the compute dtype at once;
    # the lean MLP's backward (model/lean.py) also rebuilds act(gate) and forms dp * up beside them
    backward = (4 if lean(shape, s, "mlp") else 2) * n * shape.intermediate * s.compute_bytes
    # a 4-bit weight is rebuilt in forward and again in backward; at either moment the layer's
    # gradient buffers are not yet (or no longer) live, so the two transients do not add up
    layer_peak = act["recompute"] + max(dequant, backward) + dora_norm_bytes(shape, s, adapted)
    tables = lookup_table_bytes(s)
    return {"total": tables + max(0, layer_peak - loss), "layer_peak": layer_peak, "dequant": dequant,
            "backward": backward, "lookup_tables": tables, "dora_norm": dora_norm_bytes(shape, s, adapted)}


def dora_norm_bytes(shape: ModelShape, s, adapted) -> int:
    """Transient bytes of DoRA's low-rank weight norm (lora/dora.py) for the widest adapted layer:
    W A^T [r, out] from the base's forward on A (in bc) and its fp32 copy, A A^T, B (A A^T) [out, r]
    and three [out] fp32 vectors. No [out, in] matrix: a 4-bit base's dequantized weight is the
    same transient as in its forward (counted in `dequant`)."""
    if not getattr(s, "use_dora", False) or s.method == "full":
        return 0
    r = s.rank
    outs = [out_f for row in adapted for (_, _, out_f, _), on in zip(shape.linear_layers(), row) if on] or [0]
    return max(r * o * (s.compute_bytes + 4 + 4) + r * r * 4 + 3 * o * 4 for o in outs)


def lookup_table_bytes(s) -> int:
    """quant/dynamic.py caches an int64 [65536] table per 8-bit code map it quantizes with: the
    signed map (double quantization, 8-bit first moments) and the unsigned map (8-bit second
    moments). They stay allocated for the process's life."""
    signed = (s.method == "qlora" and s.double_quant) or s.optimizer.endswith("_8bit")
    unsigned = s.optimizer.endswith("_8bit")
    return (int(signed) + int(unsigned)) * LOOKUP_TABLE_BYTES
