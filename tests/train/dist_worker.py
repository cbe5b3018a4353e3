"""Run under torchrun by tests/train/test_distributed.py (not collected by pytest: no test_ prefix).

    python -m torch.distributed.run --standalone --nproc-per-node 2 dist_worker.py MODE MODEL_DIR OUT

MODE fsdp_storage MODEL_DIR OUT: check FSDP2's sharding of the 4-bit codes on every rank, write OUT/rank-R.json
(one file a rank: lines two ranks print to one stdout can interleave).
MODE fail / hang: train, and on rank 1 raise at step 2 / stop answering at step 2 (the job must end
with an error within train.dist_timeout_s, never hang).
MODE die_after_6 ARGS...: `lorakit train ARGS`, every process killed (os._exit) right after the
checkpoint of step 6 is written (also without torchrun: one process).
"""

import json
import os
import sys
import time

import torch
from torch.distributed.tensor import DTensor

import lorakit
from lorakit.config import load_config
from lorakit.quant.linear4bit import Linear4bit
from lorakit.train import distributed, loop
from lorakit.train.step import TrainStep


def fsdp_storage(model_dir: str, out: str) -> None:
    ctx = distributed.setup(60)
    ctx.strategy = "fsdp2"
    model, _ = lorakit.load_model(model_dir, quantization="nf4", compute_dtype="fp32", load_tokenizer=False)
    lorakit.add_lora(model, lorakit.LoraConfig(r=4))
    before = {n: (m.weight_packed.clone(), {k: v.clone() for k, v in m._buffers.items() if v is not None})
              for n, m in model.named_modules() if isinstance(m, Linear4bit)}
    step = distributed.wrap(TrainStep(model), ctx)
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    loss, _ = step({"input_ids": ids, "labels": ids.clone()})
    loss.backward()
    held = total = 0
    same_bytes = same_state = sharded = True
    for name, m in model.named_modules():
        if not isinstance(m, Linear4bit):
            continue
        p = m.weight_packed
        sharded &= p.dtype == torch.uint8 and isinstance(p, DTensor) and not p.requires_grad
        held += p.to_local().numel()
        total += p.numel()
        same_bytes &= torch.equal(p.full_tensor(), before[name][0])
        same_state &= all(torch.equal(m._buffers[k], v) and m._buffers[k].dtype == v.dtype
                          for k, v in before[name][1].items() if k != "weight_packed")
    result = {"rank": ctx.rank, "held": held, "total": total, "same_bytes": bool(same_bytes),
              "same_state": bool(same_state), "sharded": bool(sharded), "loss": float(loss)}
    with open(os.path.join(out, f"rank-{ctx.rank}.json"), "w") as f:
        json.dump(result, f)
    distributed.teardown()


def failing(mode: str, args: list[str]) -> None:
    real = loop.accumulate_gradients
    calls = {"n": 0}

    def accumulate(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2 and int(os.environ["RANK"]) == 1:
            if mode == "fail":
                raise RuntimeError("rank 1 fails on purpose")
            time.sleep(3600)  # a hung rank
        return real(*a, **k)

    loop.accumulate_gradients = accumulate
    from lorakit.recipes.finetune import finetune

    cfg = load_config(None, args)
    try:
        finetune(cfg, progress=False)
    finally:
        distributed.teardown()


def die_after_6(args: list[str]) -> None:
    real = loop._save

    def save_then_die(run_dir, step, *a, **k):
        real(run_dir, step, *a, **k)
        if step == 6:
            os._exit(3)  # killed: no cleanup, no final adapter

    loop._save = save_then_die
    from lorakit.cli import main

    sys.exit(main(["train", *args]))


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "die_after_6":
        die_after_6(sys.argv[2:])
    elif mode == "fsdp_storage":
        fsdp_storage(sys.argv[2], sys.argv[3])
    else:
        failing(mode, sys.argv[2:])
