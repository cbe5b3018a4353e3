"""The fine-tuning recipe, top to bottom: config -> model -> LoRA -> data -> train -> adapter."""

from __future__ import annotations

import logging

import torch
from dataclasses import dataclass, replace

from ..config import RunConfig
from ..data import build_examples, load_records, split_records, stats_text
from ..lora.inject import add_lora, format_trainable
from ..memory.planner import parse_size, plan_micro_batch, predict_for_run, settings_for_run
from ..model.load import load_model, prepare_for_training
from ..report.html import write_report
from ..report.summary import write_run_info
from ..train.loop import TrainResult, train
from ..utils.fs import check_output_folder

log = logging.getLogger("lorakit")


@dataclass
class FinetuneOutput:
    result: TrainResult
    model: object
    tokenizer: object
    predicted_peak_bytes: int = 0  # memory planner's prediction of the peak allocated bytes


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
    m = cfg.model
    check_output_folder(cfg.train.output_dir, "run", overwrite, resume)  # before loading, not after
    model, tokenizer = load_model(m.name_or_path, quantization=m.quantization, double_quant=m.double_quant,
                                  compute_dtype=cfg.train.precision, blocksize=m.blocksize,
                                  skip_modules=m.skip_modules, trust_remote_code=m.trust_remote_code,
                                  mmap_embeddings=m.mmap_embeddings)
    if tokenizer is None:
        raise FileNotFoundError(f"{m.name_or_path}: no tokenizer files; training needs the model's tokenizer")
    prepare_for_training(model, m.gradient_checkpointing, m.checkpoint_replay, m.lean_activations)
    torch.manual_seed(cfg.train.seed)  # the LoRA initialisation is part of the run's seed
    add_lora(model, cfg.lora)
    log.info("%s", format_trainable(model))
    train_ex, val_ex = prepare_data(cfg, tokenizer)
    longest = max(len(e["input_ids"]) for e in train_ex + val_ex)
    if cfg.train.fit_memory:
        cfg = fit_micro_batch(cfg, model, longest)
    predicted = predict_for_run(cfg, model, seq_len=cfg.data.max_seq_len if cfg.data.pack else longest)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(model, train_ex, val_ex, cfg, pad_id=pad_id, resume=resume, progress=progress, overwrite=overwrite)
    measure = "peak allocated" if torch.cuda.is_available() else "peak RSS (includes the process itself)"
    log.info("memory: predicted peak allocated %.0f MiB; measured %s %.0f MiB",
             predicted / 2**20, measure, result.peak_memory_bytes / 2**20)
    write_run_info(result.run_dir, cfg, model)  # trainable parameters, predicted peak memory
    write_report(result.run_dir)                 # report.html, self-contained
    return FinetuneOutput(result, model, tokenizer, predicted)


def fit_micro_batch(cfg: RunConfig, model, seq_len: int) -> RunConfig:
    """Largest micro-batch the memory planner predicts to fit train.fit_memory, keeping the
    effective batch (micro_batch_size * grad_accum) by raising grad_accum."""
    effective = cfg.train.micro_batch_size * cfg.train.grad_accum
    budget = parse_size(cfg.train.fit_memory)
    micro, accum, total = plan_micro_batch(model, settings_for_run(cfg, model, seq_len), budget, effective)
    log.info("fit %s: micro_batch_size %d x grad_accum %d (predicted %.0f MiB)", cfg.train.fit_memory, micro, accum,
             total / 2**20)
    return replace(cfg, train=replace(cfg.train, micro_batch_size=micro, grad_accum=accum))
