"""Fit a run into a memory budget: the planner behind `estimate --fit` and `train --fit-memory`.

Changes are tried cheapest first. Their cost is what they take from the run, not from memory:

    smaller micro-batch + more accumulation   same result, slower steps           cost 1 per halving
    gradient checkpointing                    ~30% more compute                   cost 2
    8-bit optimizer state (adamw_8bit)        tiny change in the update            cost 3
    paged optimizer state (paged_*, CUDA)     host<->device copies each step       cost 4
    LoRA -> QLoRA (full -> LoRA)              a 4-bit base, a different model      cost 6
    shorter sequences                         truncates the data                   cost 10 per halving

A configuration fits when its predicted `total_bytes` (peak allocated + CUDA context + a 10%
fragmentation margin) is at most the budget.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Optional

from .estimate import Estimate, Settings, estimate
from .shapes import ModelShape, resolve_shape

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}
COSTS = {"micro_batch": 1, "grad_ckpt": 2, "adamw_8bit": 3, "paged": 4, "method": 6, "seq_len": 10}
MIN_SEQ_LEN = 128  # the planner never proposes rows shorter than this


class DoesNotFit(ValueError):
    """No configuration the planner may choose fits the budget."""


def parse_size(text) -> int:
    """'15GiB' -> 16106127360, '15GB' -> 15e9, '15G' -> GiB, '800MiB', or a plain number of bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r} is not understood; write e.g. 15GiB, 15GB, 800MiB or a number of bytes")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


@dataclass
class Option:
    settings: Settings
    grad_accum: int
    estimate: Estimate
    changes: list[str]
    cost: int

    @property
    def predicted_bytes(self) -> int:
        return self.estimate.total_bytes

    def describe(self) -> str:
        s = self.settings
        what = ", ".join(self.changes) if self.changes else "as given"
        gpus = f", {s.world_size} GPUs {s.strategy}" if s.world_size > 1 else ""
        return (f"{what}: micro-batch {s.batch_size} x accum {self.grad_accum}, seq {s.seq_len}, {s.method}, "
                f"{s.optimizer}, grad-ckpt {ckpt_label(s)}{gpus} -> {format_bytes(self.predicted_bytes)} per GPU")


def _micro_batches(effective: int) -> list[int]:
    """Divisors of the effective batch, largest first, so micro * accum == effective exactly."""
    return [m for m in range(effective, 0, -1) if effective % m == 0]


def plan_micro_batch(model, settings: Settings, budget_bytes: int, effective_batch: Optional[int] = None) -> tuple[int, int, int]:
    """Largest micro-batch (a divisor of the effective batch) whose predicted total fits the budget.

    Returns (micro_batch_size, grad_accum, predicted_total_bytes) with micro * accum ==
    effective_batch (default: settings.batch_size). Raises DoesNotFit when even 1 does not fit.
    """
    shape = resolve_shape(model)
    effective = effective_batch or settings.batch_size
    est = None
    for micro in _micro_batches(effective):
        est = estimate(shape, replace(settings, batch_size=micro))
        if est.total_bytes <= budget_bytes:
            return micro, effective // micro, est.total_bytes
    raise DoesNotFit(f"{shape.name} does not fit in {format_bytes(budget_bytes)} with micro-batch 1 "
                     f"(predicted {format_bytes(est.total_bytes)}); try gradient checkpointing, an 8-bit or "
                     f"paged optimizer, QLoRA or shorter sequences (`lorakit estimate --fit`)")


def ckpt_label(s: Settings) -> str:
    """"off", "on", or "on (no replay)" when a (Q)LoRA run recomputes its small frozen outputs too."""
    if not s.grad_ckpt:
        return "off"
    return "on" if s.ckpt_replay or s.method == "full" else "on (no replay)"


def _variants(s: Settings) -> list[tuple[Settings, list[str], int]]:
    """Every combination of the non-batch changes, with its names and cost."""
    # (grad_ckpt, ckpt_replay): checkpointing as configured, then with replay, then plain (least memory)
    ckpts = [((s.grad_ckpt, s.ckpt_replay), [], 0)]
    if not s.grad_ckpt:
        ckpts.append(((True, True), ["gradient checkpointing"], COSTS["grad_ckpt"]))
    if not (s.grad_ckpt and not s.ckpt_replay):
        ckpts.append(((True, False), ["gradient checkpointing without replay"], COSTS["grad_ckpt"] + 1))
    opts = [(s.optimizer, [], 0)]
    if s.optimizer in ("adamw_torch", "paged_adamw_32bit"):
        opts.append(("adamw_8bit" if s.optimizer == "adamw_torch" else "paged_adamw_8bit", ["8-bit optimizer"], COSTS["adamw_8bit"]))
    if s.device == "cuda" and not s.optimizer.startswith("paged_") and s.strategy != "fsdp2":
        opts.append(("paged_adamw_8bit", ["paged 8-bit optimizer"], COSTS["adamw_8bit"] + COSTS["paged"]))
    methods = [(s.method, [], 0)]
    if s.method == "full":
        methods += [("lora", ["LoRA"], COSTS["method"]), ("qlora", ["QLoRA"], COSTS["method"] + 1)]
    elif s.method == "lora":
        methods.append(("qlora", ["QLoRA"], COSTS["method"]))
    seqs, t, k = [(s.seq_len, [], 0)], s.seq_len, 0
    while t // 2 >= MIN_SEQ_LEN:
        t, k = t // 2, k + 1
        seqs.append((t, [f"seq_len {t}"], k * COSTS["seq_len"]))
    strategies = [(s.strategy, [], 0)]
    if s.world_size > 1 and s.strategy == "ddp":
        strategies.append(("fsdp2", ["FSDP2 (shard the base over the GPUs)"], 1))
    out = []
    for strat, n0, c0 in strategies:
        out += _combine(s, strat, n0, c0, ckpts, opts, methods, seqs)
    return out


def _combine(s: Settings, strat: str, n0: list, c0: int, ckpts, opts, methods, seqs) -> list:
    out = []
    for ck, n1, c1 in ckpts:
        for opt, n2, c2 in opts:
            for meth, n3, c3 in methods:
                if ck == (True, False) and meth == "full" and ck != (s.grad_ckpt, s.ckpt_replay):
                    continue  # replay only concerns adapted frozen layers: same as plain checkpointing here
                if strat == "fsdp2" and opt != "adamw_torch":
                    continue  # FSDP2 trains with adamw_torch (train/distributed.py)
                for seq, n4, c4 in seqs:
                    out.append((replace(s, grad_ckpt=ck[0], ckpt_replay=ck[1], optimizer=opt, method=meth, seq_len=seq,
                                        strategy=strat), n0 + n1 + n2 + n3 + n4, c0 + c1 + c2 + c3 + c4))
    return out


def fit(model, settings: Settings, budget_bytes: int, effective_batch: Optional[int] = None, limit: int = 5) -> list[Option]:
    """Configurations that fit, cheapest change first (at most `limit`); [] when none does."""
    shape: ModelShape = resolve_shape(model)
    effective = effective_batch or settings.batch_size
    found: list[Option] = []
    for variant, names, cost in _variants(settings):
        for micro in _micro_batches(effective):
            est = estimate(shape, replace(variant, batch_size=micro))
            if est.total_bytes <= budget_bytes:
                halvings = math.ceil(math.log2(effective / micro)) if micro < effective else 0
                changes = names + (["smaller micro-batch"] if halvings else [])
                found.append(Option(replace(variant, batch_size=micro), effective // micro, est, changes,
                                    cost + halvings * COSTS["micro_batch"]))
                break
    found.sort(key=lambda o: (o.cost, o.predicted_bytes))
    return found[:limit]


def smallest(model, settings: Settings) -> Estimate:
    """The least memory any planner option needs (micro-batch 1 and every change applied)."""
    shape = resolve_shape(model)
    best = None
    for variant, _, _ in _variants(settings):
        est = estimate(shape, replace(variant, batch_size=1))
        if best is None or est.total_bytes < best.total_bytes:
            best = est
    return best


def settings_for_run(cfg, model=None, precision=None, seq_len: Optional[int] = None) -> Settings:
    """Settings of a RunConfig on the loaded `model` (its device), in the run's `precision` (the
    recipe's decision; default: the model's own dtype, or without a model train.precision as "auto"
    resolves it on an Ampere+ GPU: bf16)."""
    from ..dtypes import short_name
    from ..model.modules import model_device
    from ..precision import model_precision

    device = "cuda"
    if model is not None:
        device = "cuda" if model_device(model).type == "cuda" else "cpu"
        precision = precision or model_precision(model, cfg)
    dtype_name = short_name(precision.compute_dtype) if precision is not None else (
        "bf16" if cfg.train.precision == "auto" else cfg.train.precision)
    attn = ""
    if model is not None and getattr(model.config, "_attn_implementation", None) in ("sdpa", "eager"):
        attn = model.config._attn_implementation
    m, lo, t = cfg.model, cfg.lora, cfg.train
    return Settings(
        method="qlora" if m.quantization else "lora", seq_len=seq_len or cfg.data.max_seq_len,
        batch_size=t.micro_batch_size, rank=lo.r, targets=lo.target_modules, grad_ckpt=m.gradient_checkpointing,
        ckpt_replay=m.checkpoint_replay and m.fast_paths, lean_activations=m.lean_activations and m.fast_paths,
        fused_loss=m.fast_paths, optimizer=t.optimizer, dtype=dtype_name, loss_chunk_size=t.loss_chunk_size,
        device=device, attn_impl=attn, quant_type=m.quantization or "nf4", double_quant=m.double_quant,
        blocksize=m.blocksize, skip_modules=tuple(m.skip_modules), lora_dropout=float(lo.dropout),
        adapter_dtype=lo.adapter_dtype, branch_dtype=lo.branch_dtype, mmap_embeddings=m.mmap_embeddings,
        use_dora=lo.use_dora, residual_init=lo.residual_init, objective=t.objective,
        precompute_ref=t.precompute_ref_logps)


@dataclass(frozen=True)
class MemoryPrediction:
    """A run's predicted peak, as figures of the same kind as what the loop measures (train/log.py
    peak_memory), each named for exactly what it is.

    CPU   process_bytes   the process without tensors (Python, torch, transformers, the model's code,
                          tokenizer, data), measured just before training: its resident set minus
                          the weights it holds
          allocated_bytes the tensors at the peak of a step (the estimate's peak_allocated)
          rss_bytes       process + tensors + the heap's overhead (CPU_HEAP_MARGIN of the step's
                          transient bytes + CPU_RUNTIME_BYTES): compare with the measured peak RSS
    CUDA  allocated_bytes compare with torch.cuda.max_memory_allocated
          reserved_bytes  allocated + the caching allocator's fragmentation margin: compare with
                          torch.cuda.max_memory_reserved (nvidia-smi shows that + the CUDA context)
    """

    device: str
    allocated_bytes: int
    reserved_bytes: Optional[int] = None
    process_bytes: Optional[int] = None
    rss_bytes: Optional[int] = None

    @property
    def headline(self) -> tuple[str, int]:
        """(label, bytes) of the figure to show beside the measured headline peak."""
        return ("peak RSS", self.rss_bytes) if self.device == "cpu" else ("peak reserved", self.reserved_bytes)

    def to_dict(self) -> dict:
        return {"device": self.device, "allocated_bytes": self.allocated_bytes, "reserved_bytes": self.reserved_bytes,
                "process_bytes": self.process_bytes, "rss_bytes": self.rss_bytes}


# glibc keeps freed chunks of a step's transient tensors mapped (10% of them), and the first training
# step makes one-time allocations that are no tensors (oneDNN's primitive cache, autograd's engine,
# OpenMP thread stacks): 48 MiB. Calibrated on the demo, the Qwen2.5-0.5B shape (QLoRA and LoRA, T=128)
# and the CLI test's run; measured/predicted in docs/memory.md.
CPU_HEAP_MARGIN = 0.10
CPU_RUNTIME_BYTES = 48 * 2**20


def predict_run_memory(cfg, model, precision=None, seq_len: Optional[int] = None,
                       process_rss_bytes: Optional[int] = None, world_size: int = 1,
                       strategy: str = "none") -> MemoryPrediction:
    """The run's MemoryPrediction (class docstring), per rank of `world_size` under `strategy`; on CPU
    `process_rss_bytes` is the process's resident set just before training (utils/memory.current_rss_bytes)."""
    from .estimate import FRAGMENTATION_MARGIN

    s = settings_for_run(cfg, model, precision, seq_len)
    if world_size > 1:
        s = replace(s, world_size=world_size, strategy=strategy if strategy in ("ddp", "fsdp2") else "ddp")
    est = estimate(model, s)
    allocated = est.peak_allocated_bytes
    if est.settings.device == "cuda":
        return MemoryPrediction("cuda", allocated, reserved_bytes=int(allocated * (1 + FRAGMENTATION_MARGIN)))
    held = est.components["frozen_weights"] + est.components["trainable_weights"]  # resident before training
    process = max(0, (process_rss_bytes or 0) - held)
    transient = allocated - held
    return MemoryPrediction("cpu", allocated, process_bytes=process,
                            rss_bytes=process + allocated + int(CPU_HEAP_MARGIN * transient) + CPU_RUNTIME_BYTES)


def predict_for_run(cfg, model, precision=None, seq_len: Optional[int] = None) -> int:
    """Predicted peak allocated bytes of a training step of `cfg` on the loaded `model` (adapted or
    not), with rows of `seq_len` tokens (default: data.max_seq_len; pass the dataset's longest
    tokenized row). Compare with torch.cuda.max_memory_allocated (predict_run_memory has the figures
    to compare with peak RSS and max_memory_reserved)."""
    return estimate(model, settings_for_run(cfg, model, precision, seq_len)).peak_allocated_bytes
