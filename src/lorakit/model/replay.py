"""Checkpoint replay: gradient checkpointing that does not recompute small frozen outputs.

Checkpointing keeps each decoder layer's input and re-runs the layer's forward during backward to
rebuild the tensors autograd needs. With (Q)LoRA most of that recomputation is frozen matmuls,
and for the layers whose output is no wider than their input (q/k/v/o and the MLP's down
projection) the output is cheap to keep: out * T values against 2 * in * out * T FLOPs (and, in
4 bits, a dequantization) to redo. So while a checkpointed layer runs its first forward, each
LoRA-wrapped frozen base layer of that kind (`Linear4bit`, or a frozen `nn.Linear`) records its
output; when the same layer is recomputed in backward it replays the recorded tensor instead of
multiplying again. The up-projections (gate/up, [T, intermediate] each: most of a layer's
activations) are recomputed as before.

    forward (checkpointed):  y = base(x)                -> kept in the layer's store
    recompute (backward):    y = store[i]               (same values, same order)

Why the tensors autograd saves stay the same in both passes (torch.utils.checkpoint matches them
one by one, and raises if their count or shapes differ): a Linear4bit saves none (its packed
weight rides on the autograd context), a frozen nn.Linear saves only its weight, which is kept
out of checkpointing's count while it is recorded, and everything downstream of y runs unchanged. Measured
effect and memory: bench/SPEED.md. Used through `context_fn` of torch.utils.checkpoint
(non-reentrant), which gives each checkpointed call its own pair of contexts; train/setup.py turns
it on (model.checkpoint_replay) and LoRALinear calls `replayed(base_layer, x)` for its frozen part.
Outside a checkpointed call `replayed` is just `base_layer(x)`.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from ..quant.linear4bit import Linear4bit


class _ReplayState(threading.local):
    """Per thread: are we inside a checkpointed call's first forward (record) or its recomputation
    in backward (replay)? The store travels with the context objects, so whichever thread runs the
    recomputation (CUDA: autograd's device thread) sets its own state."""

    def __init__(self):
        self.mode = None    # None | "record" | "replay"
        self.store = None   # list of kept outputs of the current checkpointed call
        self.index = 0      # next tensor to replay


_state = _ReplayState()


class _ReplayMode:
    """Context manager setting the thread's mode and store; re-enterable (a second backward with
    retain_graph recomputes, and so replays, again)."""

    def __init__(self, mode: str, store: list):
        self.mode, self.store, self.saved = mode, store, []

    def __enter__(self):
        self.saved.append((_state.mode, _state.store, _state.index))
        _state.mode, _state.store, _state.index = self.mode, self.store, 0
        return self

    def __exit__(self, *exc):
        _state.mode, _state.store, _state.index = self.saved.pop()
        return False


def replay_contexts():
    """`context_fn` for torch.utils.checkpoint: (record during forward, replay during recompute)."""
    store: list = []
    return _ReplayMode("record", store), _ReplayMode("replay", store)


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _frozen_dense(layer: nn.Module) -> bool:
    return (type(layer) is nn.Linear and not layer.weight.requires_grad
            and (layer.bias is None or not layer.bias.requires_grad))


def keeps_output(layer: nn.Module) -> bool:
    """A frozen 4-bit or dense Linear whose output is no wider than its input (module docstring)."""
    if isinstance(layer, Linear4bit):
        frozen = layer.bias is None or not layer.bias.requires_grad
    else:
        frozen = _frozen_dense(layer)
    return frozen and layer.out_features <= layer.in_features


def replayed(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """layer(x), recorded / replayed for `keeps_output` layers inside a checkpointed call."""
    mode = _state.mode
    if mode is None or not keeps_output(layer):
        return layer(x)
    if mode == "replay":
        if _state.index >= len(_state.store):
            raise RuntimeError("lorakit checkpoint replay: the recomputed forward asked for more kept outputs "
                               f"({_state.index + 1}) than the forward recorded ({len(_state.store)})")
        y = _state.store[_state.index]
        _state.index += 1
        if y.shape[:-1] != x.shape[:-1] or y.shape[-1] != layer.out_features:
            raise RuntimeError(f"lorakit checkpoint replay: kept output {tuple(y.shape)} does not fit input "
                               f"{tuple(x.shape)} of {layer}; the recomputed forward took another path")
        return y
    if _frozen_dense(layer):
        # nn.Linear saves its frozen weight for dL/dx; the recomputation that replays y will not,
        # so keep that one saved tensor out of checkpointing's count (an identity hook pair nested
        # inside checkpointing's own takes it instead: the weight, never an activation)
        with torch.autograd.graph.saved_tensors_hooks(_identity, _identity):
            y = layer(x)
    else:
        y = layer(x)
    _state.store.append(y.detach())  # the values; the recomputed graph never backpropagates into it
    return y
