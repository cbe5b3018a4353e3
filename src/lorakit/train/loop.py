"""The training loop, written out: accumulate, clip, step, schedule, evaluate, early-stop, checkpoint.

Data order (data/batches.py): the training rows form one continuous stream of micro-batches; optimizer
step k consumes micro-batches k*grad_accum ... (k+1)*grad_accum - 1 of it, so the data position of a
checkpoint is just its step, and a resumed run sees exactly the batches an uninterrupted one would.

Loss normalisation: the loss of a step is sum(CE over all supervised tokens of its micro-batches) /
(their number), so 4 micro-batches of 1 give the same gradient as one batch of 4 whatever the
lengths (dividing each micro-batch by its own count would weight short examples up). The counts
come from the host copies of the labels, so no micro-batch waits on the device to know them.

The forward and loss of every micro-batch is one call of a TrainStep module (train/step.py).
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
from ..lora.io import save_adapter
from ..model.modules import model_device
from ..precision import Precision, check_model_precision, model_precision
from ..utils.fs import claim_folder
from .checkpoint import RUN_FILES, latest_checkpoint, load_checkpoint, prune_checkpoints, save_checkpoint, set_rng_state
from .log import MetricsWriter, peak_memory_bytes, plot_loss_curve
from .loss import count_supervised
from .neftune import install_neftune
from .optim import build_optimizer, param_groups
from .schedule import build_scheduler
from .setup import FastPaths
from .step import TrainStep

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
    peak_memory_bytes: int


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
                         n_sup: Optional[int] = None) -> tuple[float, int]:
    """Backward over the micro-batches of one optimizer step; returns (mean loss, supervised tokens).

    Each micro-batch contributes CE_sum / N_step where N_step (`n_sup`, counted on the host copies
    of the labels when given) counts the supervised tokens of all micro-batches of the step, so the
    accumulated gradient is that of one big batch. The loss is read back once, after the last one.
    """
    if n_sup is None:
        n_sup = sum(count_supervised(b["labels"]) for b in micro)
    loss_sum = None
    for b in micro:
        part, _ = step(b)
        scaled = part / max(n_sup, 1)
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum = part.detach() if loss_sum is None else loss_sum + part.detach()
    return float(loss_sum) / max(n_sup, 1), n_sup


@torch.no_grad()
def evaluate(step: nn.Module, batches: Batches, device: torch.device) -> float:
    """Mean CE per supervised token over the whole validation set."""
    was_training = step.training
    step.eval()
    total, n = None, 0
    for i in range(len(batches)):
        b = batches[i]
        n += count_supervised(b["labels"])
        part, _ = step(to_device(b, device))
        total = part if total is None else total + part
    step.train(was_training)
    return float(total) / max(n, 1) if total is not None else float("nan")


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
          precision: Optional[Precision] = None, fast: Optional[FastPaths] = None) -> TrainResult:
    """Train the LoRA parameters of `model` (already adapted) and write the run folder: a new or
    empty folder, a previous run with `resume` (continued) or `overwrite` (its files replaced;
    anything else in the folder stays), see utils/fs.py. `precision` is the recipe's decision
    (default: the model's own dtype, checked against train.precision); `fast`: the fused loss."""
    import yaml
    from tqdm.auto import tqdm

    tc = cfg.train
    device = model_device(model)
    if precision is None:
        precision = model_precision(model, cfg)
    check_model_precision(model, precision)
    run_dir = claim_folder(tc.output_dir, "run", RUN_FILES, overwrite=overwrite, resume=resume)
    fast = fast or FastPaths.from_config(cfg.model)
    step_fn = TrainStep(model, tc.loss_chunk_size, fused_loss=fast.fused_loss)  # forward + loss, one module
    torch.manual_seed(tc.seed)  # dropout; the data order has its own generator (data/batches.py)
    data = Batches(train_examples, tc.micro_batch_size, tc.seed, pad_id, cfg.data.pack, cfg.data.max_seq_len)
    val = Batches(val_examples, tc.micro_batch_size, tc.seed, pad_id, shuffle=False) if val_examples else None
    total_steps = total_steps_for(cfg, len(data))
    params = [p for p in model.parameters() if p.requires_grad]
    groups = param_groups(model, tc.lr, tc.loraplus_lr_ratio)  # LoRA+: B at ratio x lr (train/optim.py)
    optimizer = build_optimizer(groups, tc.optimizer, lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = build_scheduler(optimizer, total_steps, tc.warmup_steps, tc.schedule)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.loss_scaling)
    config_yaml = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    (run_dir / "run_config.yaml").write_text(config_yaml, encoding="utf-8")

    state = {"step": 0, "best_val": None, "best_step": None, "bad_evals": 0, "last_eval": None,
             "seconds": 0.0, "tokens": 0}
    ckpt = latest_checkpoint(run_dir) if resume else None
    metrics = MetricsWriter(run_dir, resume=ckpt is not None)
    if ckpt is not None:
        saved = load_checkpoint(ckpt, model)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        state = saved["loop"]
        set_rng_state(saved["rng"])
        metrics.truncate_after(state["step"])
        log.info("resumed from %s (step %d of %d)", ckpt, state["step"], total_steps)
    elif resume:
        log.info("no checkpoint in %s: starting from step 0", run_dir)

    step_fn.train()
    neftune = install_neftune(model, tc.neftune_alpha)  # train/neftune.py: noise in training mode only
    bar = tqdm(total=total_steps, initial=state["step"], disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    # time and tokens count across resumed sessions (the state carries the earlier sessions' part)
    t0, tokens_seen, bad_in_row, stopped, reason = time.perf_counter() - state["seconds"], state["tokens"], 0, False, "completed"
    loss_value, window = float("nan"), []
    while state["step"] < total_steps:
        step = state["step"]
        host = [data[step * tc.grad_accum + j] for j in range(tc.grad_accum)]
        n_sup = sum(count_supervised(b["labels"]) for b in host)
        tokens_seen += sum(tokens_in(b) for b in host)
        micro = [to_device(b, device) for b in host]
        loss_value, _ = accumulate_gradients(step_fn, micro, scaler, n_sup)
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm if tc.max_grad_norm > 0 else float("inf"))
        if not (math.isfinite(loss_value) and math.isfinite(float(grad_norm))):
            bad_in_row += 1
            where = first_nonfinite_module(step_fn, micro[0])
            warnings.warn(f"step {step + 1}: non-finite {'loss' if not math.isfinite(loss_value) else 'gradient'}; "
                          f"skipping the update (first non-finite output: {where})", stacklevel=2)
            optimizer.zero_grad(set_to_none=True)
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
        scheduler.step()
        state["step"] = step = step + 1
        window.append(loss_value)
        elapsed = time.perf_counter() - t0
        if step % tc.log_every == 0 or step == total_steps:
            metrics.write({"step": step, "loss": loss_value, "lr": scheduler.get_last_lr()[0],
                           "grad_norm": float(grad_norm), "tokens_per_s": tokens_seen / max(elapsed, 1e-9),
                           "supervised_tokens": n_sup})
        bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        tok_s=f"{tokens_seen / max(elapsed, 1e-9):.0f}")
        bar.update(1)
        if val is not None and ((tc.eval_every and step % tc.eval_every == 0) or step == total_steps):
            stop = _evaluate_and_track(step_fn, val, device, tc, state, window, metrics, run_dir, step)
            window = []
            if stop:
                stopped, reason = True, (f"early stopping: no validation improvement of {tc.early_stopping_min_delta} "
                                         f"in {tc.early_stopping_patience} evaluations (best {state['best_val']:.4f} "
                                         f"at step {state['best_step']})")
        if (tc.save_every and step % tc.save_every == 0) or step == total_steps or stopped:
            state["seconds"], state["tokens"] = time.perf_counter() - t0, tokens_seen
            save_checkpoint(run_dir, step, model, {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                                   "scaler": scaler.state_dict(), "loop": dict(state)}, config_yaml)
            best = run_dir / f"checkpoint-{state['best_step']:06d}" if state["best_step"] else None
            prune_checkpoints(run_dir, tc.keep_last, keep=best)
        if stopped:
            break
    bar.close()
    neftune.remove()
    elapsed = time.perf_counter() - t0
    if not (stopped and reason.startswith("stopped:")):  # never overwrite with a diverged adapter
        save_adapter(model, run_dir / "adapter", overwrite=True)
    peak = peak_memory_bytes(device)
    metrics.write({"step": state["step"], "event": "end", "reason": reason, "peak_memory_bytes": peak,
                   "seconds": elapsed, "best_val_loss": state["best_val"], "best_step": state["best_step"]})
    metrics.close()
    plot_loss_curve(run_dir)
    log.info("%s after %d steps in %.1f s; peak memory %.1f MiB", reason, state["step"], elapsed, peak / 2**20)
    return TrainResult(run_dir, state["step"], loss_value, state["best_val"], state["best_step"], stopped, reason,
                       tokens_seen / max(elapsed, 1e-9), elapsed, peak)


def _evaluate_and_track(step_fn, val, device, tc, state, window, metrics, run_dir, step) -> bool:
    """Evaluate, keep the best adapter, warn on overfitting; True when early stopping triggers."""
    val_loss = evaluate(step_fn, val, device)
    train_mean = sum(window) / max(len(window), 1)
    metrics.write({"step": step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0)), "train_loss_mean": train_mean})
    last = state["last_eval"]
    if last is not None and val_loss > last[0] and train_mean < last[1]:
        warnings.warn(f"step {step}: validation loss rose {last[0]:.4f} -> {val_loss:.4f} while training loss fell "
                      f"{last[1]:.4f} -> {train_mean:.4f}: the adapter is starting to overfit (consider fewer steps, "
                      f"a lower rank or lr, more dropout, or early stopping)", stacklevel=2)
    state["last_eval"] = (val_loss, train_mean)
    if state["best_val"] is None or val_loss < state["best_val"] - tc.early_stopping_min_delta:
        state["best_val"], state["best_step"], state["bad_evals"] = val_loss, step, 0
        save_adapter(step_fn.model, run_dir / "best_adapter", overwrite=True)
        return False
    state["bad_evals"] += 1
    return bool(tc.early_stopping_patience) and state["bad_evals"] >= tc.early_stopping_patience
