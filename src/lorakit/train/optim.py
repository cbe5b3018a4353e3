"""Optimizers: torch AdamW, 8-bit blockwise AdamW and host-paged AdamW (QLoRA's third trick).

Names follow transformers' `optim` values, so a user's habits carry over:

    adamw_torch         torch.optim.AdamW (fused kernel where the params allow it)
    adamw_8bit          AdamW8bit: both moments stored 8-bit, blockwise (bitsandbytes' scheme)
    paged_adamw_32bit   PagedAdamW: fp32 moments kept in host memory, streamed per parameter
    paged_adamw_8bit    PagedAdamW8bit: 8-bit moments kept in host memory, streamed per parameter

LoRA+ (train.loraplus_lr_ratio) is not an optimizer but its param groups (`param_groups`), so it
works with every kind above, with the schedule (which scales each group's lr by the same factor)
and with resume (the groups are part of the optimizer's state_dict).

All lorakit variants are one class, `AdamW(optim_bits=32|8, paged=bool)`. The AdamW math lives
once, in `adamw_update_`, on fp32 tensors; the 8-bit variant only wraps it in
dequantize -> update -> requantize, and paging only decides where the stored state lives.

Stored state per parameter (plain tensors and ints, so `state_dict()` survives
`torch.save` / `torch.load(weights_only=True)` and resumes bit for bit):

    fp32:  step: int, exp_avg: fp32 [*p.shape], exp_avg_sq: fp32 [*p.shape]          8 B/param
    8-bit: step: int,
           exp_avg_codes: uint8 [*p.shape],    exp_avg_absmax: fp32 [ceil(n/256)]   (signed map)
           exp_avg_sq_codes: uint8 [*p.shape], exp_avg_sq_absmax: fp32 [ceil(n/256)] (unsigned map)
                                                                       2 + 8/256 = 2.03 B/param
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from lorakit.quant.dynamic import create_dynamic_map, dequantize_blockwise, quantize_blockwise

from ..config import OPTIMIZERS as OPTIMIZER_NAMES  # the one list of names (config validates against it)

# bitsandbytes Optimizer2State.init_state: 8-bit blockwise optimizer state uses blocks of 256.
BLOCKSIZE = 256
# bitsandbytes optim.AdamW8bit(min_8bit_size=4096): smaller tensors keep fp32 state (the
# per-block scales and quantization error are not worth it for biases, norms, tiny LoRA A/B).
MIN_8BIT_SIZE = 4096
# Devices whose torch.optim.AdamW(fused=True) kernel we use; measured on CPU (torch 2.13, 2 cores):
# fused 5.0 ms/step vs for-loop 19.6 and foreach 34.7 for 224 LoRA tensors of 16x1024; PyTorch's
# docs rank fused fastest on CUDA. Anything else falls back to torch's own default (foreach/loop).
_FUSED_DEVICES = ("cpu", "cuda")

_FP32_KEYS = ("exp_avg", "exp_avg_sq")
_8BIT_KEYS = ("exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")


def adamw_update_(
    param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int,
    *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """One AdamW step, in place on fp32 tensors of one shape (Loshchilov & Hutter 2019).

    Same operations, in the same order, as torch.optim.AdamW's single-tensor path:
        p <- p * (1 - lr * wd)                           decoupled weight decay
        m <- lerp(m, g, 1 - beta1)                       = beta1 m + (1 - beta1) g
        v <- beta2 v + (1 - beta2) g^2
        p <- p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
    """
    if weight_decay != 0:
        param.mul_(1 - lr * weight_decay)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    bias_correction1 = 1 - beta1**step
    bias_correction2_sqrt = math.sqrt(1 - beta2**step)
    denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
    param.addcdiv_(exp_avg, denom, value=-lr / bias_correction1)


class AdamW(torch.optim.Optimizer):
    """AdamW with fp32 or 8-bit blockwise moments, stored on the param's device or paged to host.

    optim_bits=8: tensors with >= min_8bit_size elements store the first moment quantized with
    the signed dynamic map and the second moment with the unsigned dynamic map, in blocks of 256
    (bitsandbytes' blockwise 8-bit Adam); smaller tensors keep fp32 moments.
    paged=True: the stored state lives in host memory (pinned when the param is on CUDA) and
    is copied to the param's device for that param's update only, then copied back; device
    memory for optimizer state is one param's worth at a time. On CPU, paging changes nothing.
    The copies are non_blocking and queued on the current stream, in order: host->device, update,
    device->host, for one param after another, so the next step's host->device copy of a tensor
    runs after this step's copy back into it, with no host sync in between. The host reads the
    pinned tensors only through state_dict() (checkpoints), which first waits for the copies (an
    event recorded after each step); a step on another stream first makes that stream wait for
    the event (on the device, no host sync). This is always-offloaded state, not bitsandbytes'
    unified-memory paging.
    The update itself always runs in fp32 (bf16/fp16 params are updated through an fp32 copy).
    """

    def __init__(
        self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8, weight_decay: float = 0.0, *, optim_bits: int = 32,
        paged: bool = False, min_8bit_size: int = MIN_8BIT_SIZE,
    ):
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be one of (8, 32), got {optim_bits!r}")
        if not lr >= 0.0:
            raise ValueError(f"lr must be >= 0, got {lr!r}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must each be in [0, 1), got {betas!r}")
        if not eps >= 0.0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.optim_bits = optim_bits
        self.paged = paged
        self.min_8bit_size = min_8bit_size
        self._maps: dict[tuple[bool, torch.device], Tensor] = {}  # (signed, device) -> [256]
        self._copied: dict[torch.device, torch.cuda.Event] = {}  # paged: after the last step's copies back

    # ---- where and how state is stored -------------------------------------------------------

    def _is_8bit(self, p: Tensor) -> bool:
        return self.optim_bits == 8 and p.numel() >= self.min_8bit_size

    def _home(self, p: Tensor) -> torch.device:
        """Device that holds p's stored state: host when paged, else p's own device."""
        return torch.device("cpu") if self.paged else p.device

    def _alloc(self, p: Tensor, shape, dtype: torch.dtype) -> Tensor:
        pin = self.paged and p.device.type == "cuda"
        return torch.zeros(shape, dtype=dtype, device=self._home(p), pin_memory=pin)

    def _init_state(self, p: Tensor) -> dict:
        """Zero moments. All-zero codes with zero absmax dequantize to 0 under any map."""
        if not self._is_8bit(p):
            return {"step": 0, **{k: self._alloc(p, p.shape, torch.float32) for k in _FP32_KEYS}}
        blocks = math.ceil(p.numel() / BLOCKSIZE)
        state = {"step": 0}
        for name in _FP32_KEYS:
            state[f"{name}_codes"] = self._alloc(p, p.shape, torch.uint8)
            state[f"{name}_absmax"] = self._alloc(p, (blocks,), torch.float32)
        return state

    def _map(self, signed: bool, device: torch.device) -> Tensor:
        key = (signed, device)
        if key not in self._maps:
            self._maps[key] = create_dynamic_map(signed=signed).to(device)
        return self._maps[key]

    # ---- 8-bit <-> fp32 moments (identity for fp32 state) ------------------------------------

    def _unpack_moments(self, work: dict[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor]:
        """Stored tensors (already on the param's device) -> fp32 (exp_avg, exp_avg_sq)."""
        if "exp_avg" in work:
            return work["exp_avg"], work["exp_avg_sq"]
        m = dequantize_blockwise(work["exp_avg_codes"], work["exp_avg_absmax"],
                                 self._map(True, device), BLOCKSIZE)
        v = dequantize_blockwise(work["exp_avg_sq_codes"], work["exp_avg_sq_absmax"],
                                 self._map(False, device), BLOCKSIZE)
        return m, v

    def _pack_moments(self, m: Tensor, v: Tensor, is_8bit: bool, device: torch.device) -> dict:
        """fp32 (exp_avg, exp_avg_sq) -> tensors to store, keyed like the state."""
        if not is_8bit:
            return {"exp_avg": m, "exp_avg_sq": v}
        m_codes, m_absmax = quantize_blockwise(m, self._map(True, device), BLOCKSIZE)
        v_codes, v_absmax = quantize_blockwise(v, self._map(False, device), BLOCKSIZE)
        return dict(zip(_8BIT_KEYS, (m_codes, m_absmax, v_codes, v_absmax)))

    # ---- the step ----------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        cuda_devices = set()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("lorakit AdamW does not support sparse gradients")
                if self.paged and p.device.type == "cuda" and p.device not in cuda_devices:
                    self._after_last_copies(p.device)
                    cuda_devices.add(p.device)
                self._step_param(p, group)
        for device in cuda_devices if self.paged else ():  # the copies back are queued, not done
            event = self._copied[device] = torch.cuda.Event()
            event.record(torch.cuda.current_stream(device))
        return loss

    def _after_last_copies(self, device: torch.device) -> None:
        """Order this step's host->device copies after the last step's device->host copies, on
        the device (a no-op on the stream that queued them)."""
        event = self._copied.get(device)
        if event is not None:
            torch.cuda.current_stream(device).wait_event(event)

    def _wait_for_host_copies(self) -> None:
        """Block until every queued device->host copy of paged state has landed (the host reads it)."""
        for event in self._copied.values():
            event.synchronize()

    def state_dict(self) -> dict:
        """torch's state_dict, after the paged state's queued copies back to the host are done."""
        self._wait_for_host_copies()
        return super().state_dict()

    def _step_param(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        if not state:
            state.update(self._init_state(p))
        state["step"] += 1
        # paged: host -> device copies; unpaged (or paged on CPU): the stored tensors themselves
        work = {k: t.to(p.device, non_blocking=True) for k, t in state.items() if torch.is_tensor(t)}
        is_8bit = "exp_avg_codes" in work
        m, v = self._unpack_moments(work, p.device)
        p32 = p if p.dtype == torch.float32 else p.float()
        beta1, beta2 = group["betas"]
        adamw_update_(p32, p.grad.float(), m, v, state["step"], lr=group["lr"], beta1=beta1,
                      beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"])
        if p32 is not p:
            p.copy_(p32)
        new = self._pack_moments(m, v, is_8bit, p.device)
        for key, tensor in new.items():  # back into the stored (possibly pinned host) tensors
            if tensor is not state[key]:
                state[key].copy_(tensor, non_blocking=True)

    # ---- checkpointing -----------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict) -> None:
        """Load like torch, then re-place state: keep dtypes (uint8 codes, fp32 moments of bf16
        params) and keep paged state on the host; torch's default would cast to p.dtype/device."""
        self._wait_for_host_copies()  # no queued copy may land in the host tensors replaced below
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            if pid in state_dict["state"]:
                self.state[p] = self._place_state(p, state_dict["state"][pid])

    def _place_state(self, p: Tensor, saved: dict) -> dict:
        expected = {"step", *(_8BIT_KEYS if self._is_8bit(p) else _FP32_KEYS)}
        if set(saved) != expected:
            raise ValueError(
                f"optimizer state for a param of shape {tuple(p.shape)} has keys {sorted(saved)}, "
                f"expected {sorted(expected)} (optim_bits={self.optim_bits}, "
                f"min_8bit_size={self.min_8bit_size}); was it saved by another optimizer?")
        placed = {"step": int(saved["step"])}
        for key in expected - {"step"}:
            placed[key] = self._alloc(p, saved[key].shape, saved[key].dtype)
            placed[key].copy_(saved[key])
        return placed


class AdamW8bit(AdamW):
    """AdamW with 8-bit blockwise moments on the param's device (bitsandbytes' AdamW8bit)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, paged=False,
                         min_8bit_size=min_8bit_size)


class PagedAdamW(AdamW):
    """AdamW with fp32 moments kept in host memory and streamed per parameter."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=32, paged=True)


class PagedAdamW8bit(AdamW):
    """AdamW with 8-bit blockwise moments kept in host memory and streamed per parameter."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 min_8bit_size: int = MIN_8BIT_SIZE):
        super().__init__(params, lr, betas, eps, weight_decay, optim_bits=8, paged=True,
                         min_8bit_size=min_8bit_size)


def is_loraplus_b(name: str, param: Tensor) -> bool:
    """LoRA+'s fast group: B matrices (lora_B, lora_embedding_B) and every 1-D parameter (biases,
    DoRA magnitudes), as PEFT's create_loraplus_optimizer sorts them ("lora_B" in name or ndim == 1)."""
    return ".lora_B." in name or name.endswith(".lora_embedding_B") or param.ndim == 1


def param_groups(model: torch.nn.Module, lr: float, loraplus_lr_ratio: float = 0.0) -> list:
    """The trainable parameters of `model` for build_optimizer.

    ratio 0: one list, every parameter at the optimizer's lr. LoRA+ (Hayou et al. 2024, "LoRA+:
    Efficient Low Rank Adaptation of Large Models"; PEFT create_loraplus_optimizer), ratio > 0:
        group 0  lora_A, lora_embedding_A, other >= 2-D tensors (modules_to_save)   lr
        group 1  is_loraplus_b: lora_B, lora_embedding_B, biases, DoRA magnitudes    ratio * lr
    Group 0 comes first, so the logged lr (group 0's) is the configured one. One difference from
    PEFT: PEFT gives an adapted embedding's A and B a fixed loraplus_lr_embedding (1e-6); here they
    follow the A / B rule like every other layer (the paper's rule; docs/methods.md). Weight decay
    is train.weight_decay for both groups."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not loraplus_lr_ratio:
        return [p for _, p in named]
    fast = [p for n, p in named if is_loraplus_b(n, p)]
    slow = [p for n, p in named if not is_loraplus_b(n, p)]
    groups = [{"params": slow, "lr": lr}, {"params": fast, "lr": lr * loraplus_lr_ratio}]
    return [g for g in groups if g["params"]]


def _torch_adamw_kernel(params: list) -> dict:
    """fused=True when every param can use torch's fused AdamW; else torch's default choice."""
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    fusable = all(t.device.type in _FUSED_DEVICES and t.is_floating_point() for t in tensors)
    return {"fused": True} if tensors and fusable else {}


def build_optimizer(
    params: Iterable, name: str, lr: float, weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """The optimizer called `name` (one of OPTIMIZER_NAMES, transformers' `optim` values)."""
    if name not in OPTIMIZER_NAMES:
        raise ValueError(f"unknown optimizer {name!r}; allowed: {', '.join(OPTIMIZER_NAMES)}")
    params = list(params)
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                 **_torch_adamw_kernel(params))
    return AdamW(params, lr, betas, eps, weight_decay,
                 optim_bits=8 if name.endswith("_8bit") else 32, paged=name.startswith("paged_"))


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of every tensor stored in optimizer.state (moments, codes, scales, step tensors)."""
    return sum(t.numel() * t.element_size()
               for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t))
