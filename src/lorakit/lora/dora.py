"""DoRA's weight norm (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; PEFT use_dora).

DoRA writes the adapted weight as a magnitude times a direction, per output row i:

    W'_i = m_i * (W_i + s * B_i A) / ||W_i + s * B_i A||          W [out, in], B [out, r], A [r, in]

m [out] is trained; the norm n = ||W + s B A||_row is recomputed from the current A, B in every
forward but treated as a constant in backward (paper section 4.3, PEFT: `weight_norm.detach()`).
With B = 0 at the start, m starts at ||W||_row and W' = W.

Two ways to get n, the same number:

    reference    row_norm_reference: form W + s B A [out, in] in fp32 and take its row norms
                 (what PEFT does; merge uses it, since merging forms that matrix anyway)
    low-rank     row_norm_lowrank: never forms an [out, in] matrix,
                     ||W_i + s B_i A||^2 = ||W_i||^2 + 2 s B_i . (W_i A^T) + s^2 B_i (A A^T) B_i^T
                 with ||W_i||^2 cached once (the base is frozen) and W A^T [out, r] from the base
                 layer's own forward on the r rows of A (minus its bias): for a 4-bit base that is
                 one more dequantize + an [r, in] x [in, out] matmul per step, no dense copy kept.
                 LoRALinear and LoRAEmbedding use it; tests/lora/test_dora.py checks it against the
                 reference.
"""

from __future__ import annotations

import torch


def row_norm_reference(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """||W + s B A|| per row, in fp32: weight [out, in], lora_A [r, in], lora_B [out, r] -> [out]."""
    w = weight.float() + scaling * (lora_B.float() @ lora_A.float())  # [out, r] @ [r, in] -> [out, in]
    return torch.linalg.vector_norm(w, dim=1)                          # [out]


def row_norm_lowrank(weight_sq: torch.Tensor, w_at: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """||W + s B A|| per row from low-rank pieces (module docstring), fp32 [out].

    weight_sq [out]: ||W_i||^2 (fp32); w_at [out, r]: W @ A^T (any float dtype); lora_A [r, in];
    lora_B [out, r]."""
    a, b = lora_A.float(), lora_B.float()
    cross = (w_at.float() * b).sum(1)                                  # [out]: B_i . (W_i A^T)
    quad = ((b @ (a @ a.t())) * b).sum(1)                              # [out, r] @ [r, r] -> [out]
    return (weight_sq + 2.0 * scaling * cross + scaling * scaling * quad).clamp_min(0).sqrt()


def magnitude_scale(magnitude: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """m / n [out]: the gradient reaches m; n is a constant (detached, paper section 4.3)."""
    return magnitude / norm.detach()
