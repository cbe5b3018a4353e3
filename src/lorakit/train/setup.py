"""The model set-up a training run gets between load_model and add_lora, and the step-level fast
paths, each by name.

    gradient checkpointing  model.gradient_checkpointing: each decoder layer is recomputed in backward
    checkpoint replay       model.checkpoint_replay: ... except the small frozen outputs, kept and
                            replayed (model/replay.py)
    lean activations        model.lean_activations: LeanGatedMLP / LeanRMSNorm modules keep fewer
                            tensors for backward (model/lean.py)
    fused head loss         the head + cross-entropy in one pass (train/loss.py LinearCrossEntropySum)
    4-bit kernels           the compiled (de)quantize kernels of quant/kernels (C on CPU)

The last four change how a step computes, never what: each has a plain reference and tests that
compare the two. `model.fast_paths: false` (`lorakit train --reference`) turns all four off for
debugging numerics: plain recomputation, the model's own modules, the chunked reference loss and the
PyTorch reference kernels. `describe_fast_paths` is the line the recipe logs.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

from torch import nn

from ..config import ModelConfig
from ..model.lean import install_lean
from ..model.replay import keeps_output, replay_contexts
from ..quant import kernels


@dataclass(frozen=True)
class FastPaths:
    """Which step-level optimisations a run uses (module docstring)."""

    lean_activations: bool = True
    checkpoint_replay: bool = True
    fused_loss: bool = True
    kernels: bool = True

    @classmethod
    def from_config(cls, m: ModelConfig) -> "FastPaths":
        if not m.fast_paths:
            return cls(False, False, False, False)
        return cls(lean_activations=m.lean_activations, checkpoint_replay=m.checkpoint_replay)

    @contextlib.contextmanager
    def kernel_scope(self) -> Iterator[None]:
        """Inside: the 4-bit kernel registry as these fast paths say (reference only when off)."""
        if self.kernels:
            yield
            return
        previous = kernels.backend_override()
        kernels.set_backend("reference")
        try:
            yield
        finally:
            kernels.set_backend(previous)


def enable_gradient_checkpointing(model: nn.Module, replay: bool = True) -> None:
    """Recompute each decoder layer in backward (non-reentrant, so frozen inputs need no grad);
    with `replay`, the small frozen outputs (4-bit or 16-bit base) are kept and replayed instead
    of recomputed (model/replay.py). transformers >= 5 calls it activation checkpointing; older
    versions gradient checkpointing."""
    kwargs = {"use_reentrant": False}
    if replay:
        kwargs["context_fn"] = replay_contexts
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def prepare_for_training(model: nn.Module, gradient_checkpointing: bool = False,
                         fast: FastPaths = FastPaths()) -> dict:
    """Gradient checkpointing (with replay when `fast` says so), then the lean modules; returns what
    was applied: {"gradient_checkpointing": bool, "replay": bool, "lean_mlp": n, "lean_norm": n}.
    The one place the recipe, the memory harness and the benchmarks take this set-up from."""
    applied = {"gradient_checkpointing": gradient_checkpointing,
               "replay": gradient_checkpointing and fast.checkpoint_replay, "lean_mlp": 0, "lean_norm": 0}
    if gradient_checkpointing:
        enable_gradient_checkpointing(model, replay=fast.checkpoint_replay)
    if fast.lean_activations:
        counts = install_lean(model, rebuild=not gradient_checkpointing)
        applied.update(lean_mlp=counts["mlp"], lean_norm=counts["norm"])
    return applied


def describe_fast_paths(model: nn.Module, fast: FastPaths, applied: dict) -> str:
    """'lean MLP x24, lean RMSNorm x49, checkpoint replay of q_proj/k_proj/v_proj/o_proj/down_proj,
    fused head loss, 4-bit kernels c-cpu' (after add_lora: replay concerns adapted frozen layers)."""
    from ..lora.inject import lora_layers

    parts = []
    if applied["lean_mlp"] or applied["lean_norm"]:
        parts.append(f"lean MLP x{applied['lean_mlp']}, lean RMSNorm x{applied['lean_norm']}")
    if applied["replay"]:
        kept = sorted({name.rsplit(".", 1)[-1] for name, layer in lora_layers(model) if keeps_output(layer.base_layer)})
        parts.append(f"checkpoint replay of {'/'.join(kept) or 'nothing (no adapted layer qualifies)'}")
    if fast.fused_loss:
        parts.append("fused head loss")
    names = [k.name for k in kernels.kernels("dequantize_4bit")] if fast.kernels and kernels.backend() == "auto" else []
    parts.append(f"4-bit kernels {', '.join(names)}" if names else "4-bit kernels: PyTorch reference")
    if not fast.lean_activations and not fast.checkpoint_replay and not fast.fused_loss and not fast.kernels:
        return "off (model.fast_paths: false): " + ", ".join(parts)
    return ", ".join(parts)
