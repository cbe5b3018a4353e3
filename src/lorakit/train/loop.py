"""The training loop, written out: accumulate, clip, step, schedule, evaluate, early-stop, checkpoint.

Data order (data/batches.py): the training rows form one continuous stream of micro-batches; optimizer
step k consumes micro-batches k*grad_accum ... (k+1)*grad_accum - 1 of it, so the data position of a
checkpoint is just its step, and a resumed run sees exactly the batches an uninterrupted one would.

Loss normalisation: the loss of a step is sum(CE over all supervised tokens of its micro-batches) /
(their number), so 4 micro-batches of 1 give the same gradient as one batch of 4 whatever the
lengths (dividing each micro-batch by its own count would weight short examples up). The counts
come from the host copies of the labels, so no micro-batch waits on the device to know them.

The forward and loss of every micro-batch is one call of a TrainStep module (train/step.py); what
it minimises is train.objective (train/objectives.py: SFT, DPO, ORPO), whose units (supervised tokens,
or preference pairs) are the denominator above, and whose metrics (DPO's rewards/*) are written
beside the loss.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..config import RunConfig, to_dict
from ..data.batches import Batches
from ..lora.io import adapter_state_dict, save_adapter
from ..model.modules import model_device
from ..precision import Precision, check_model_precision, model_precision
from ..utils.fs import claim_folder
from .checkpoint import (RUN_FILES, latest_checkpoint, load_checkpoint, prune_checkpoints, rng_state, save_checkpoint,
                         set_rng_state)
from .distributed import (DistContext, all_reduce, barrier, clip_grad_norm, gather_objects, gradient_sync,
                          load_optimizer_state, on_main, optimizer_state, unwrap, wrap)
from .log import MetricsWriter, NullWriter, peak_memory, plot_loss_curve, reset_peak_memory
from .objectives import build_objective, loss_units, reference_logps
from .neftune import install_neftune
from .optim import build_optimizer, param_groups
from .schedule import build_scheduler
from .progress import Progress
from .samples import Samples
from .setup import FastPaths
from .step import TrainStep
from .trackers import open_trackers

log = logging.getLogger("lorakit")


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    final_train_loss: float
    best_val_loss: Optional[float]
    best_step: Optional[int]
    stopped_early: bool
    stopped_reason: str
    tokens_per_s: float
    seconds: float
    peak_memory_bytes: int  # the headline measured peak: RSS on CPU, max_memory_reserved on CUDA (train/log.py)
    peak_allocated_bytes: Optional[int] = None  # CUDA: max_memory_allocated


def total_steps_for(cfg: RunConfig, micro_batches_per_epoch: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.ceil(cfg.train.epochs * micro_batches_per_epoch / cfg.train.grad_accum))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


def tokens_in(batch: dict) -> int:
    """Real (not padding) tokens of a host-side batch, for tokens/s."""
    return int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()


def accumulate_gradients(step: nn.Module, micro: list[dict], scaler: Optional[torch.amp.GradScaler] = None,
                         n_sup: Optional[int] = None, ctx: Optional[DistContext] = None) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (mean loss, units), both over
    every rank.

    Each micro-batch contributes loss_sum / N_step where N_step counts the units (supervised tokens;
    DPO / ORPO: pairs) of all micro-batches of the step on every rank (`n_sup`: counted on the host
    copies of the batches and all-reduced when given), so the accumulated gradient is that of one big batch. On W ranks the
    part is multiplied by W: the wrappers average the ranks' gradients. Gradients are synchronised
    on the last micro-batch only. The loss is read back once, after the last one.
    """
    ctx = ctx or DistContext()
    if n_sup is None:
        n_sup = int(all_reduce([sum(loss_units(b) for b in micro)], ctx)[0])
    loss_sum = None
    for j, b in enumerate(micro):
        with gradient_sync(step, ctx, last=j == len(micro) - 1):
            part, _ = step(b)
            scaled = part * (ctx.world_size / max(n_sup, 1))
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
    return all_reduce([float(loss_sum)], ctx)[0] / max(n_sup, 1), n_sup


@torch.no_grad()
def evaluate(step: nn.Module, batches: Batches, device: torch.device, ctx: Optional[DistContext] = None,
             stats: Optional[dict] = None) -> float:
    """Mean loss per unit (SFT: CE per supervised token; DPO / ORPO: loss per pair) over the whole
    validation set (every rank's share, all-reduced); `stats`, when given, receives the objective's
    metrics over the same set (DPO: rewards/accuracies, ...)."""
    ctx = ctx or DistContext()
    was_training = step.training
    step.eval()
    unwrap(step).take_stats()  # only this evaluation's sums
    total, n = None, 0
    for i in range(len(batches)):
        b = batches[i]
        n += loss_units(b)
        part, _ = step(to_device(b, device))
        total = part if total is None else total + part
    step.train(was_training)
    sums = unwrap(step).take_stats()
    values = all_reduce([float(total) if total is not None else 0.0, n] + host_values(sums), ctx)
    total, n = values[:2]
    if stats is not None:
        stats.update({k: v / n if n else float("nan") for k, v in zip(sums, values[2:])})
    return total / n if n else float("nan")


def host_values(sums: dict) -> list[float]:
    """The metric sums as floats, read from the device in one transfer (one sync, not one per metric)."""
    return torch.stack([v.float() for v in sums.values()]).tolist() if sums else []


def step_metrics(step_fn: "TrainStep", n_units: int, ctx: DistContext) -> dict:
    """The objective's metrics of the last optimizer step, per unit over every rank (empty for SFT)."""
    sums = step_fn.take_stats()
    if not sums:
        return {}
    values = all_reduce(host_values(sums), ctx)
    return {k: v / max(n_units, 1) for k, v in zip(sums, values)}


@torch.no_grad()
def with_reference_logps(step_fn: "TrainStep", examples: list[dict], micro_batch_size: int, pad_id: int,
                         device: torch.device) -> list[dict]:
    """train.precompute_ref_logps: each pair with its reference log-probabilities (chosen, rejected),
    from one no-grad pass over the examples with the adapters off (train/objectives.py). Every rank
    computes all of them, before any wrapping (no collectives)."""
    batches = Batches(examples, micro_batch_size, 0, pad_id, shuffle=False)
    out = []
    for i in range(len(batches)):
        ref = reference_logps(step_fn, to_device(batches[i], device)).cpu()          # [2b]
        half = ref.shape[0] // 2
        for j, ex in enumerate(examples[i * micro_batch_size:(i + 1) * micro_batch_size]):
            out.append({**ex, "ref_logps": (float(ref[j]), float(ref[half + j]))})
    return out


def _loss_scale_overflow(scaler: torch.amp.GradScaler, loss: float, grad_norm: float) -> bool:
    """True when a loss scaler is on, the loss is finite, the gradients are not, and the scale is still
    above 1 (a scale pushed below 1 means the gradients really diverge: counted as a bad step)."""
    return (scaler.is_enabled() and math.isfinite(loss) and not math.isfinite(grad_norm)
            and scaler.get_scale() > 1.0)


def first_nonfinite_module(step: TrainStep, batch: dict) -> str:
    """Re-run the forward pass with hooks; the name of the first module whose output is non-finite."""
    found: list[str] = []

    def hook(name):
        def fn(_module, _inputs, output):
            t = output[0] if isinstance(output, (tuple, list)) else output
            if not found and isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
                found.append(name)
        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in step.model.named_modules() if n]
    try:
        with torch.no_grad():
            step(batch)
    finally:
        for h in handles:
            h.remove()
    return found[0] if found else "(the loss itself: every module output was finite)"


def train(model: nn.Module, train_examples: list[dict], val_examples: list[dict], cfg: RunConfig,
          pad_id: int, resume: bool = False, progress: bool = True, overwrite: bool = False,
          precision: Optional[Precision] = None, fast: Optional[FastPaths] = None, tokenizer=None,
          dist: Optional[DistContext] = None) -> TrainResult:
    """Train the LoRA parameters of `model` (already adapted) and write the run folder: a new or
    empty folder, a previous run with `resume` (continued) or `overwrite` (its files replaced;
    anything else in the folder stays), see utils/fs.py. `precision` is the recipe's decision
    (default: the model's own dtype, checked against train.precision); `fast`: the fused loss;
    `tokenizer`: for the sample answers written at evaluations (train/samples.py); `dist`: this
    process's rank and strategy (train/distributed.py; default: one process). Rank 0 writes."""
    import yaml

    tc = cfg.train
    ctx = dist or DistContext(device=model_device(model))
    device = model_device(model)
    if precision is None:
        precision = model_precision(model, cfg)
    check_model_precision(model, precision)
    run_dir = on_main(lambda: claim_folder(tc.output_dir, "run", RUN_FILES, overwrite=overwrite, resume=resume), ctx)
    fast = fast or FastPaths.from_config(cfg.model)
    objective = build_objective(tc)                                                # sft / dpo / orpo
    step_fn = TrainStep(model, tc.loss_chunk_size, fused_loss=fast.fused_loss, objective=objective)  # one module
    if objective.needs_reference and tc.precompute_ref_logps:
        train_examples = with_reference_logps(step_fn, train_examples, tc.micro_batch_size, pad_id, device)
        val_examples = with_reference_logps(step_fn, val_examples, tc.micro_batch_size, pad_id, device)
        log.info("reference log-probabilities computed for %d + %d pairs", len(train_examples), len(val_examples))
    data = Batches(train_examples, tc.micro_batch_size, tc.seed, pad_id, cfg.data.pack, cfg.data.max_seq_len,
                   rank=ctx.rank, world_size=ctx.world_size)
    val = (Batches(val_examples, tc.micro_batch_size, tc.seed, pad_id, shuffle=False, rank=ctx.rank,
                   world_size=ctx.world_size) if val_examples else None)
    total_steps = total_steps_for(cfg, len(data))
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    ckpt = on_main(lambda: latest_checkpoint(run_dir) if resume else None, ctx)
    saved = load_checkpoint(ckpt, model) if ckpt is not None else None  # the adapter, before any wrapping
    torch.manual_seed(tc.seed + ctx.rank)  # dropout (per rank); the data order has its own generator
    wrapped = wrap(step_fn, ctx, tc.fsdp_reshard_after_forward)                # what DDP / FSDP2 run
    groups = param_groups(model, tc.lr, tc.loraplus_lr_ratio)  # after wrapping (FSDP2's sharded parameters);
    params = [p for g in groups for p in (g["params"] if isinstance(g, dict) else [g])]  # LoRA+: B at ratio x lr
    optimizer = build_optimizer(groups, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, tc.warmup_steps, tc.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.loss_scaling)
    global_batch = tc.micro_batch_size * tc.grad_accum * ctx.world_size
    state = {"step": 0, "best_val": None, "best_step": None, "bad_evals": 0, "last_eval": None,
             "seconds": 0.0, "tokens": 0, "global_batch": global_batch}
    if ctx.is_main:
        (run_dir / "run_config.yaml").write_text(config_yaml, encoding="utf-8")
    metrics = MetricsWriter(run_dir, resume=ckpt is not None, trackers=open_trackers(tc.report_to, run_dir, to_dict(cfg))) \
        if ctx.is_main else NullWriter()
    samples = Samples(run_dir, val_examples, tokenizer if ctx.is_main and ctx.strategy != "fsdp2" else None,
                      tc.num_samples if tc.sample_every else 0, tc.sample_max_new_tokens, resume=ckpt is not None)
    if saved is not None:
        state = _restore(saved, optimizer, scheduler, scaler, ctx, metrics, samples, global_batch)
        log.info("resumed from %s (step %d of %d)", ckpt, state["step"], total_steps)
    elif resume:
        log.info("no checkpoint in %s: starting from step 0", run_dir)

    wrapped.train()
    reset_peak_memory(device)  # the run's peak, not the load's (nor a previous run's in this process)
    bar = Progress(total_steps, initial=state["step"], enabled=progress and ctx.is_main)
    neftune = install_neftune(model, tc.neftune_alpha)  # train/neftune.py: noise in training mode only
    # time and tokens count across resumed sessions (the state carries the earlier sessions' part)
    t0, tokens_seen, bad_in_row, stopped, reason = time.perf_counter() - state["seconds"], state["tokens"], 0, False, "completed"
    loss_value, window = float("nan"), []
    while state["step"] < total_steps:
        step = state["step"]
        host = [data[step * tc.grad_accum + j] for j in range(tc.grad_accum)]
        n_sup, tokens = all_reduce([sum(loss_units(b) for b in host), sum(tokens_in(b) for b in host)], ctx)
        tokens_seen += int(tokens)
        micro = [to_device(b, device) for b in host]
        loss_value, _ = accumulate_gradients(wrapped, micro, scaler, int(n_sup), ctx)
        extra = step_metrics(step_fn, int(n_sup), ctx)  # DPO / ORPO: rewards/*, logps/* (TRL's names)
        scaler.unscale_(optimizer)
        grad_norm = clip_grad_norm(params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"), ctx)
        stepped = True
        if _loss_scale_overflow(scaler, loss_value, grad_norm):
            # fp16: the scaled backward overflowed, the loss did not: the scaler skips this update and
            # halves its scale (expected early in fp16 training; not divergence, no diagnostics)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            stepped = False
            log.info("step %d: fp16 gradient overflow, update skipped; loss scale -> %g", step + 1, scaler.get_scale())
        elif not (math.isfinite(loss_value) and math.isfinite(grad_norm)):  # the same verdict on every rank
            bad_in_row += 1
            where = first_nonfinite_module(step_fn, micro[0])
            warnings.warn(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'}; "
                          f"skipping the update (first non-finite output: {where})", stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
            stepped = False
            scaler.update() if precision.loss_scaling else None
            if bad_in_row >= tc.max_bad_steps:
                stopped, reason = True, (f"stopped: {bad_in_row} non-finite steps in a row (first non-finite output: "
                                         f"{where}); the last good checkpoint is intact. Lower train.lr or use fp32/bf16.")
                break
        else:
            bad_in_row = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
        if stepped:  # the schedule follows the updates that happened
            scheduler.step()
        state["step"] = step = step + 1
        window.append(loss_value)
        elapsed = time.perf_counter() - t0
        if step % tc.log_every == 0 or step == total_steps:
            metrics.write({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": grad_norm, "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                           ("supervised_tokens" if objective.name == "sft" else "pairs"): int(n_sup), **extra})
        bar.update(step, loss_value, scheduler.get_last_lr()[0], tokens_seen / max(elapsed, 1e-9))
        if val is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == total_steps):
            eval_step = unwrap(wrapped) if ctx.strategy == "ddp" else wrapped  # no collectives in a DDP eval
            stop = _evaluate_and_track(eval_step, val, device, tc, state, window, metrics, run_dir, step, ctx)
            state["evals"] = state.get("evals", 0) + 1
            if tc.sample_every and (state["evals"] - 1) % tc.sample_every == 0:
                samples.write(model, step)
            window = []
            if stop:
                stopped, reason = True, (f"early stopping: no validation improvement of {tc.early_stopping_min_delta} "
                                         f"in {tc.early_stopping_patience} evaluations (best {state['best_val']:.4f} "
                                         f"at step {state['best_step']})")
        if (tc.save_every and step % tc.save_every == 0) or step == total_steps or stopped:
            state["seconds"], state["tokens"] = time.perf_counter() - t0, tokens_seen
            _save(run_dir, step, model, optimizer, scheduler, scaler, state, config_yaml, tc, ctx)
        if stopped:
            break
    bar.close()
    neftune.remove()
    elapsed = time.perf_counter() - t0
    if not (stopped and reason.startswith("stopped:")):  # never overwrite with a diverged adapter
        _save_adapter(model, run_dir / "adapter", ctx)
    local = peak_memory(device)
    peaks = {k: int(v) for k, v in zip(local, all_reduce(list(local.values()), ctx, "max"))}  # the busiest rank
    peak = peaks["peak_memory_bytes"]
    metrics.write({"step": state["step"], "event": "end", "reason": reason, **peaks, "world_size": ctx.world_size,
                   "seconds": elapsed, "best_val_loss": state["best_val"], "best_step": state["best_step"]})
    metrics.close()
    samples.close()
    if ctx.is_main:
        plot_loss_curve(run_dir)
    barrier(ctx)
    log.info("%s after %d steps in %.1f s; peak memory %.1f MiB", reason, state["step"], elapsed, peak / 2**20)
    return TrainResult(run_dir, state["step"], loss_value, state["best_val"], state["best_step"], stopped, reason,
                       tokens_seen / max(elapsed, 1e-9), elapsed, peak, peaks.get("peak_allocated_bytes"))


def _restore(saved: dict, optimizer, scheduler, scaler, ctx: DistContext, metrics, samples, global_batch: int) -> dict:
    """Optimizer, schedule, loss scale, loop state and this rank's RNG from a checkpoint (the adapter
    is already loaded); the run files drop what was written after it."""
    load_optimizer_state(optimizer, saved["optimizer"], ctx)
    scheduler.load_state_dict(saved["scheduler"])
    scaler.load_state_dict(saved["scaler"])
    state = saved["loop"]
    ranks = saved.get("rng_per_rank") or [saved["rng"]]
    if len(ranks) != ctx.world_size:
        log.info("resuming %d ranks from a checkpoint of %d: dropout's random streams start anew", ctx.world_size, len(ranks))
    set_rng_state(ranks[ctx.rank % len(ranks)], ctx.device)
    if state.get("global_batch", global_batch) != global_batch:
        warnings.warn(f"resuming with a global batch of {global_batch} rows per step (micro_batch_size x grad_accum x "
                      f"ranks) where the checkpoint had {state['global_batch']}: the data order and the loss scale of a "
                      "step change from here on", stacklevel=3)
        state["global_batch"] = global_batch
    metrics.truncate_after(state["step"])
    samples.truncate_after(state["step"])
    return state


def _save(run_dir, step, model, optimizer, scheduler, scaler, state, config_yaml, tc, ctx: DistContext) -> None:
    """A checkpoint: the whole adapter and optimizer state gathered from every rank, each rank's RNG;
    rank 0 writes it (atomically) and prunes old ones; everyone waits for it."""
    adapter = adapter_state_dict(model)           # collective under FSDP2
    optim = optimizer_state(optimizer, ctx)      # collective under FSDP2
    rngs = gather_objects(rng_state(model_device(model)), ctx)
    if ctx.is_main:
        save_checkpoint(run_dir, step, model, {"optimizer": optim, "scheduler": scheduler.state_dict(),
                                               "scaler": scaler.state_dict(), "loop": dict(state),
                                               "rng_per_rank": rngs}, config_yaml, adapter=adapter)
        best = run_dir / f"checkpoint-{state['best_step']:06d}" if state["best_step"] else None
        prune_checkpoints(run_dir, tc.keep_last, keep=best)
    barrier(ctx)


def _save_adapter(model, path, ctx: DistContext) -> None:
    tensors = adapter_state_dict(model)  # collective under FSDP2
    if ctx.is_main:
        save_adapter(model, path, overwrite=True, tensors=tensors)
    barrier(ctx)


def _evaluate_and_track(step_fn, val, device, tc, state, window, metrics, run_dir, step, ctx) -> bool:
    """Evaluate, keep the best adapter, warn on overfitting; True when early stopping triggers (the
    same on every rank: the validation loss is all-reduced)."""
    extra: dict = {}
    val_loss = evaluate(step_fn, val, device, ctx, extra)
    train_mean = sum(window) / max(len(window), 1)
    record = {"step": step, "val_loss": val_loss, "train_loss_mean": train_mean, **{f"eval_{k}": v for k, v in extra.items()}}
    if not extra:  # a perplexity only means something for the token cross-entropy
        record["val_ppl"] = math.exp(min(val_loss, 50.0))
    metrics.write(record)
    last = state["last_eval"]
    if last is not None and val_loss > last[0] and train_mean < last[1] and ctx.is_main:
        warnings.warn(f"step {step}: validation loss rose {last[0]:.4f} -> {val_loss:.4f} while training loss fell "
                      f"{last[1]:.4f} -> {train_mean:.4f}: the adapter is starting to overfit (consider fewer steps, "
                      f"a lower rank or lr, more dropout, or early stopping)", stacklevel=2)
    state["last_eval"] = (val_loss, train_mean)
    if state["best_val"] is None or val_loss < state["best_val"] - tc.early_stopping_min_delta:
        state["best_val"], state["best_step"], state["bad_evals"] = val_loss, step, 0
        _save_adapter(unwrap(step_fn).model, run_dir / "best_adapter", ctx)
        return False
    state["bad_evals"] += 1
    return bool(tc.early_stopping_patience) and state["bad_evals"] >= tc.early_stopping_patience
