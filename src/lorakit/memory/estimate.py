"""Predict the peak memory of one training step, component by component.

    peak = frozen weights + trainable weights + gradients + optimizer state      (held all run)
         + activations saved for backward + logits/loss buffers + workspace      (during a step)
    total = peak + runtime overhead                                              (what must fit)

Every persistent component is counted tensor by tensor as lorakit stores it (4-bit codes and
QuantState tensors as `Linear4bit` holds them, LoRA A/B in the adapter dtype, optimizer state as
`train/optim.py` keeps it). Activations are the tensors autograd saves in each decoder layer,
enumerated in `activations.py`. The prediction is what `torch.cuda.max_memory_allocated` (or, on
CPU, the allocator's live bytes) reads at the peak of a step; `total` adds what the allocator
cannot see (the CUDA context) and a margin for fragmentation of the caching allocator.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Union

from ..config import OPTIMIZERS
from ..dtypes import FLOAT_DTYPES, itemsize
from .activations import activation_bytes, loss_buffer_bytes, workspace_bytes
from .shapes import ModelShape, resolve_shape

METHODS = ("full", "lora", "qlora")
DTYPES = tuple(FLOAT_DTYPES)  # compute dtype names: bf16, fp16, fp32
DEVICES = ("cuda", "cpu")

# CUDA context + library handles live outside the caching allocator, so max_memory_allocated never
# shows them; nvidia-smi shows ~300-600 MiB per process for CUDA 12 + cuBLAS (PyTorch notes,
# "Memory management": "the CUDA context ... typically 300-500 MB"). We take the upper end.
CUDA_CONTEXT_BYTES = 512 * 2**20
# The caching allocator keeps freed blocks for reuse; reserved exceeds allocated by a few percent
# in steady training. 10% of the allocated peak is our margin for that (and for estimate error).
FRAGMENTATION_MARGIN = 0.10
# NCCL keeps its own buffers outside the caching allocator: a few hundred MiB per process for the
# rings and channels of one node (NCCL docs on NCCL_BUFFSIZE, 4 MiB per channel per peer; not yet
# measured here). Counted once per rank of a multi-GPU run.
NCCL_BYTES = 256 * 2**20
COMPONENTS = ("frozen_weights", "trainable_weights", "gradients", "optimizer_state", "activations",
              "logits_loss", "workspace", "runtime_overhead")


@dataclass(frozen=True)
class Settings:
    """How a run trains; field names mirror `lorakit estimate` flags and RunConfig fields."""

    method: str = "qlora"
    """full (every weight trains), lora (16-bit frozen base) or qlora (4-bit frozen base)."""
    seq_len: int = 512
    """Tokens per row; the estimate assumes every row is this long and every position supervised."""
    batch_size: int = 1
    """Micro-batch size (rows per forward/backward)."""
    rank: int = 16
    """LoRA rank r."""
    targets: Union[str, tuple[str, ...]] = "all-linear"
    """LoRA target modules, as lora.target_modules."""
    grad_ckpt: bool = False
    """Gradient checkpointing of every decoder layer."""
    optimizer: str = "adamw_torch"
    """One of train.optimizer's values."""
    dtype: str = "bf16"
    """Compute dtype of the frozen weights and activations: bf16, fp16 or fp32."""
    loss_chunk_size: int = 1024
    """Rows per chunk of the cross-entropy (train.loss_chunk_size)."""
    device: str = "cuda"
    """cuda: paged optimizer state lives in host memory; cpu: every tensor counts."""
    attn_impl: str = ""
    """sdpa or eager; empty = the model family's default."""
    quant_type: str = "nf4"
    double_quant: bool = True
    blocksize: int = 64
    skip_modules: tuple[str, ...] = ("lm_head",)
    lora_dropout: float = 0.0
    adapter_dtype: str = "float32"
    """float32 (lorakit's default) or compute."""
    ckpt_replay: bool = True
    """With grad_ckpt and QLoRA: small 4-bit outputs kept and replayed (model.checkpoint_replay)."""
    branch_dtype: str = "compute"
    """dtype of the LoRA branch's matmuls (lora.branch_dtype): compute (default) or adapter."""
    lean_activations: bool = True
    """Gated MLPs keep only their gate and up outputs for backward, RMSNorms their input as it is
    (model.lean_activations)."""
    fused_loss: bool = True
    """The fused head + cross-entropy of train/loss.py (off with model.fast_paths: false)."""
    world_size: int = 1
    """Ranks of a distributed run (train/distributed.py); the estimate is per rank."""
    strategy: str = "ddp"
    """With world_size > 1: "ddp" (every rank holds everything) or "fsdp2" (decoder layers' frozen
    weights, LoRA weights, gradients and optimizer state sharded over the ranks)."""
    mmap_embeddings: bool = False
    """CPU: the frozen input embedding is a copy-on-write map of its file (model.mmap_embeddings), so
    it is not allocated and only the rows a batch looks up become resident (untied embeddings only:
    a tied head reads every row)."""
    use_dora: bool = False
    """DoRA (lora.use_dora): a trainable magnitude [out] per adapted layer and a cached ||W||^2 row
    [out] fp32; in training each adapted layer keeps its direction output [tokens, out] for the
    magnitude's gradient (memory/activations.py)."""
    residual_init: bool = False
    """lora.init pissa/olora: each adapted layer keeps its initial A0, B0 (buffers, for the
    plain-LoRA conversion of lora/io.py)."""
    objective: str = "sft"
    """train.objective: sft, or dpo / orpo, whose micro-batch of batch_size pairs runs 2 x batch_size
    rows (chosen and rejected, one forward); dpo also runs a no-grad reference pass first (not with
    precompute_ref)."""
    precompute_ref: bool = False
    """dpo with train.precompute_ref_logps: no reference pass in the step."""

    def __post_init__(self):
        def check(name, value, allowed):
            if value not in allowed:
                raise ValueError(f"{name}={value!r} is not allowed; choose one of {', '.join(map(str, allowed))}")

        check("method", self.method, METHODS)
        check("optimizer", self.optimizer, OPTIMIZERS)
        check("dtype", self.dtype, DTYPES)
        check("device", self.device, DEVICES)
        check("attn_impl", self.attn_impl, ("", "sdpa", "eager"))
        check("adapter_dtype", self.adapter_dtype, ("float32", "compute"))
        check("branch_dtype", self.branch_dtype, ("compute", "adapter"))
        check("strategy", self.strategy, ("ddp", "fsdp2"))
        check("objective", self.objective, ("sft", "dpo", "orpo"))
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(f"world_size={self.world_size!r} is not allowed; it must be an integer >= 1")
        for name in ("seq_len", "batch_size", "rank", "loss_chunk_size", "blocksize"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed; it must be an integer >= 1")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} is not allowed; a causal-LM row needs >= 2 tokens")
        if isinstance(self.targets, list):
            object.__setattr__(self, "targets", tuple(self.targets))

    @property
    def compute_bytes(self) -> int:
        return itemsize(self.dtype)

    @property
    def adapter_bytes(self) -> int:
        return 4 if self.adapter_dtype == "float32" else self.compute_bytes

    @property
    def branch_bytes(self) -> int:
        """Bytes per element of the LoRA branch's activations (train.precision.lora_branch_dtype)."""
        return self.compute_bytes if self.branch_dtype == "compute" else self.adapter_bytes


@dataclass
class Estimate:
    model: str
    settings: Settings
    components: dict[str, int]
    n_params: int
    trainable_params: int
    details: dict = field(default_factory=dict)

    @property
    def peak_allocated_bytes(self) -> int:
        """What max_memory_allocated should read: every component but the runtime overhead."""
        return sum(v for k, v in self.components.items() if k != "runtime_overhead")

    @property
    def total_bytes(self) -> int:
        return sum(self.components.values())

    def to_dict(self) -> dict:
        from .shapes import gpu_table

        return {"model": self.model, "settings": asdict(self.settings), "n_params": self.n_params,
                "trainable_params": self.trainable_params, "components": dict(self.components),
                "peak_allocated_bytes": self.peak_allocated_bytes, "total_bytes": self.total_bytes,
                "fits": {gpu: self.total_bytes <= cap for gpu, cap in gpu_table().items()},
                "details": self.details}


# ---------------------------------------------------------------- which layers, how stored


EMBEDDING_NAMES = ("model.embed_tokens", "transformer.wte")  # the input embedding, as the supported families name it


def embedding_adapted(shape: ModelShape, targets) -> bool:
    """Does lora.target_modules name the input embedding (lora/embedding.py)? Never for all-linear."""
    from ..model.targets import ALL_LINEAR, name_matches

    return targets != ALL_LINEAR and any(name_matches(n, targets) for n in EMBEDDING_NAMES)


def adapted_layers(shape: ModelShape, targets) -> list[list[bool]]:
    """Per decoder layer, per entry of shape.linear_layers(): is it a LoRA target? Names are
    matched as `model.layers.{i}.{name}` with lora.target_modules semantics."""
    from ..model.targets import ALL_LINEAR, name_matches

    names = [n for n, *_ in shape.linear_layers()]
    if targets == ALL_LINEAR:
        return [[True] * len(names) for _ in range(shape.layers)]
    out = [[name_matches(f"model.layers.{i}.{n}", targets) for n in names] for i in range(shape.layers)]
    if not any(any(row) for row in out) and not embedding_adapted(shape, targets):
        raise ValueError(f"targets={targets!r} matches no linear layer; this model's layers are named "
                         f"{', '.join(n.split('.')[-1] for n in names)} (or use 'all-linear')")
    return out


def quant_state_bytes(out_f: int, in_f: int, s: Settings) -> int:
    """Bytes of one Linear4bit's QuantState tensors (absmax, code tables, nested parts, JSON blob),
    counted by `QuantState.nbytes` itself on meta tensors, so the two never disagree."""
    import torch

    from ..quant.nf4 import DOUBLE_QUANT_BLOCKSIZE
    from ..quant.state import QuantState

    n_blocks = math.ceil(out_f * in_f / s.blocksize)
    meta = dict(device="meta")
    dt = FLOAT_DTYPES[s.dtype]
    if s.double_quant:
        state = QuantState((out_f, in_f), dt, s.blocksize, s.quant_type, torch.empty(n_blocks, dtype=torch.uint8, **meta),
                           torch.empty(16, **meta), offset=torch.empty((), **meta),
                           absmax2=torch.empty(math.ceil(n_blocks / DOUBLE_QUANT_BLOCKSIZE), **meta),
                           code2=torch.empty(256, **meta), blocksize2=DOUBLE_QUANT_BLOCKSIZE)
    else:
        state = QuantState((out_f, in_f), dt, s.blocksize, s.quant_type, torch.empty(n_blocks, **meta),
                           torch.empty(16, **meta))
    return state.nbytes()


def linear4bit_bytes(out_f: int, in_f: int, s: Settings) -> int:
    """packed uint8 [out, in/2] + QuantState (Linear4bit.nbytes_weight)."""
    return out_f * in_f // 2 + quant_state_bytes(out_f, in_f, s)


def _weights(shape: ModelShape, s: Settings, adapted: list[list[bool]]) -> dict:
    """Frozen and trainable weight bytes and the trainable tensor sizes (for optimizer state)."""
    bc, ab = s.compute_bytes, s.adapter_bytes
    h = shape.hidden
    head = 0 if shape.tied else shape.vocab * h
    mapped = s.mmap_embeddings and s.device == "cpu" and not shape.tied and s.method != "full"
    embed = 0 if mapped else shape.vocab * h  # a mapped embedding is file pages, not allocated memory
    rotary = 2 * (shape.head_dim // 2) * 4  # inv_freq + original_inv_freq buffers, fp32
    frozen = rotary
    if s.method == "full":  # fp32 master weights train; a compute-dtype copy runs forward/backward
        n = shape.n_params()
        frozen += 0 if bc == 4 else n * bc
        return {"frozen": frozen, "trainable": 4 * n, "trainable_sizes": _full_tensor_sizes(shape), "grad_bytes": 4}
    root = frozen + (embed + head + h) * bc  # outside the decoder layers (FSDP2's root unit)
    trainable_sizes: list[int] = []
    layer_params, quant_states = [], 0  # per layer: bytes FSDP2 shards (codes, dense weights, norms)
    from ..model.targets import name_matches

    for i, row in enumerate(adapted):
        params = shape.norms_per_layer * h * bc
        for (name, in_f, out_f, bias), is_target in zip(shape.linear_layers(), row):
            if s.method == "qlora" and not name_matches(f"model.layers.{i}.{name}", s.skip_modules):
                params += out_f * in_f // 2
                quant_states += quant_state_bytes(out_f, in_f, s)  # buffers: replicated
            else:
                params += out_f * in_f * bc
            params += out_f * bc if bias else 0
            if is_target:
                trainable_sizes += [s.rank * in_f, out_f * s.rank] + ([out_f] if s.use_dora else [])
                quant_states += _variant_buffers(in_f, out_f, s)  # buffers too: replicated
        layer_params.append(params)
    if embedding_adapted(shape, s.targets):  # A [r, vocab], B [hidden, r] (+ m [hidden])
        trainable_sizes += [s.rank * shape.vocab, h * s.rank] + ([h] if s.use_dora else [])
        root += _variant_buffers(shape.vocab, h, s)
    return {"frozen": root + quant_states + sum(layer_params), "trainable": sum(trainable_sizes) * ab,
            "trainable_sizes": trainable_sizes, "grad_bytes": ab, "root": root, "quant_states": quant_states,
            "layer_params": layer_params}


def _variant_buffers(in_f: int, out_f: int, s: Settings) -> int:
    """Non-trainable buffers of one adapted layer: DoRA's ||W||^2 row (fp32 [out]) and, with a
    pissa/olora init, the initial A0 [r, in] and B0 [out, r] in the adapter dtype."""
    return (4 * out_f if s.use_dora else 0) + (s.rank * (in_f + out_f) * s.adapter_bytes if s.residual_init else 0)


def _full_tensor_sizes(shape: ModelShape) -> list[int]:
    sizes = [shape.vocab * shape.hidden] + ([] if shape.tied else [shape.vocab * shape.hidden]) + [shape.hidden]
    for _ in range(shape.layers):
        for _, in_f, out_f, bias in shape.linear_layers():
            sizes += [in_f * out_f] + ([out_f] if bias else [])
        sizes += [shape.hidden] * shape.norms_per_layer
    return sizes


def optimizer_state_bytes(sizes: list[int], param_bytes: int, s: Settings) -> int:
    """Bytes of optimizer state on the training device, per train/optim.py.

    adamw_torch: exp_avg + exp_avg_sq in the param dtype, + a 4-byte fp32 `step` tensor per param
    (torch.optim.AdamW with fused=True). lorakit AdamW: fp32 moments (8 B/param), or for tensors of
    >= MIN_8BIT_SIZE elements uint8 codes (2 B/param) + fp32 absmax per 256; `step` is an int.
    paged_*: the state lives in host memory, so on CUDA it costs no device memory.
    """
    from ..train.optim import BLOCKSIZE, MIN_8BIT_SIZE

    if s.optimizer.startswith("paged_") and s.device == "cuda":
        return 0
    if s.optimizer == "adamw_torch":
        return sum(2 * n * param_bytes + 4 for n in sizes)
    eight = s.optimizer.endswith("_8bit")
    total = 0
    for n in sizes:
        if eight and n >= MIN_8BIT_SIZE:
            total += 2 * n + 2 * 4 * math.ceil(n / BLOCKSIZE)
        else:
            total += 8 * n
    return total


def estimate(model, settings: Settings = Settings(), **overrides) -> Estimate:
    """Predict the peak memory of a training step of `model` (anything `resolve_shape` takes)."""
    s = replace(settings, **overrides) if overrides else settings
    pairs = s.objective != "sft"
    if pairs:  # a micro-batch of B pairs is 2B rows in one forward (train/objectives.py)
        s = replace(s, batch_size=2 * s.batch_size)
    shape = resolve_shape(model)
    if s.attn_impl:
        shape = replace(shape, attn_impl=s.attn_impl)
    adapted = adapted_layers(shape, s.targets) if s.method != "full" else [[True] * len(shape.linear_layers())] * shape.layers
    w = _weights(shape, s, adapted)
    sizes = w["trainable_sizes"]
    state = optimizer_state_bytes(sizes, w["grad_bytes"], s)
    act = activation_bytes(shape, s, adapted)
    loss = loss_buffer_bytes(shape, s)
    work = workspace_bytes(shape, s, adapted, act, loss)
    comps = {"frozen_weights": w["frozen"], "trainable_weights": w["trainable"], "gradients": w["trainable"],
             "optimizer_state": state, "activations": act["total"], "logits_loss": loss, "workspace": work["total"]}
    dist = {}
    if s.world_size > 1 and s.strategy == "fsdp2" and s.method != "full":
        comps, dist = _per_rank_fsdp2(comps, w, shape, s)
    allocated = sum(comps.values())
    context = CUDA_CONTEXT_BYTES if s.device == "cuda" else 0
    if s.world_size > 1 and s.device == "cuda":
        context += NCCL_BYTES
    # DPO's reference pass (no grad, before the policy's forward) holds one layer's transient
    # activations and a loss block at a time: below the step's own peak, so it adds time, not memory
    reference = act["per_layer"] + loss if s.objective == "dpo" and not s.precompute_ref else 0
    comps["runtime_overhead"] = context + int(FRAGMENTATION_MARGIN * allocated)
    trainable = sum(sizes)
    if pairs:
        s = replace(s, batch_size=s.batch_size // 2)  # report the pairs the user asked for
    return Estimate(shape.name, s, comps, shape.n_params(), trainable,
                    details={"activations": act, "workspace": work, "attn_impl": shape.attn_impl, "distributed": dist,
                             "rows_per_micro_batch": s.batch_size * (2 if pairs else 1), "reference_pass": reference})


def _per_rank_fsdp2(comps: dict, w: dict, shape: ModelShape, s: Settings) -> tuple[dict, dict]:
    """One rank's share under FSDP2 (train/distributed.py): each decoder layer's parameters (4-bit
    codes, dense weights, norms) and the LoRA weights, gradients and optimizer state are split over
    the ranks; the QuantState buffers and the root unit (embeddings, final norm, head: kept gathered
    from forward to backward) are whole on every rank; two layers' parameters are gathered at a time
    (the running one and the prefetched next), and one layer's LoRA gradients exist whole before
    their reduce-scatter."""
    world = s.world_size
    layers = w["layer_params"]
    per_layer_trainable = w["trainable"] // max(shape.layers, 1)
    frozen = w["root"] + w["quant_states"] + sum(layers) // world + 2 * max(layers)
    out = dict(comps, frozen_weights=frozen, trainable_weights=comps["trainable_weights"] // world,
               gradients=comps["gradients"] // world + per_layer_trainable,
               optimizer_state=comps["optimizer_state"] // world)
    return out, {"world_size": world, "strategy": "fsdp2", "sharded_layer_bytes": sum(layers),
                 "gathered_layer_bytes": 2 * max(layers), "replicated_bytes": w["root"] + w["quant_states"]}
