"""Training on several processes with torch.distributed: rank, world size and every collective lorakit
uses, in one place. One process is the special case world_size == 1 (no process group, no wrapper,
every collective an identity).

Launch: `torchrun --nproc-per-node N -m lorakit train ...` (or --nnodes / rendezvous flags as torchrun
has them). torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT; `setup` reads them and
starts the process group: gloo on CPU, nccl on CUDA (one GPU per process, cuda:LOCAL_RANK), with a
timeout on every collective (train.dist_timeout_s) so a rank that hangs brings the job down with an
error instead of a silent wait. torchrun ends every rank when one of them fails.

Strategies (train.distributed):

    ddp     DistributedDataParallel around the TrainStep: every rank holds the whole (4-bit) base,
            gradients are all-reduced. broadcast_buffers=False: the 4-bit codes and their scales are
            buffers, identical on every rank (quantization is deterministic); DDP would otherwise
            re-broadcast them before every forward.
    fsdp2   torch.distributed.fsdp.fully_shard: each decoder layer one unit, the TrainStep the root
            (embeddings, final norm, head). The packed 4-bit codes become frozen uint8 parameters so
            they are sharded by rows (1/W of them per rank); their QuantState stays replicated
            buffers (~3% of the codes with double quantization). LoRA weights, their gradients and
            the optimizer state are sharded too.

The loop keeps one process's semantics exactly: with W ranks, micro-batch m and accumulation G,
an optimizer step sees the global batch one process would see with micro-batch m*W; the loss is
normalised by the supervised tokens of the whole global step (all-reduced before any backward),
and each rank backpropagates CE_sum * W / N because both wrappers average gradients over ranks.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from torch import nn

from ..config import ConfigError

log = logging.getLogger("lorakit")
STRATEGIES = ("auto", "ddp", "fsdp2")


@dataclass
class DistContext:
    """Where this process stands: rank r of `world_size`, its device, and the strategy in force."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    strategy: str = "none"  # "none" (one process), "ddp" or "fsdp2"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launched() -> bool:
    """True when torchrun (or another launcher) started this process as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(timeout_s: float = 600, device_type: Optional[str] = None) -> DistContext:
    """The process group from torchrun's environment (a no-op context for one process)."""
    if not launched():
        device = torch.device(device_type or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return DistContext(device=device)
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    cuda = (device_type or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if cuda:
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s))
    device = torch.device("cuda", local) if cuda else torch.device("cpu")
    if rank != 0:  # rank 0 tells the story; the others speak up only for warnings and errors
        logging.getLogger("lorakit").setLevel(logging.WARNING)
    return DistContext(rank, world, local, device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# ------------------------------------------------------------------ collectives (identity for one process)


def all_reduce(values: list[float], ctx: DistContext, op: str = "sum") -> list[float]:
    """Sum (or max) a few numbers over ranks, in fp64 on the CPU side of the group."""
    if not ctx.enabled:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device(ctx))
    dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
    return t.tolist()


def broadcast(obj, ctx: DistContext, src: int = 0):
    """`obj` of rank `src` on every rank (any picklable value lorakit made itself)."""
    if not ctx.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_comm_device(ctx))
    return box[0]


def gather_objects(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.enabled:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def on_main(fn, ctx: DistContext):
    """Run fn() on rank 0 only and return its result everywhere; an exception there is raised on every
    rank (as the same type when lorakit knows it), so no rank is left waiting at the next collective.
    In one process fn() just runs: its exception keeps its own type (OutputError) and traceback."""
    if not ctx.enabled:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
            error = (type(e).__name__, str(e))
    result, error = broadcast((result, error), ctx)
    if error is not None:
        kind = {"ConfigError": ConfigError, "FileNotFoundError": FileNotFoundError}.get(error[0], ValueError)
        raise kind(error[1])
    return result


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")


# ------------------------------------------------------------------ wrapping the step


def resolve_strategy(requested: str, ctx: DistContext, fits_one_device: bool) -> str:
    """train.distributed "auto": fsdp2 when the planner says the frozen base does not fit one device,
    else ddp; an explicit choice as it is. "none" for one process."""
    if requested not in STRATEGIES:
        raise ConfigError(f"train.distributed={requested!r} is not allowed; choose one of {', '.join(STRATEGIES)}")
    if not ctx.enabled:
        return "none"
    if requested == "auto":
        return "ddp" if fits_one_device else "fsdp2"
    return requested


def shard_4bit_codes(model: nn.Module) -> int:
    """Make every Linear4bit's packed codes a frozen uint8 parameter (same name, same bytes), so
    fully_shard shards them by rows; the QuantState tensors stay buffers (replicated). Returns how
    many layers changed."""
    from ..quant.linear4bit import Linear4bit

    count = 0
    for m in model.modules():
        if isinstance(m, Linear4bit) and "weight_packed" in m._buffers:
            packed = m._buffers.pop("weight_packed")
            m.register_parameter("weight_packed", nn.Parameter(packed, requires_grad=False))
            count += 1
    return count


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of a transformers causal LM (model.model.layers, GPT-2's transformer.h)."""
    for path in ("model.layers", "model.model.layers", "transformer.h", "gpt_neox.layers"):
        module = model
        try:
            for part in path.split("."):
                module = getattr(module, part)
        except AttributeError:
            continue
        if isinstance(module, nn.ModuleList):
            return list(module)
    raise ConfigError(f"train.distributed=fsdp2: cannot find the decoder layers of {type(model).__name__}")


def wrap(step: nn.Module, ctx: DistContext, reshard_after_forward: bool = True) -> nn.Module:
    """The TrainStep as the strategy runs it (module docstring); `step` itself for one process."""
    if ctx.strategy == "ddp":
        import warnings

        from torch.nn.parallel import DistributedDataParallel

        with warnings.catch_warnings():  # torch >= 2.12 calls broadcast_buffers deprecated; its successor
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*")  # still syncs at init
            return DistributedDataParallel(step, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                           broadcast_buffers=False, find_unused_parameters=False,
                                           gradient_as_bucket_view=True)
    if ctx.strategy == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))  # explicit: a CPU mesh for gloo
        shard_4bit_codes(step.model)
        total = sum(p.numel() for n, p in step.named_parameters() if n.endswith("weight_packed"))
        for layer in decoder_layers(step.model):
            fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(step, mesh=mesh, reshard_after_forward=False)  # the root: embeddings, norm, head
        if total:
            held = sum(_local(p).numel() for n, p in step.named_parameters() if n.endswith("weight_packed"))
            log.info("fsdp2: this rank holds %d of %d bytes of 4-bit codes (%.3f of them)", held, total, held / total)
        return step
    return step


def unwrap(module: nn.Module) -> nn.Module:
    """The TrainStep inside a DDP wrapper (FSDP2 keeps the module itself)."""
    return getattr(module, "module", module)


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, ctx: DistContext, last: bool) -> Iterator[None]:
    """Accumulation: all-reduce / reduce-scatter the gradients only on the last micro-batch of a step."""
    if ctx.strategy == "ddp" and not last:
        with wrapped.no_sync():
            yield
        return
    if ctx.strategy == "fsdp2":
        wrapped.set_requires_gradient_sync(last)
    yield


# ------------------------------------------------------------------ gradients and state


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, ctx: DistContext) -> float:
    """The global gradient norm over every rank's parameters (sharded gradients: each shard's sum of
    squares all-reduced; replicated ones counted once), then clipped to `max_norm` (inf: no clipping).
    Returns the norm before clipping, the same float on every rank."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = [g for g in grads if hasattr(g, "to_local")]
    if not sharded:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    local = sum(float(_local(g).float().pow(2).sum()) for g in sharded)
    replicated = sum(float(g.float().pow(2).sum()) for g in grads if not hasattr(g, "to_local"))
    total = (all_reduce([local], ctx)[0] + replicated) ** 0.5
    if max_norm < float("inf") and total > max_norm:
        scale = max_norm / (total + 1e-6)
        for g in grads:
            _local(g).mul_(scale)
    return total


def full_tensors(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sharded (DTensor) values gathered whole, a collective every rank must call; the rest as they are."""
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in tensors.items()}


def optimizer_state(optimizer: torch.optim.Optimizer, ctx: DistContext) -> dict:
    """optimizer.state_dict() as one process has it (parameters numbered in order, whole tensors):
    under FSDP2 each sharded moment is gathered (a collective every rank calls in the same order),
    so a checkpoint resumes on any number of ranks."""
    sd = optimizer.state_dict()
    if ctx.strategy == "fsdp2":
        sd["state"] = {k: {n: (v.full_tensor() if hasattr(v, "full_tensor") else v) for n, v in st.items()}
                       for k, st in sd["state"].items()}
    return sd


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, ctx: DistContext) -> None:
    """Inverse of optimizer_state: whole moments are cut into this rank's shards of their parameters
    (locally, no communication: every rank read the same file)."""
    if ctx.strategy == "fsdp2":
        from torch.distributed.tensor import distribute_tensor

        params = [p for g in optimizer.param_groups for p in g["params"]]
        state = {**state, "state": dict(state["state"])}
        for k, st in state["state"].items():
            p = params[int(k)]
            if hasattr(p, "device_mesh"):
                st = {n: (distribute_tensor(v, p.device_mesh, p.placements, src_data_rank=None)
                          if torch.is_tensor(v) and v.shape == p.shape else v) for n, v in st.items()}
            state["state"][k] = st
    optimizer.load_state_dict(state)
