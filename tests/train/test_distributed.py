"""Training on 2 processes (torchrun, gloo, CPU) equals training in one: DDP and FSDP2, 16-bit and 4-bit
bases, resume at the same and at another world size, the 4-bit codes sharded, a failing or hanging
rank ending the job, and the shipped demo end to end."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tiny_tokenizers import write_tiny_model_folder

HERE = Path(__file__).parent
ANIMALS = "cat dog fox owl bee cow pig hen".split()
# 37 rows: with 2 x 2 rows per global micro-batch the last one of an epoch is short, so rank 1 gets a
# stand-in row there (nothing supervised) and must still run in step with rank 0
N_ROWS = 37


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    write_tiny_model_folder(root / "model")
    rows = [{"prompt": f"animal {i % 8}:", "completion": " " + ANIMALS[i % 8] * (1 + i % 3)} for i in range(N_ROWS)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join([src, str(HERE.parent), env.get("PYTHONPATH", "")])
    return env


def lorakit(files, out, ranks, *extra, killed=False, timeout=300):
    """`lorakit train` on `ranks` processes (torchrun) or one; returns the completed process. `killed`:
    every process dies right after the checkpoint of step 6 (dist_worker.py die_after_6)."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"] if ranks > 1 \
        else [sys.executable]
    target = [str(HERE / "dist_worker.py"), "die_after_6"] if killed else ["-m", "lorakit", "train"]
    args = ["--model", str(files / "model"), "--data", str(files / "data.jsonl"), "--no-progress",
            "--train.precision", "fp32", "--train.output_dir", str(out), "--set", "data.val_size=6",
            "--train.eval_every", "5", "--train.lr", "1e-2", "--train.grad_accum", "2", "--train.schedule", "constant",
            "--train.save_every", "3", *extra]
    proc = subprocess.run(launch + target + args, capture_output=True, text=True, env=_env(), timeout=timeout)
    assert (proc.returncode != 0) if killed else (proc.returncode == 0), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def records(run):
    return [r for r in map(json.loads, (Path(run) / "metrics.jsonl").read_text().splitlines()) if "event" not in r]


def losses(run):
    return [(r["step"], r.get("loss", r.get("val_loss"))) for r in records(run)]


def adapter(run):
    return load_file(str(Path(run) / "adapter" / "adapter_model.safetensors"))


def assert_same_run(got, want, tol=1e-5):
    g, w = losses(got), losses(want)
    assert [s for s, _ in g] == [s for s, _ in w]
    assert max(abs(a - b) for (_, a), (_, b) in zip(g, w)) <= tol, list(zip(g, w))
    A, B = adapter(got), adapter(want)
    assert sorted(A) == sorted(B)  # the same PEFT names and shapes as one process writes
    assert max(float((A[k] - B[k]).abs().max()) for k in A) <= tol


@pytest.mark.parametrize("quantization", [None, "nf4"])
def test_ddp_and_fsdp2_equal_one_process_with_the_same_global_batch(files, tmp_path, quantization):
    q = ["--model.quantization", quantization] if quantization else []
    one = tmp_path / "one"
    lorakit(files, one, 1, "--train.max_steps", "10", "--train.micro_batch_size", "4", *q)
    for strategy in ("ddp", "fsdp2"):
        out = tmp_path / strategy
        proc = lorakit(files, out, 2, "--train.max_steps", "10", "--train.micro_batch_size", "2",
                       "--train.distributed", strategy, *q)
        assert f"distributed: 2 ranks, {strategy}" in proc.stderr
        assert len(losses(out)) == 12  # 10 steps + 2 evaluations: every rank ran every step
        assert_same_run(out, one)
        end = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
        assert end["world_size"] == 2
    if quantization:
        assert "holds 18432 of 36864 bytes of 4-bit codes (0.500" in proc.stderr  # FSDP2: half the codes each


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_dpo_on_two_ranks_equals_one_process(files, tmp_path, strategy):
    """DPO's reference pass (adapters off) inside the wrapped step, pairs normalised over the ranks,
    the rewards metrics all-reduced; 13 pairs: rank 1 gets a stand-in pair in the last batch."""
    rows = [{"prompt": f"animal {i % 8}:", "chosen": " " + ANIMALS[i % 8], "rejected": " " + ANIMALS[(i + 3) % 8] * 2}
            for i in range(19)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    dpo = ["--data", str(tmp_path / "pairs.jsonl"), "--train.objective", "dpo", "--train.max_steps", "6"]
    one = tmp_path / "one"
    lorakit(files, one, 1, "--train.micro_batch_size", "4", *dpo)
    two = tmp_path / strategy
    lorakit(files, two, 2, "--train.micro_batch_size", "2", "--train.distributed", strategy, *dpo)
    assert_same_run(two, one)
    want, got = records(one), records(two)
    for a, b in zip(got, want):
        for key in ("rewards/accuracies", "rewards/margins", "eval_rewards/margins", "pairs"):
            if key in b:
                assert abs(a[key] - b[key]) <= 1e-5, (key, a, b)


def test_resume_after_a_kill_continues_at_the_same_and_at_another_world_size(files, tmp_path):
    whole = tmp_path / "whole"
    lorakit(files, whole, 2, "--train.max_steps", "10", "--train.micro_batch_size", "2", "--train.distributed", "ddp")
    cases = [(2, 2, "ddp"), (2, 1, "ddp"), (1, 2, "fsdp2")]
    for first, second, strategy in cases:
        out = tmp_path / f"{first}to{second}"
        mbs = lambda ranks: str(4 // ranks)  # the same global batch of 4 rows per micro-batch
        lorakit(files, out, first, "--train.max_steps", "10", "--train.micro_batch_size", mbs(first),
                "--train.distributed", strategy, killed=True)
        assert (out / "checkpoint-000006").is_dir() and not (out / "adapter").exists()
        lorakit(files, out, second, "--train.max_steps", "10", "--train.micro_batch_size", mbs(second),
                "--train.distributed", strategy, "--resume")
        assert_same_run(out, whole)


def test_fsdp2_shards_the_4bit_codes_bytes_intact(files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "dist_worker.py"), "fsdp_storage", str(files / "model"), str(tmp_path)],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for r in results:
        assert r["sharded"] and r["same_bytes"] and r["same_state"]  # uint8 DTensor rows; gathered = original
        assert r["held"] * 2 == r["total"]                           # each rank holds 1/W of the codes
    assert results[0]["loss"] == results[1]["loss"]


@pytest.mark.parametrize("mode", ["fail", "hang"])
def test_a_failing_or_hanging_rank_ends_the_job_with_an_error(files, tmp_path, mode):
    args = [f"model.name_or_path={files / 'model'}", f"data.path={files / 'data.jsonl'}", "train.max_steps=6",
            "train.micro_batch_size=2", "train.precision=fp32", "data.val_size=0", "train.dist_timeout_s=15",
            f"train.output_dir={tmp_path / 'run'}"]
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(HERE / "dist_worker.py"), mode, *args], capture_output=True, text=True, env=_env(),
                          timeout=240)
    seconds = time.monotonic() - start
    assert proc.returncode != 0 and seconds < 120
    out = proc.stdout + proc.stderr
    assert ("rank 1 fails on purpose" in out) if mode == "fail" else ("Timed out" in out or "timed out" in out)


def test_torchrun_trains_the_shipped_demo_and_its_adapter_merges(tmp_path):
    import lorakit as lk

    demo = Path(lk.__file__).parent / "assets" / "demo"
    out = tmp_path / "demo"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "lorakit", "train",
           "--model", str(demo / "model"), "--data", str(demo / "train.jsonl"), "--no-progress",
           "--model.quantization", "nf4", "--lora.r", "16", "--lora.alpha", "32", "--data.format", "dolly",
           "--data.template", "alpaca_short", "--set", "data.val_size=64",
           "--data.max_seq_len", "128", "--train.max_steps", "60", "--train.micro_batch_size", "8",
           "--train.lr", "2e-3", "--train.warmup_steps", "10", "--train.eval_every", "30", "--train.output_dir", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    vals = [r["val_loss"] for r in records(out) if "val_loss" in r]
    assert len(vals) == 2 and vals[-1] < vals[0]
    merged = tmp_path / "merged"
    proc = subprocess.run([sys.executable, "-m", "lorakit", "merge", "--model", str(demo / "model"), "--adapter",
                           str(out / "best_adapter"), "--quantization", "nf4", "--out", str(merged), "--verify"],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert proc.returncode == 0 and "merge check" in proc.stdout, proc.stderr[-2000:]
