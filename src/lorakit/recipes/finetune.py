"""`lorakit train`, top to bottom: config -> precision -> model -> fast paths -> LoRA -> data -> train -> report.

Each line of `finetune` is one decision or one stage of the data path (DESIGN.md); follow any of
them down a layer and nothing jumps back up:

    precision   decided once for the run (lorakit/precision.py), passed to load, train and the planner
    load        lorakit/model/load.py: safetensors shards streamed, quantized tensor by tensor
    set-up      train/setup.py: gradient checkpointing, checkpoint replay, lean modules, by name
    LoRA        lora/inject.py: LoRALinear around the target layers, everything else frozen
    data        data/: read -> format -> tokenize + mask (the batches are made by the loop)
    memory      memory/planner.py: the predicted peak (and the micro-batch with train.fit_memory)
    train       train/loop.py: the explicit loop over TrainStep (train/step.py) calls
    report      report/: run_info.json (with this run's one memory prediction) and report.html
"""

from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass, replace

import torch

from ..config import ConfigError, RunConfig, add_run_arguments, config_from_args
from ..data import build_examples, load_records, pad_token_id, split_records, stats_text
from ..lora.init import weight_preparer
from ..lora.inject import add_lora, format_trainable
from ..memory.planner import MemoryPrediction, parse_size, plan_micro_batch, predict_run_memory, settings_for_run
from ..model.load import load_from_config
from ..precision import Precision, run_precision
from ..report.html import write_report
from ..report.summary import write_run_info
from ..train import distributed
from ..train.loop import TrainResult, train
from ..train.setup import FastPaths, describe_fast_paths, prepare_for_training
from ..utils.fs import check_output_folder
from ..utils.memory import current_rss_bytes

log = logging.getLogger("lorakit")


@dataclass
class FinetuneOutput:
    result: TrainResult
    model: object
    tokenizer: object
    memory: MemoryPrediction = None  # the planner's prediction for this run (also in run_info.json)
    precision: Precision = None

    @property
    def predicted_peak_bytes(self) -> int:
        """The predicted figure of the same kind as result.peak_memory_bytes (RSS on CPU, reserved on CUDA)."""
        return self.memory.headline[1]


def prepare_data(cfg: RunConfig, tokenizer):
    """Read, split and tokenize the training (and validation) rows; log what was kept and dropped."""
    records = load_records(cfg.data.path)
    if cfg.data.val_path:
        train_rows, val_rows = records, load_records(cfg.data.val_path)
    else:
        train_rows, val_rows = split_records(records, cfg.data.val_size, cfg.train.seed)
    train_ex, train_stats = build_examples(train_rows, tokenizer, cfg.data)
    check_objective_data(cfg, train_stats.format)
    log.info("train data: %s", stats_text(train_stats))
    val_ex = []
    if val_rows:
        val_ex, val_stats = build_examples(val_rows, tokenizer, cfg.data)
        log.info("validation data: %s", stats_text(val_stats))
    return train_ex, val_ex


def check_objective_data(cfg: RunConfig, fmt: str) -> None:
    """train.objective dpo / orpo train on preference pairs, sft on single examples."""
    pairs = fmt == "preference"
    if cfg.train.objective == "sft" and pairs:
        raise ConfigError(f"{cfg.data.path}: the rows are preference pairs (prompt, chosen, rejected); train them "
                          "with train.objective=dpo or orpo (or give single examples for sft)")
    if cfg.train.objective != "sft" and not pairs:
        raise ConfigError(f"train.objective={cfg.train.objective} needs preference pairs (fields prompt, chosen, "
                          f"rejected), but {cfg.data.path} has format {fmt!r}; docs/preference.md")


def finetune(cfg: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> FinetuneOutput:
    ctx = distributed.setup(cfg.train.dist_timeout_s)  # one process, or this rank of a torchrun job
    distributed.on_main(lambda: check_output_folder(cfg.train.output_dir, "run", overwrite, resume), ctx)  # before loading
    device = ctx.device
    precision = run_precision(cfg, device)
    fast = FastPaths.from_config(cfg.model)
    with fast.kernel_scope():
        # lora.init pissa/olora: the residual is computed as each 16-bit weight loads (and quantized)
        model, tokenizer = load_from_config(cfg.model, precision.compute_dtype, device,
                                            prepare=weight_preparer(cfg.lora))
        if tokenizer is None:
            raise FileNotFoundError(f"{cfg.model.name_or_path}: no tokenizer files; training needs the model's tokenizer")
        applied = prepare_for_training(model, cfg.model.gradient_checkpointing, fast)
        torch.manual_seed(cfg.train.seed)  # the LoRA initialisation is part of the run's seed
        add_lora(model, cfg.lora)
        log.info("%s; precision: %s", format_trainable(model), precision.describe())
        log.info("fast paths: %s", describe_fast_paths(model, fast, applied))
        train_ex, val_ex = prepare_data(cfg, tokenizer)
        seq_len = cfg.data.max_seq_len if cfg.data.pack else max(  # the longest row (pairs: either side)
            max(len(e["input_ids"]), len(e.get("rejected_input_ids", ()))) for e in train_ex + val_ex)
        if cfg.train.fit_memory:
            cfg = fit_micro_batch(cfg, model, precision, seq_len)
        ctx.strategy = choose_strategy(cfg, model, precision, seq_len, ctx)  # ddp / fsdp2 on several ranks
        predicted = predict_run_memory(cfg, model, precision, seq_len, process_rss_bytes=current_rss_bytes(),
                                       world_size=ctx.world_size, strategy=ctx.strategy)
        result = train(model, train_ex, val_ex, cfg, pad_id=pad_token_id(tokenizer), resume=resume,
                       progress=progress, overwrite=overwrite, precision=precision, fast=fast, tokenizer=tokenizer,
                       dist=ctx)
    log.debug("memory: %s", describe_memory(predicted, result))  # `lorakit train` prints it; Run.summary has it
    if ctx.is_main:
        write_run_info(result.run_dir, model, predicted.headline[1], predicted.to_dict())  # this run's one prediction
        write_report(result.run_dir)                      # report.html, self-contained
    distributed.barrier(ctx)
    return FinetuneOutput(result, model, tokenizer, predicted, precision)


def choose_strategy(cfg: RunConfig, model, precision: Precision, seq_len: int, ctx) -> str:
    """train.distributed on several ranks: "auto" asks the planner whether one device holds the run
    (CUDA: the device's memory; CPU: the host's, which DDP's processes share)."""
    if not ctx.enabled:
        return "none"
    fits = True
    if cfg.train.distributed == "auto" and ctx.device.type == "cuda":
        from ..memory.estimate import estimate

        need = estimate(model, settings_for_run(cfg, model, precision, seq_len)).total_bytes
        fits = need <= torch.cuda.mem_get_info(ctx.device)[1]
    strategy = distributed.resolve_strategy(cfg.train.distributed, ctx, fits)
    if strategy == "fsdp2" and cfg.train.optimizer != "adamw_torch":
        raise ConfigError(f"train.optimizer={cfg.train.optimizer!r} with train.distributed=fsdp2: lorakit's 8-bit "
                          "and paged optimizers keep state per local tensor, not per sharded parameter; use adamw_torch "
                          "(LoRA's optimizer state is small) or train.distributed=ddp")
    log.info("distributed: %d ranks, %s", ctx.world_size, strategy)
    return strategy


def describe_memory(predicted: MemoryPrediction, result: TrainResult) -> str:
    """'peak RSS 1216 MiB measured, 1190 MiB predicted (process 520 + tensors 650 + heap 20; 1.02x)'
    - like for like; on CUDA reserved and allocated each beside its own prediction."""
    mib = lambda b: f"{b / 2**20:.0f} MiB"
    label, want = predicted.headline
    got = result.peak_memory_bytes
    text = f"{label} {mib(got)} measured, {mib(want)} predicted ({got / want:.2f}x"
    if predicted.device == "cpu":
        heap = want - predicted.process_bytes - predicted.allocated_bytes
        return text + f"; predicted = process {mib(predicted.process_bytes)} + tensors {mib(predicted.allocated_bytes)} + heap and runtime {mib(heap)})"
    return text + f"); peak allocated {mib(result.peak_allocated_bytes)} measured, {mib(predicted.allocated_bytes)} predicted"


def fit_micro_batch(cfg: RunConfig, model, precision: Precision, seq_len: int) -> RunConfig:
    """Largest micro-batch the memory planner predicts to fit train.fit_memory, keeping the
    effective batch (micro_batch_size * grad_accum) by raising grad_accum."""
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum
    budget = parse_size(cfg.train.fit_memory)
    micro, accum, total = plan_micro_batch(model, settings_for_run(cfg, model, precision, seq_len), budget, effective)
    log.info("fit %s: micro_batch_size %d x grad_accum %d (predicted %.0f MiB)", cfg.train.fit_memory, micro, accum,
             total / 2**20)
    return replace(cfg, train=replace(cfg.train, micro_batch_size=micro, grad_accum=accum))


# ------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in train.output_dir")
    p.add_argument("--overwrite", action="store_true",
                   help="start again in a train.output_dir that holds a previous lorakit run (only lorakit's files "
                        "there are replaced); without it lorakit writes only into a new or empty folder")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics still go to metrics.jsonl)")


def main(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    try:
        out = finetune(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    finally:
        distributed.teardown()
    if distributed.launched() and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    r = out.result
    print(f"{r.stopped_reason}: {r.steps} steps in {r.seconds:.1f} s, {r.tokens_per_s:.0f} tokens/s")
    if r.best_val_loss is not None:
        print(f"best validation loss {r.best_val_loss:.4f} at step {r.best_step} -> {r.run_dir / 'best_adapter'}")
    print(f"final adapter -> {r.run_dir / 'adapter'}; metrics -> {r.run_dir / 'metrics.jsonl'}")
    print(f"memory: {describe_memory(out.memory, r)}")
    print(f"report -> {r.run_dir / 'report.html'}")
    return 0
