"""Switch a model's adapters off for a while: the base model as DPO's reference, with no second copy.

    with adapters_disabled(model):
        ref = model(...)        # every LoRALinear / LoRAEmbedding computes its base layer alone,
                                # every ModulesToSave its frozen original: exactly the base model
    # the adapters are on again here, also when the block raised

With LoRA the reference model of DPO (Rafailov et al. 2023) is the network before training: B starts
at zero, so "adapters off" is the same function (PEFT's `disable_adapter()`, which TRL's DPOTrainer
uses the same way). Two set-ups do not give the original model and are refused by the DPO objective
(train/objectives.py): PiSSA / OLoRA (the base holds the residual W - B0 A0) and trained biases
(lora.bias != "none": a bias has no "off").
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn

from .embedding import LoRAEmbedding
from .layer import LoRALinear, ModulesToSave

SWITCHABLE = (LoRALinear, LoRAEmbedding, ModulesToSave)


@contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the model computes without its adapters; each layer's previous state is put
    back on exit, whether the block returned or raised."""
    layers = [m for m in model.modules() if isinstance(m, SWITCHABLE)]
    before = [m.adapter_active for m in layers]
    try:
        for m in layers:
            m.adapter_active = False
        yield model
    finally:
        for m, state in zip(layers, before):
            m.adapter_active = state
