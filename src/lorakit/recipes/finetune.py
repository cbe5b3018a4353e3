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
from dataclasses import dataclass, replace

import torch

from ..config import RunConfig, add_run_arguments, config_from_args
from ..data import build_examples, load_records, pad_token_id, split_records, stats_text
from ..lora.init import weight_preparer
from ..lora.inject import add_lora, format_trainable
from ..memory.planner import parse_size, plan_micro_batch, predict_for_run, settings_for_run
from ..model.load import default_device, load_from_config
from ..precision import Precision, run_precision
from ..report.html import write_report
from ..report.summary import write_run_info
from ..train.loop import TrainResult, train
from ..train.setup import FastPaths, describe_fast_paths, prepare_for_training
from ..utils.fs import check_output_folder

log = logging.getLogger("lorakit")


@dataclass
class FinetuneOutput:
    result: TrainResult
    model: object
    tokenizer: object
    predicted_peak_bytes: int = 0  # the memory planner's prediction for this run (also in run_info.json)
    precision: Precision = None


def prepare_data(cfg: RunConfig, tokenizer):
    """Read, split and tokenize the training (and validation) rows; log what was kept and dropped."""
    records = load_records(cfg.data.path)
    if cfg.data.val_path:
        train_rows, val_rows = records, load_records(cfg.data.val_path)
    else:
        train_rows, val_rows = split_records(records, cfg.data.val_size, cfg.train.seed)
    train_ex, train_stats = build_examples(train_rows, tokenizer, cfg.data)
    log.info("train data: %s", stats_text(train_stats))
    val_ex = []
    if val_rows:
        val_ex, val_stats = build_examples(val_rows, tokenizer, cfg.data)
        log.info("validation data: %s", stats_text(val_stats))
    return train_ex, val_ex


def finetune(cfg: RunConfig, resume: bool = False, progress: bool = True, overwrite: bool = False) -> FinetuneOutput:
    check_output_folder(cfg.train.output_dir, "run", overwrite, resume)  # before minutes of loading, not after
    device = default_device()
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
        seq_len = cfg.data.max_seq_len if cfg.data.pack else max(len(e["input_ids"]) for e in train_ex + val_ex)
        if cfg.train.fit_memory:
            cfg = fit_micro_batch(cfg, model, precision, seq_len)
        predicted = predict_for_run(cfg, model, precision, seq_len)
        result = train(model, train_ex, val_ex, cfg, pad_id=pad_token_id(tokenizer), resume=resume,
                       progress=progress, overwrite=overwrite, precision=precision, fast=fast)
    measure = "peak allocated" if device.type == "cuda" else "peak RSS (includes the process itself)"
    log.info("memory: predicted peak allocated %.0f MiB; measured %s %.0f MiB",
             predicted / 2**20, measure, result.peak_memory_bytes / 2**20)
    write_run_info(result.run_dir, model, predicted)  # trainable parameters, this run's memory prediction
    write_report(result.run_dir)                      # report.html, self-contained
    return FinetuneOutput(result, model, tokenizer, predicted, precision)


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
    out = finetune(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    r = out.result
    print(f"{r.stopped_reason}: {r.steps} steps in {r.seconds:.1f} s, {r.tokens_per_s:.0f} tokens/s")
    if r.best_val_loss is not None:
        print(f"best validation loss {r.best_val_loss:.4f} at step {r.best_step} -> {r.run_dir / 'best_adapter'}")
    print(f"final adapter -> {r.run_dir / 'adapter'}; metrics -> {r.run_dir / 'metrics.jsonl'}")
    print(f"peak memory {r.peak_memory_bytes / 2**20:.0f} MiB measured, {out.predicted_peak_bytes / 2**20:.0f} MiB "
          f"predicted allocated (on CPU the measure is peak RSS, which includes the process itself)")
    print(f"report -> {r.run_dir / 'report.html'}")
    return 0
