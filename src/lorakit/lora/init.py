"""How A and B start (`lora.init`, PEFT's `init_lora_weights`), and the residual base some inits leave.

    default         A ~ Kaiming-uniform(a=sqrt(5)) [r, in], B = 0        (LoRA paper; nn.Linear's init)
    gaussian        A ~ N(0, (1/r)^2) [r, in], B = 0                      (PEFT "gaussian")
    pissa           W = U S V^T (full SVD, fp32); with S_r' = S_r / s:
                        A = sqrt(S_r') V_r^T [r, in],  B = U_r sqrt(S_r') [out, r]
                        residual = W - s B A = W minus its best rank-r approximation
                    (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation")
    pissa_niter_N   the same from torch.svd_lowrank(W, r, niter=N) (randomized, much faster for
                    large W); its random draws are seeded by the layer's name, so every load of
                    the same weights computes the same residual
    olora           W = Q R (QR, fp32): A = R[:r] [r, in], B = Q[:, :r] [out, r],
                        residual = W - s B A                              (Büyükakyüz 2024, "OLoRA")

B starts at zero for default/gaussian, so the adapted model equals its base. pissa/olora start
with B A != 0 and change the frozen base to the residual instead, so the adapted model again equals
the original: W = residual + s B A. With a 4-bit base the *residual* is what gets quantized, from
the 16-bit weights as they stream in (`ResidualInit`, the loader's weight preparer, model/load.py).
The initial A0 / B0 stay on the layer (buffers `initial_lora_A/B`) so the trained adapter can be
written as a plain LoRA of the original base too (lora/io.py, PEFT's conversion):

    W + s' B' A' = residual + s B A     with  A' = [A; A0] [2r, in],  B' = [B, -B0] [out, 2r],  s' = s

Embeddings: A = 0 [r, vocab], B ~ N(0, 1) [dim, r] whatever lora.init says (PEFT's lora.Embedding).
"""

from __future__ import annotations

import math
import zlib
from typing import Optional

import torch
from torch import nn

from ..config import LoraConfig
from ..model.modules import is_conv1d
from ..model.targets import find_targets


def init_linear_(lora_A: torch.Tensor, lora_B: torch.Tensor, init: str) -> None:
    """default / gaussian, in place: A [r, in] random, B [out, r] zero (module docstring)."""
    with torch.no_grad():
        if init == "gaussian":
            nn.init.normal_(lora_A, std=1.0 / lora_A.shape[0])  # PEFT: std = 1 / r
        else:
            nn.init.kaiming_uniform_(lora_A, a=math.sqrt(5))  # nn.Linear's own init, as PEFT
        nn.init.zeros_(lora_B)


def init_embedding_(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """PEFT lora.Embedding: A = 0 [r, vocab], B ~ N(0, 1) [dim, r] (loralib's embedding init)."""
    with torch.no_grad():
        nn.init.zeros_(lora_A)
        nn.init.normal_(lora_B)


def _niter(init: str) -> Optional[int]:
    return int(init.rsplit("_", 1)[1]) if init.startswith("pissa_niter_") else None


def _layer_seed(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


def residual_factors(weight: torch.Tensor, r: int, scaling: float, init: str,
                     name: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """(A [r, in], B [out, r]) in fp32 for init pissa / pissa_niter_N / olora of W = `weight`
    [out, in]; the residual is W - scaling * B @ A (`residual_of`). `name` seeds pissa_niter_N."""
    w = weight.detach().float()                                        # [out, in]
    if r > min(w.shape):
        raise ValueError(f"lora.init={init!r} needs lora.r <= min(out, in) = {min(w.shape)} "
                         f"for {name or 'a layer'} of shape {tuple(w.shape)}; got r={r}")
    if init == "olora":
        q, rr = torch.linalg.qr(w)                                     # q [out, k], rr [k, in]
        return rr[:r].contiguous(), q[:, :r].contiguous()
    niter = _niter(init)
    if niter is None:                                                  # "pissa": exact SVD
        u, s, vh = torch.linalg.svd(w, full_matrices=False)            # u [out, k], s [k], vh [k, in]
        u, s, vh = u[:, :r], s[:r], vh[:r]
    else:
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):                   # the caller's RNG is left as it was
            torch.manual_seed(_layer_seed(name))
            u, s, v = torch.svd_lowrank(w, q=r, niter=niter)           # u [out, r], s [r], v [in, r]
        vh = v.t()
    root = torch.sqrt(s / scaling)                                     # [r]: s B A = U_r S_r V_r^T
    return (root[:, None] * vh).contiguous(), (u * root[None, :]).contiguous()


def residual_of(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """W - scaling * B @ A in fp32, [out, in]."""
    return weight.float() - scaling * (lora_B.float() @ lora_A.float())


class ResidualInit:
    """The weight preparer model/load.py calls for lora.init pissa/olora, so the residual (not W)
    is what a 4-bit base quantizes, while only one 16-bit tensor is in memory at a time.

        select(model)          the layer names lora.target_modules picks (on the meta skeleton)
        __call__(name, W)      W [out, in] as read -> the residual [out, in] fp32; A0, B0 are kept
        take(name)             (A0, B0) for add_lora, once

    `lorakit.load_model(..., prepare=ResidualInit(config))` then `add_lora(model, config)`; the
    recipes do this for you."""

    def __init__(self, config: LoraConfig):
        if not config.residual_init:
            raise ValueError(f"ResidualInit is for lora.init pissa/pissa_niter_N/olora, not {config.init!r}")
        self.config = config
        self.factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def select(self, model: nn.Module) -> set[str]:
        return {n for n in find_targets(model, self.config.target_modules, self.config.exclude_modules,
                                        embeddings=False)}

    def __call__(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        c = self.config
        a, b = residual_factors(weight, c.r, c.scaling, c.init, name)
        self.factors[name] = (a, b)
        return residual_of(weight, a, b, c.scaling)

    def matches(self, config: LoraConfig) -> bool:
        c = self.config
        return (c.r, c.scaling, c.init) == (config.r, config.scaling, config.init)

    def take(self, name: str) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        return self.factors.pop(name, None)


def weight_preparer(config: LoraConfig) -> Optional[ResidualInit]:
    """The loader's weight preparer for `config`: a ResidualInit for pissa/olora, else None."""
    return ResidualInit(config) if config.residual_init else None


def init_residual_(layer, name: str, config: LoraConfig, prepared: Optional[ResidualInit]) -> None:
    """pissa / olora on one LoRALinear: A, B from the factors the loader computed (`prepared`), or
    from the dense base weight now, which is then replaced in place by the residual (as PEFT does).
    A 4-bit base without prepared factors is an error: its 16-bit weights are gone."""
    from ..quant.linear4bit import Linear4bit

    base = layer.base_layer
    factors = prepared.take(name) if prepared is not None and prepared.matches(config) else None
    if factors is None:
        if isinstance(base, Linear4bit):
            raise ValueError(
                f"{name}: lora.init={config.init!r} on a 4-bit base needs the 16-bit weights, which are "
                f"quantized at load: load the model with lorakit.load_model(..., prepare=lorakit.ResidualInit(lora_config)) "
                f"(lorakit train / merge / generate do) so that the residual is what gets quantized")
        w = base.weight.detach()
        w_out_in = w.t() if is_conv1d(base) else w                      # Conv1D stores W^T [in, out]
        factors = residual_factors(w_out_in, config.r, config.scaling, config.init, name)
        residual = residual_of(w_out_in, *factors, config.scaling)
        with torch.no_grad():
            w.copy_((residual.t() if is_conv1d(base) else residual).to(w.dtype))
    a, b = factors
    with torch.no_grad():
        layer.lora_A.weight.copy_(a.to(layer.lora_A.weight.device))
        layer.lora_B.weight.copy_(b.to(layer.lora_B.weight.device))
    layer.keep_initial_()
    if layer.use_dora:
        layer.init_dora_()  # m = ||residual + s B0 A0||_row = ||W||_row (4-bit: of the quantized residual + s B0 A0)
