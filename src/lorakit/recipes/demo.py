"""`lorakit demo`: QLoRA end to end on the built-in tiny model and task, on CPU, offline.

    base model (NF4 + double quant)  -> exact match on held-out rows (before)
    finetune (LoRA on the 4-bit base, validation + best adapter)
    adapter model                    -> exact match (after)
    merge (fp32 on dequantized weights) -> plain 16-bit folder -> reload in plain transformers
    reloaded model                   -> same answers?

The model, tokenizer and data ship in lorakit/assets/demo (made by scripts/make_demo_assets.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path


from ..config import DataConfig, LoraConfig, ModelConfig, RunConfig, TrainConfig
from ..data import load_records
from ..lora.io import load_adapter
from ..lora.merge import merge
from ..model.load import load_model
from ..utils.fs import atomic_file, check_output_folder, output_folder, read_manifest
from .finetune import finetune
from .generate import exact_match, generate, prompt_and_answer

log = logging.getLogger("lorakit")
ASSETS = Path(__file__).resolve().parents[1] / "assets" / "demo"
N_TEST = 120  # held-out rows scored by exact match (the issue asks for at least 100)
MAX_NEW_TOKENS = 24


def demo_config(out: str) -> RunConfig:
    """The demo's run: hyperparameters measured in assets/demo/README.md."""
    return RunConfig(
        model=ModelConfig(name_or_path=str(ASSETS / "model"), quantization="nf4", double_quant=True),
        lora=LoraConfig(r=16, alpha=32, dropout=0.0, target_modules="all-linear"),
        data=DataConfig(path=str(ASSETS / "train.jsonl"), format="dolly", template="alpaca_short", val_size=64,
                        max_seq_len=128),
        train=TrainConfig(output_dir=out, max_steps=150, micro_batch_size=16, lr=2e-3, warmup_steps=10,
                          schedule="cosine", eval_every=50, save_every=150, keep_last=1, seed=0, log_every=5),
    )


def _answers(model, tokenizer, prompts: list[str]) -> list[str]:
    return [a.strip() for a in generate(model, tokenizer, prompts, MAX_NEW_TOKENS, max_batch=32)]


def _show(title: str, prompts_answers: list[tuple[str, str]], preds: list[str], n: int = 3) -> None:
    print(f"\n{title}")
    for (prompt, ref), pred in list(zip(prompts_answers, preds))[:n]:
        instruction = prompt.split("### Instruction:\n")[-1].split("\n\n")[0]
        mark = "ok " if pred == ref.strip() else "bad"
        print(f"  [{mark}] {instruction!r:60.60} -> {pred!r} (want {ref.strip()!r})")


def run_demo(out: str = "runs/demo", progress: bool = True, overwrite: bool = False) -> int:
    """The demo; `out` must be new or empty, or a previous demo run (replaced: the demo is meant to be
    run again), or with `overwrite` a previous lorakit run."""
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    cfg = demo_config(out)
    previous = read_manifest(out)
    if previous is not None and previous["kind"] == "run" and (Path(out) / "demo_summary.json").is_file():
        log.info("replacing the previous demo run in %s (only the files lorakit wrote there)", out)
        overwrite = True
    check_output_folder(out, "run", overwrite)
    rows = load_records(str(ASSETS / "test.jsonl"))[:N_TEST]
    base, tokenizer = load_model(cfg.model.name_or_path, quantization="nf4", double_quant=True)
    pairs = [prompt_and_answer(r, "dolly", tokenizer, cfg.data.template) for r in rows]
    prompts, refs = [p for p, _ in pairs], [a for _, a in pairs]
    before = _answers(base, tokenizer, prompts)
    em_before = exact_match(before, refs)
    _show(f"before fine-tuning: exact match {100 * em_before:.1f}% on {len(rows)} held-out rows", pairs, before)
    del base

    result = finetune(cfg, progress=progress, overwrite=overwrite)
    model, run = result.model, result.result.run_dir
    if result.result.best_step is not None:
        load_adapter(model, run / "best_adapter")  # keep the best validation checkpoint
    after = _answers(model, tokenizer, prompts)
    em_after = exact_match(after, refs)
    _show(f"after fine-tuning (4-bit base + LoRA): exact match {100 * em_after:.1f}%", pairs, after)

    sample = tokenizer(prompts[0] + refs[0], return_tensors="pt")["input_ids"]
    # top-1 over every position of one row, prompt included, where an untrained model has near-ties
    merged = merge(model, verify=sample, max_kl=1e-3, min_top1=0.95)
    with output_folder(run / "merged", "merge", overwrite=True) as tmp:  # inside the demo's own run folder
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    reloaded = AutoModelForCausalLM.from_pretrained(run / "merged")
    again = _answers(reloaded, tokenizer, prompts)
    same = sum(a == b for a, b in zip(after, again)) / len(after)
    em_merged = exact_match(again, refs)
    seconds = time.perf_counter() - t0
    summary = {"exact_match_before": em_before, "exact_match_after": em_after, "exact_match_merged": em_merged,
               "same_answers_after_merge": same, "merge_check": str(merged.lorakit_merge_report),
               "best_val_loss": result.result.best_val_loss, "train_seconds": result.result.seconds,
               "total_seconds": seconds, "peak_memory_bytes": result.result.peak_memory_bytes, "n_test": len(rows)}
    with atomic_file(run / "demo_summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\n{merged.lorakit_merge_report}")
    print(f"merged model reloaded in plain transformers from {run / 'merged'}: exact match {100 * em_merged:.1f}%, "
          f"same answers as the adapter model on {100 * same:.1f}% of rows")
    print(f"exact match {100 * em_before:.1f}% -> {100 * em_after:.1f}% in {seconds:.0f} s "
          f"(training {result.result.seconds:.0f} s, peak memory {result.result.peak_memory_bytes / 2**20:.0f} MiB)")
    print(f"adapter: {run / 'adapter'}   best: {run / 'best_adapter'}   loss curve: {run / 'loss_curve.png'}")
    ok = em_after >= 0.8 and em_before <= 0.2 and same >= 0.95
    return 0 if ok else 1


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="runs/demo", help="run folder (a previous demo run there is replaced)")
    p.add_argument("--overwrite", action="store_true", help="also replace a previous (non-demo) lorakit run in --out")
    p.add_argument("--no-progress", action="store_true")


def main(args: argparse.Namespace) -> int:
    return run_demo(args.out, progress=not args.no_progress, overwrite=args.overwrite)
