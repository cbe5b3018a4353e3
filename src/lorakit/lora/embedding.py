"""LoRAEmbedding: a frozen embedding table plus a trainable low-rank update (PEFT's lora.Embedding).

An embedding is the linear map one-hot(token) -> row of the table, so in lorakit's [out, in]
convention its weight is W^T [dim, vocab] and the update is s * B @ A with

    lora_embedding_A [r, vocab]     lora_embedding_B [dim, r]      (PEFT's names and shapes)
    y = base_layer(ids) + s * A^T[ids] @ B^T * embed_scale           [..., dim]

`embed_scale` is the factor some embedding classes multiply by in their forward (Gemma's
sqrt(hidden)); the update gets it too, so merging W + s (B A)^T into the table is exact. No
dropout (PEFT has none for embeddings). Init: A = 0, B ~ N(0, 1) (lora/init.py init_embedding_).

DoRA on an embedding (PEFT's DoraEmbeddingLayer): m [dim] per embedding dimension and
n = ||W^T + s B A||_row, a norm over the vocabulary:  y = (m / n) * (base_layer(ids) + update).

Tied output head: the adapter changes the *input* embedding only; a head tied to the same table
(GPT-2, Gemma, Qwen2 small models) keeps reading the original W, as in PEFT's forward. Merging
therefore unties them (lora/merge.py): the merged model holds W + delta as its embedding and W as
its head, and says tie_word_embeddings: false, so the merged model computes what the adapted one did.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .dora import magnitude_scale, row_norm_lowrank, row_norm_reference
from .init import init_embedding_
from .layer import lora_branch_dtype


class LoRAEmbedding(nn.Module):
    """A frozen `base_layer` (an nn.Embedding or a subclass) plus s * (B @ A)^T on its table."""

    def __init__(self, base_layer: nn.Embedding, r: int, alpha: float, use_rslora: bool = False,
                 adapter_dtype: Optional[torch.dtype] = torch.float32, branch_dtype: str = "compute",
                 use_dora: bool = False):
        super().__init__()
        if base_layer.max_norm is not None:
            raise ValueError("LoRA on an embedding with max_norm is not supported (F.embedding would renormalise "
                             "the adapter's A in place)")
        vocab, dim = base_layer.weight.shape
        self.base_layer = base_layer
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / (r ** 0.5 if use_rslora else r)
        lora_branch_dtype(branch_dtype, torch.float32, torch.float32)  # checks the name early
        self.branch_dtype = branch_dtype
        dtype = adapter_dtype or base_layer.weight.dtype
        device = base_layer.weight.device
        self.lora_embedding_A = nn.Parameter(torch.empty(r, vocab, dtype=dtype, device=device))  # [r, vocab]
        self.lora_embedding_B = nn.Parameter(torch.empty(dim, r, dtype=dtype, device=device))    # [dim, r]
        init_embedding_(self.lora_embedding_A, self.lora_embedding_B)
        self.lora_magnitude_vector: Optional[nn.Parameter] = None  # DoRA: [dim]
        self.use_dora = use_dora
        self.merged_layer: Optional[nn.Module] = None
        self.adapter_active = True  # False inside lora/switch.py adapters_disabled: the base layer alone
        if use_dora:
            self.init_dora_()

    # the model reads these from its input embedding (tying, resizing, generation helpers)
    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("base_layer"), name)  # num_embeddings, padding_idx, embed_scale...

    def _embed_scale(self) -> Optional[torch.Tensor]:
        scale = getattr(self.base_layer, "embed_scale", None)
        return None if scale is None else torch.as_tensor(scale)

    def keep_initial_(self) -> None:
        """Initial A0, B0 for the conversion to plain LoRA: zeros, since this layer leaves its base
        as it is (the conversion's update s (B A - B0 A0) must then be s B A)."""
        self.register_buffer("initial_lora_A", torch.zeros_like(self.lora_embedding_A.detach()), persistent=False)
        self.register_buffer("initial_lora_B", torch.zeros_like(self.lora_embedding_B.detach()), persistent=False)

    # ---- DoRA ----
    def init_dora_(self) -> None:
        w_t = self.base_layer.weight.detach().float().t()                          # [dim, vocab]
        self.register_buffer("base_row_sq", w_t.pow(2).sum(1), persistent=False)   # [dim] fp32
        norm = row_norm_reference(w_t, self.lora_embedding_A, self.lora_embedding_B, self.scaling)
        self.lora_magnitude_vector = nn.Parameter(norm.to(self.lora_embedding_A.dtype))
        self.use_dora = True

    def dora_norm(self) -> torch.Tensor:
        """||W^T + s B A||_row [dim] fp32, low-rank (lora/dora.py): W^T A^T = (A W)^T [dim, r]."""
        a = self.lora_embedding_A.detach()
        with torch.no_grad():
            w = self.base_layer.weight
            w_at = (a.to(w.dtype) @ w).t()                                         # [r, vocab] @ [vocab, dim] -> [dim, r]
            return row_norm_lowrank(self.base_row_sq, w_at, a, self.lora_embedding_B.detach(), self.scaling)

    def delta_weight(self) -> torch.Tensor:
        """The update of the table, s * (B @ A)^T [vocab, dim] fp32 (plain LoRA)."""
        return self.scaling * (self.lora_embedding_B.float() @ self.lora_embedding_A.float()).t()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.adapter_active:
            return self.base_layer(ids)
        if self.merged_layer is not None:
            return self.merged_layer(ids)
        result = self.base_layer(ids)                                               # [..., dim]
        dtype = lora_branch_dtype(self.branch_dtype, result.dtype, self.lora_embedding_A.dtype)
        b = self.base_layer
        after_a = F.embedding(ids, self.lora_embedding_A.t().to(dtype), padding_idx=b.padding_idx,
                              scale_grad_by_freq=b.scale_grad_by_freq, sparse=b.sparse)  # [..., r]
        update = (after_a @ self.lora_embedding_B.t().to(dtype)) * self.scaling    # [..., dim]
        scale = self._embed_scale()
        if scale is not None:
            update = update * scale.to(device=update.device, dtype=update.dtype)
        if self.lora_magnitude_vector is None:
            return result + update.to(result.dtype)
        mag = magnitude_scale(self.lora_magnitude_vector, self.dora_norm())  # [dim] fp32
        d = result.to(dtype) + update                                        # [..., dim]
        return torch.addcmul(d, d, (mag - 1).to(dtype)).to(result.dtype)    # m/n * d (as in lora/layer.py)

    def merge_(self) -> None:
        from .merge import merged_embedding_of

        if self.merged_layer is None:
            self.merged_layer = merged_embedding_of(self)

    def unmerge_(self) -> None:
        self.merged_layer = None

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}{dora}"
