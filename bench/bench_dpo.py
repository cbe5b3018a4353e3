"""Preference tuning step: lorakit SFT / DPO / DPO with precomputed reference vs TRL DPOTrainer + PEFT, on CPU.

    python bench/bench_dpo.py                                           # small shape, defaults (~5 min)
    python bench/bench_dpo.py --pairs 4 --prompt-len 64 --answer-len 32 --steps 6 --warmup 2 --repeats 2
    python bench/bench_dpo.py --shape qwen2.5-0.5b --pairs 2 --repeats 1 --out /tmp/dpo.json
    python bench/bench_dpo.py --kinds lorakit-dpo trl-dpo --dtype fp32

What is measured. One optimizer step of LoRA training on a 16-bit base (no quantization: bitsandbytes
4-bit does not run on CPU), every configuration on the same checkpoint (random weights in a Qwen2
shape, bench/_common.py make_checkpoint, written once into bench/.cache/), the same synthetic
preference pairs, the same LoRA (r=16, alpha=32, dropout 0, all-linear, B = 0 at the start), the same
optimizer (torch AdamW, lr 2e-4, no weight decay, gradient clipping at 1.0, constant lr), no
gradient checkpointing, beta 0.1, loss sigmoid. Kinds:

    lorakit-sft-2B   SFT on the chosen answers, micro-batch of 2B rows (the DPO batch's row count and
                     tokens: the chosen sides of 2B pairs)
    lorakit-sft-B    SFT on the chosen answers, micro-batch of B rows (the chosen half of a DPO batch)
    lorakit-dpo      DPO, the reference pass (adapters off, no grad) inside every step
    lorakit-dpo-pre  DPO on batches carrying `ref_logps` (train.precompute_ref_logps): only the
                     policy pass is timed; the one-off precompute (loop.with_reference_logps over all
                     the pairs the child uses) is timed and reported separately
    trl-dpo          trl.DPOTrainer(model, peft_config=peft.LoraConfig(...), DPOConfig(loss_type
                     sigmoid, beta 0.1, precompute_ref_log_probs=False, gradient_checkpointing=False,
                     use_cpu, report_to none, max_length = the sequence length)), run with
                     trainer.train(); a callback times on_step_begin -> on_step_end, i.e. the
                     trainer's inner step: training_step (forward, reference forward, backward),
                     clip, optimizer.step, scheduler.step, zero_grad (batch collation happens before
                     on_step_begin and is not timed, as on the lorakit side)

A lorakit child drives the step the way train/loop.py does: lorakit.load_model + prepare_for_training
(default fast paths) + add_lora, TrainStep(objective=SFT() / DPO(0.1, "sigmoid")),
build_optimizer(param_groups(...)), then per step accumulate_gradients, step_metrics, clip_grad_norm,
optimizer.step, zero_grad. Batches are collated with lorakit's own collate / collate_pairs before the
timer starts.

Data: `--pairs` B pairs per micro-batch, each a prompt of `--prompt-len` P random token ids and two
different answers of `--answer-len` A random token ids, each followed by EOS; only the answers and
their EOS are supervised. Token ids are drawn from the tokenizer's vocabulary (the demo model's
tokenizer, src/lorakit/assets/demo/model, 892 tokens, fits both shapes' embeddings), so every row has
P + A + 1 tokens and no padding. Both sides get exactly these token lists: the lorakit side as
{input_ids, labels, rejected_input_ids, rejected_labels} examples (data/preference.py's layout), the
TRL side as {prompt_ids, chosen_ids, rejected_ids} rows fed to TRL's own DataCollatorForPreference
(the trainer is built on a 2-row text placeholder and then handed the token rows; TRL's text
tokenization is bypassed so that both sides see the same tokens), sampled sequentially.

Protocol: every (kind) runs in its own child process, kinds alternating A B C D E A B C D E ... for
`--repeats` rounds, so load from other processes on a shared CPU hits all alike. Each child runs
`--warmup` + `--steps` steps on distinct batches and reports the timed steps, its peak RSS (getrusage
ru_maxrss) and its step-0 loss. The table gives per kind the median and the min over all timed steps
of all its children, the smallest peak RSS of its children, and tokens/s = real tokens of the
micro-batch / median step. A separate check child loads both sides in one process, gives both the
same LoRA A and B (by module name) and compares the DPO loss and log-probs of the first batch:
with B = 0 (both must give log 2) and with the same non-zero A, B (a real test of the two DPO
implementations), in fp32 and in the run's dtype.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
import tempfile
import time
import zlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

KINDS = ("lorakit-sft-2B", "lorakit-sft-B", "lorakit-dpo", "lorakit-dpo-pre", "trl-dpo")
LORA = dict(r=16, alpha=32, dropout=0.0)
LR, BETA, MAX_GRAD_NORM = 2e-4, 0.1, 1.0
TOKENIZER = Path(__file__).resolve().parent.parent / "src" / "lorakit" / "assets" / "demo" / "model"
IGNORE = -100
# the adapted projections of a Qwen2 decoder layer, as both libraries name the modules
PROJ = re.compile(r"(layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj)$")


# ---- data ------------------------------------------------------------------------------------
def make_pairs(n: int, prompt_len: int, answer_len: int, vocab: int, eos: int, seed: int = 0) -> list[dict]:
    """n pairs of token lists {prompt, chosen, rejected}; the answers end with EOS. Ids in [3, vocab),
    never EOS (the special tokens of the demo tokenizer are 0..2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p = torch.randint(3, vocab, (prompt_len,), generator=g).tolist()
        c = torch.randint(3, vocab, (answer_len,), generator=g).tolist()
        r = torch.randint(3, vocab, (answer_len,), generator=g).tolist()
        if r == c:
            r[0] = 3 + (r[0] - 2) % (vocab - 3)
        out.append({"prompt": p, "chosen": c + [eos], "rejected": r + [eos]})
    return out


def lorakit_example(pair: dict) -> dict:
    """data/preference.py's layout: the prompt unsupervised, the answer (and its EOS) supervised."""
    ex = {}
    for prefix, answer in (("", pair["chosen"]), ("rejected_", pair["rejected"])):
        ex[prefix + "input_ids"] = pair["prompt"] + answer
        ex[prefix + "labels"] = [IGNORE] * len(pair["prompt"]) + answer
        ex[prefix + "labels"][0] = IGNORE
    return ex


def trl_row(pair: dict) -> dict:
    return {"prompt_ids": pair["prompt"], "chosen_ids": pair["chosen"], "rejected_ids": pair["rejected"]}


def tokenizer_info() -> tuple[int, int, int]:
    """(vocabulary size, eos id, pad id) of the demo tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    return len(tok), tok.eos_token_id, tok.pad_token_id


def torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp32": torch.float32}[name]


# ---- lorakit side ----------------------------------------------------------------------------
def build_lorakit(folder: str, dtype: str, objective):
    import lorakit
    from lorakit.train.optim import build_optimizer, param_groups
    from lorakit.train.setup import prepare_for_training
    from lorakit.train.step import TrainStep

    model, _ = lorakit.load_model(folder, quantization=None, compute_dtype={"bf16": "bfloat16", "fp32": "float32"}[dtype],
                                  load_tokenizer=False, device="cpu")
    prepare_for_training(model, gradient_checkpointing=False)  # default fast paths, as recipes/finetune.py
    lorakit.add_lora(model, lorakit.LoraConfig(r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                               target_modules="all-linear"))
    train_step = TrainStep(model, objective=objective).train()
    optimizer = build_optimizer(param_groups(model, LR), "adamw_torch", lr=LR)
    return model, train_step, optimizer


def lorakit_child(args, pairs: list[dict], pad_id: int) -> dict:
    import torch

    from lorakit.data.collate import collate, collate_pairs
    from lorakit.train.distributed import DistContext, clip_grad_norm
    from lorakit.train.loop import accumulate_gradients, step_metrics, with_reference_logps
    from lorakit.train.objectives import DPO, SFT

    kind, B, n = args.kind, args.pairs, args.warmup + args.steps
    dpo = kind.startswith("lorakit-dpo")
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model, train_step, optimizer = build_lorakit(args.folder, args.dtype, DPO(BETA, "sigmoid") if dpo else SFT())
    load_s, rss_loaded = time.perf_counter() - t0, C.current_rss_mb()
    params = [p for p in model.parameters() if p.requires_grad]
    examples = [lorakit_example(p) for p in pairs]
    extra = {}
    if kind == "lorakit-dpo-pre":
        t0 = time.perf_counter()
        examples[:n * B] = with_reference_logps(train_step, examples[:n * B], B, pad_id, torch.device("cpu"))
        extra["precompute_s"] = time.perf_counter() - t0
        extra["precompute_pairs"] = n * B
    if dpo:
        batches = [collate_pairs(examples[i * B:(i + 1) * B], pad_id) for i in range(n)]
    else:  # the chosen sides only: 2B rows (2B pairs' chosen) or B rows
        rows = 2 * B if kind == "lorakit-sft-2B" else B
        batches = [collate([{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples[i * rows:(i + 1) * rows]],
                           pad_id) for i in range(n)]
    ctx = DistContext()
    times, losses, metrics0 = [], [], {}
    for i, batch in enumerate(batches):
        t = time.perf_counter()
        loss, units = accumulate_gradients(train_step, [batch])
        stats = step_metrics(train_step, units, ctx)
        clip_grad_norm(params, MAX_GRAD_NORM, ctx)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t
        if i == 0:
            metrics0 = stats
        if i >= args.warmup:
            times.append(dt)
        losses.append(loss)
    return {"load_s": load_s, "rss_after_load_mb": rss_loaded, "step_times": times, "losses": losses, "metrics0": metrics0,
            "rows": int(batches[0]["input_ids"].shape[0]), "tokens": int(batches[0]["attention_mask"].sum()), **extra}


# ---- TRL side --------------------------------------------------------------------------------
def build_trl(folder: str, dtype: str, B: int, max_length: int, max_steps: int, out_dir: str, rows: list[dict] | None):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tok = AutoTokenizer.from_pretrained(str(TOKENIZER))
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype(dtype), device_map="cpu")
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules="all-linear", task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=out_dir, per_device_train_batch_size=B, max_steps=max_steps, learning_rate=LR,
                       lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, optim="adamw_torch",
                       max_grad_norm=MAX_GRAD_NORM, loss_type=["sigmoid"], beta=BETA, precompute_ref_log_probs=False,
                       gradient_checkpointing=False, eval_strategy="no", save_strategy="no", report_to="none",
                       use_cpu=True, bf16=dtype == "bf16", max_length=max_length, logging_steps=10**6,
                       disable_tqdm=True, dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0)
    placeholder = Dataset.from_dict({"prompt": ["a b c", "d e f"], "chosen": [" g", " h"], "rejected": [" i", " j"]})
    trainer = DPOTrainer(model=model, args=config, train_dataset=placeholder, processing_class=tok,
                         peft_config=peft_config)
    if rows is not None:  # the benchmark's token rows, through TRL's own collator
        trainer.train_dataset = Dataset.from_list(rows)
    return trainer


def trl_child(args, pairs: list[dict]) -> dict:
    import torch
    from transformers import TrainerCallback

    B, n = args.pairs, args.warmup + args.steps
    seq = args.prompt_len + args.answer_len + 1
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trl(args.folder, args.dtype, B, seq, n, out_dir, [trl_row(p) for p in pairs[:n * B]])
        load_s, rss_loaded = time.perf_counter() - t0, C.current_rss_mb()

        class StepTimer(TrainerCallback):
            def __init__(self):
                self.times, self.t = [], None

            def on_step_begin(self, a, state, control, **kw):
                self.t = time.perf_counter()

            def on_step_end(self, a, state, control, **kw):
                self.times.append(time.perf_counter() - self.t)

        timer = StepTimer()
        trainer.add_callback(timer)
        losses, metrics0 = [], {}
        inner = trainer.training_step

        def training_step(*a, **kw):
            loss = inner(*a, **kw)
            losses.append(float(loss))  # one host read per step (lorakit's accumulate_gradients does the same)
            if len(losses) == 1:
                metrics0.update({k: v[-1] for k, v in trainer._metrics["train"].items() if v})
            return loss

        trainer.training_step = training_step
        first = trainer.data_collator([trl_row(p) for p in pairs[:B]])
        trainer.train()
    return {"load_s": load_s, "rss_after_load_mb": rss_loaded, "step_times": timer.times[args.warmup:], "losses": losses, "metrics0": metrics0,
            "rows": int(first["input_ids"].shape[0]), "tokens": int(first["attention_mask"].sum()),
            "steps_run": len(timer.times)}


# ---- the cross-check -------------------------------------------------------------------------
def lora_modules(model) -> dict:
    """{'layers.N.self_attn.q_proj': module with lora_A / lora_B} of either library."""
    out = {}
    for name, m in model.named_modules():
        hit = PROJ.search(name)
        if hit and hasattr(m, "lora_A"):
            out[hit.group(1)] = m
    return out


def set_lora(mods: dict, zero_b: bool, peft: bool) -> None:
    """The same A and B on both sides: per module, from a generator seeded by its name."""
    import torch

    for key, m in sorted(mods.items()):
        a = m.lora_A["default"].weight if peft else m.lora_A.weight      # [r, in]
        b = m.lora_B["default"].weight if peft else m.lora_B.weight      # [out, r]
        g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
        va = torch.randn(a.shape, generator=g) / math.sqrt(a.shape[1])
        vb = torch.randn(b.shape, generator=g) * 0.02
        with torch.no_grad():
            a.copy_(va.to(a.dtype))
            b.copy_(torch.zeros_like(vb) if zero_b else vb.to(b.dtype))


def check_child(args, pairs: list[dict], pad_id: int) -> dict:
    """DPO loss and log-probs of the first batch on both sides, same LoRA weights."""
    import torch

    from lorakit.data.collate import collate_pairs
    from lorakit.train.objectives import DPO

    B = args.pairs
    seq = args.prompt_len + args.answer_len + 1
    model, train_step, _ = build_lorakit(args.folder, args.dtype, DPO(BETA, "sigmoid"))
    batch = collate_pairs([lorakit_example(p) for p in pairs[:B]], pad_id)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = build_trl(args.folder, args.dtype, B, seq, 1, out_dir, None)
        inputs = trainer.data_collator([trl_row(p) for p in pairs[:B]])
        same_tokens = bool(torch.equal(inputs["input_ids"], batch["input_ids"]))
        lk, pm = lora_modules(model), lora_modules(trainer.model)
        lora_dtypes = {"lorakit": str(next(iter(lk.values())).lora_A.weight.dtype),
                       "trl": str(next(iter(pm.values())).lora_A["default"].weight.dtype)}
        out = {"dtype": args.dtype, "same_tokens": same_tokens, "adapted": [len(lk), len(pm)], "lora_dtypes": lora_dtypes}
        for zero_b in (True, False):
            set_lora(lk, zero_b, peft=False)
            set_lora(pm, zero_b, peft=True)
            with torch.no_grad():
                loss_sum, units = train_step(batch)
            stats = {k: float(v) / B for k, v in train_step.take_stats().items()}
            trainer.model.train()
            trainer._metrics["train"].clear()
            with torch.no_grad(), trainer.compute_loss_context_manager(), trainer.accelerator.autocast():
                trl_loss = float(trainer.compute_loss(trainer.model, inputs))
            trl_stats = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
            out["zero_b" if zero_b else "nonzero"] = {
                "lorakit": {"loss": float(loss_sum) / float(units), **{k: stats[k] for k in ("logps/chosen", "logps/rejected", "rewards/margins")}},
                "trl": {"loss": trl_loss, **{k: trl_stats.get(k, float("nan")) for k in ("logps/chosen", "logps/rejected", "rewards/margins")}}}
    return out


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    import transformers  # noqa: F401

    # each side imports what its own process uses before anything is timed
    if args.kind.startswith("lorakit") or args.kind == "check":
        import lorakit  # noqa: F401
    if args.kind.startswith("trl") or args.kind == "check":
        import datasets  # noqa: F401
        import peft  # noqa: F401
        import trl  # noqa: F401
    vocab, eos, pad = tokenizer_info()
    n_pairs = 2 * args.pairs * (args.warmup + args.steps)  # SFT-2B uses the chosen sides of 2B pairs a step
    pairs = make_pairs(n_pairs, args.prompt_len, args.answer_len, vocab, eos)
    if args.kind == "check":
        r = check_child(args, pairs, pad)
    elif args.kind.startswith("lorakit"):
        r = lorakit_child(args, pairs, pad)
    else:
        r = trl_child(args, pairs)
    C.emit({"kind": args.kind, "dtype": args.dtype, "peak_rss_mb": C.peak_rss_mb(), **r})


# ---- parent ----------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(C.SHAPES), default="small")
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--pairs", type=int, default=4, help="preference pairs per micro-batch (B; a DPO batch has 2B rows)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--answer-len", type=int, default=32, help="answer tokens before the EOS")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    ap.add_argument("--repeats", type=int, default=2, help="child processes per kind, alternating")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16",
                    help="base weights and compute (TRL: bf16 model + bf16=True autocast)")
    ap.add_argument("--no-check", action="store_true", help="skip the loss cross-check child")
    ap.add_argument("--out", help="also write every child's result to this JSON file")
    ap.add_argument("--child", dest="kind", help=argparse.SUPPRESS)
    ap.add_argument("--folder", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.kind:
        return child(args)
    folder = str(C.make_checkpoint(args.shape))
    common = ["--folder", folder, "--threads", str(args.threads), "--steps", str(args.steps), "--warmup",
              str(args.warmup), "--pairs", str(args.pairs), "--prompt-len", str(args.prompt_len), "--answer-len",
              str(args.answer_len), "--shape", args.shape]
    results, t_start = [], time.perf_counter()
    if not args.no_check:
        for dtype in dict.fromkeys(("fp32", args.dtype)):
            r = C.run_child(__file__, ["--child", "check", "--dtype", dtype, *common], args.threads)
            results.append(r)
            print_check(r)
    for rep in range(args.repeats):
        for kind in args.kinds:  # alternating
            r = C.run_child(__file__, ["--child", kind, "--dtype", args.dtype, *common], args.threads)
            r["repeat"] = rep
            results.append(r)
            t = r["step_times"]
            print(f"  [{rep}] {kind:<16} load {r['load_s']:5.1f} s  step median {statistics.median(t):6.3f} s  "
                  f"min {min(t):6.3f} s  peak RSS {r['peak_rss_mb']:6.0f} MB  loss {r['losses'][0]:.4f} -> "
                  f"{r['losses'][-1]:.4f}" + (f"  precompute {r['precompute_s']:.2f} s" if "precompute_s" in r else ""),
                  flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    report(results, args, time.perf_counter() - t_start)


def print_check(r: dict) -> None:
    print(f"check ({r['dtype']}): same tokens on both sides: {r['same_tokens']}; adapted layers lorakit/TRL "
          f"{r['adapted'][0]}/{r['adapted'][1]}; LoRA weights lorakit {r['lora_dtypes']['lorakit']}, "
          f"TRL {r['lora_dtypes']['trl']}")
    for case, title in (("zero_b", "B = 0 (both log 2 = 0.693147)"), ("nonzero", "same non-zero A, B")):
        lk, tr = r[case]["lorakit"], r[case]["trl"]
        print(f"  {title:<32} loss lorakit {lk['loss']:.6f}  TRL {tr['loss']:.6f}  |diff| {abs(lk['loss'] - tr['loss']):.2e}"
              f"  {'OK' if abs(lk['loss'] - tr['loss']) <= 1e-4 else 'DIFFERS (> 1e-4)'}")
        print(f"  {'':<32} logps/chosen {lk['logps/chosen']:.4f} vs {tr['logps/chosen']:.4f}, logps/rejected "
              f"{lk['logps/rejected']:.4f} vs {tr['logps/rejected']:.4f}, margin {lk['rewards/margins']:.5f} vs "
              f"{tr['rewards/margins']:.5f}", flush=True)


def report(results: list[dict], args, wall: float) -> None:
    seq = args.prompt_len + args.answer_len + 1
    print(f"\nshape {args.shape}, {args.dtype}, {args.threads} threads; B = {args.pairs} pairs per micro-batch, "
          f"rows of {seq} tokens (prompt {args.prompt_len} + answer {args.answer_len} + EOS); LoRA r=16 all-linear; "
          f"{args.repeats} children per kind, alternating, each {args.warmup} warm-up + {args.steps} timed steps; "
          f"step s over all timed steps of all children; peak RSS (ru_maxrss, load included) and RSS after load: the "
          f"smallest child's")
    head = f"| {'configuration':<38} | {'rows':>4} | {'step s median':>13} | {'min':>6} | {'peak RSS MB':>11} | {'RSS after load':>14} | {'tokens/s':>8} | {'loss step 0':>11} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    label = {"lorakit-sft-2B": "lorakit SFT, 2B rows (= DPO tokens)", "lorakit-sft-B": "lorakit SFT, B rows (chosen only)",
             "lorakit-dpo": "lorakit DPO, reference every step", "lorakit-dpo-pre": "lorakit DPO, precomputed reference",
             "trl-dpo": "TRL DPOTrainer + PEFT LoRA"}
    agg = {}
    for kind in args.kinds:
        rs = [r for r in results if r["kind"] == kind]
        times = [t for r in rs for t in r["step_times"]]
        a = agg[kind] = {"median": statistics.median(times), "min": min(times), "rss": min(r["peak_rss_mb"] for r in rs),
                         "tokens": rs[0]["tokens"], "rows": rs[0]["rows"], "loss0": rs[0]["losses"][0],
                         "load": min(r["load_s"] for r in rs), "rss_load": min(r["rss_after_load_mb"] for r in rs)}
        if "precompute_s" in rs[0]:
            a["precompute"] = min(r["precompute_s"] for r in rs)
            a["precompute_pairs"] = rs[0]["precompute_pairs"]
        print(f"| {label[kind]:<38} | {a['rows']:>4} | {a['median']:>13.3f} | {a['min']:>6.3f} | {a['rss']:>11.0f} | {a['rss_load']:>14.0f} | "
              f"{a['tokens'] / a['median']:>8.0f} | {a['loss0']:>11.6f} |")
    if "lorakit-dpo-pre" in agg:
        a = agg["lorakit-dpo-pre"]
        print(f"\nprecompute of the reference log-probs (once, {a['precompute_pairs']} pairs, micro-batch {args.pairs}): "
              f"{a['precompute']:.2f} s = {a['precompute'] / a['precompute_pairs'] * args.pairs:.3f} s per B pairs")
    ratios = [("lorakit DPO / lorakit SFT 2B rows (same tokens)", "lorakit-dpo", "lorakit-sft-2B"),
              ("lorakit DPO / lorakit SFT B rows", "lorakit-dpo", "lorakit-sft-B"),
              ("lorakit DPO precomputed / lorakit DPO", "lorakit-dpo-pre", "lorakit-dpo"),
              ("lorakit DPO precomputed / lorakit SFT 2B rows", "lorakit-dpo-pre", "lorakit-sft-2B"),
              ("lorakit DPO / TRL DPO", "lorakit-dpo", "trl-dpo"),
              ("lorakit DPO precomputed / TRL DPO (TRL: reference every step)", "lorakit-dpo-pre", "trl-dpo")]
    print("\n| ratio | step (median) | step (min) | peak RSS |\n|---|---|---|---|")
    for title, x, y in ratios:
        if x in agg and y in agg:
            print(f"| {title} | {agg[x]['median'] / agg[y]['median']:.2f}x | {agg[x]['min'] / agg[y]['min']:.2f}x | "
                  f"{agg[x]['rss'] / agg[y]['rss']:.2f}x |")
    if "lorakit-dpo" in agg and "trl-dpo" in agg:
        d = abs(agg["lorakit-dpo"]["loss0"] - agg["trl-dpo"]["loss0"])
        print(f"\nDPO loss at step 0 (B = 0 on both): lorakit {agg['lorakit-dpo']['loss0']:.6f}, TRL "
              f"{agg['trl-dpo']['loss0']:.6f}, |diff| {d:.2e} ({'within' if d <= 1e-4 else 'NOT within'} 1e-4; "
              f"log 2 = {math.log(2):.6f})")
    print("load s (min): " + ", ".join(f"{k} {v['load']:.1f}" for k, v in agg.items()) + f"; total wall {wall:.0f} s")


if __name__ == "__main__":
    main()
