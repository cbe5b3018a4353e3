"""The fine-tuning recipe, top to bottom: config -> model -> LoRA -> data -> train -> adapter."""

from __future__ import annotations

import logging

import torch
from dataclasses import dataclass

from ..config import RunConfig
from ..data import build_examples, load_records, split_records, stats_text
from ..lora.inject import add_lora, format_trainable
from ..model.load import enable_gradient_checkpointing, load_model
from ..report.html import write_report
from ..report.summary import write_run_info
from ..train.loop import TrainResult, train

log = logging.getLogger("lorakit")


@dataclass
class FinetuneOutput:
    result: TrainResult
    model: object
    tokenizer: object


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


def finetune(cfg: RunConfig, resume: bool = False, progress: bool = True) -> FinetuneOutput:
    m = cfg.model
    model, tokenizer = load_model(m.name_or_path, quantization=m.quantization, double_quant=m.double_quant,
                                  compute_dtype=cfg.train.precision, blocksize=m.blocksize,
                                  skip_modules=m.skip_modules, trust_remote_code=m.trust_remote_code)
    if tokenizer is None:
        raise FileNotFoundError(f"{m.name_or_path}: no tokenizer files; training needs the model's tokenizer")
    if m.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    torch.manual_seed(cfg.train.seed)  # the LoRA initialisation is part of the run's seed
    add_lora(model, cfg.lora)
    log.info("%s", format_trainable(model))
    train_ex, val_ex = prepare_data(cfg, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    result = train(model, train_ex, val_ex, cfg, pad_id=pad_id, resume=resume, progress=progress)
    write_run_info(result.run_dir, cfg, model)  # trainable parameters, predicted peak memory
    write_report(result.run_dir)                 # report.html, self-contained
    return FinetuneOutput(result, model, tokenizer)
