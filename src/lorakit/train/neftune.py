"""NEFTune: noisy input embeddings while training (Jain et al. 2023, "NEFTune: Noisy Embeddings
Improve Instruction Finetuning"; transformers/TRL `neftune_noise_alpha`).

    e' = e + u,   u ~ Uniform(-a, a) elementwise,   a = alpha / sqrt(L * d)      e: [B, L, d]

with L = e.size(1), the row length *including padding*, and d the hidden size, exactly as
transformers' `neftune_post_forward_hook` computes it (the paper's reference code divides by the
unpadded length of each row instead; transformers and TRL, and so lorakit, use the padded length).
The magnitude is computed in fp32 as there, and the noise drawn the same way
(`torch.zeros_like(e).uniform_(-a, a)`), so under the same seed the noise is the same bit for bit.

Only in training mode (`module.training`): evaluation, generation and merging never see noise.
It is a forward hook on the input embedding module that `install_neftune` registers and the
returned handle removes (train/loop.py installs it for the loop only); no forward is patched.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn


def neftune_noise(embeddings: torch.Tensor, alpha: float) -> torch.Tensor:
    """embeddings [B, L, d] plus Uniform(-a, a) noise, a = alpha / sqrt(L * d) (module docstring)."""
    dims = torch.tensor(embeddings.size(1) * embeddings.size(2))           # L * d (int64)
    magnitude = alpha / torch.sqrt(dims)                                   # fp32 [], as transformers
    return embeddings + torch.zeros_like(embeddings).uniform_(-magnitude, magnitude)


class NEFTuneHook:
    """Forward hook: noise on the embedding output while the module trains."""

    def __init__(self, alpha: float):
        self.alpha = alpha

    def __call__(self, module: nn.Module, inputs, output: torch.Tensor) -> torch.Tensor:
        return neftune_noise(output, self.alpha) if module.training else output


_HANDLE = "_lorakit_neftune_handle"


class _NoHandle:
    def remove(self) -> None:
        pass


def install_neftune(model: nn.Module, alpha: float) -> "torch.utils.hooks.RemovableHandle | _NoHandle":
    """Register NEFTune on model.get_input_embeddings() (after add_lora: the LoRA embedding, so the
    noise lands on the adapted embedding, as transformers does with a PEFT model); alpha 0 does
    nothing. Returns the handle whose remove() takes it off again. Installing again (a loop that
    ended in an exception and is run again) replaces the previous hook, never stacks a second."""
    if not alpha:
        return _NoHandle()
    embeddings: Optional[nn.Module] = model.get_input_embeddings()
    if embeddings is None:
        raise ValueError("train.neftune_alpha needs a model with an input embedding (get_input_embeddings())")
    previous = embeddings.__dict__.get(_HANDLE)
    if previous is not None:
        previous.remove()
    handle = embeddings.register_forward_hook(NEFTuneHook(alpha))
    embeddings.__dict__[_HANDLE] = handle  # a plain attribute, not a submodule or buffer
    return handle
