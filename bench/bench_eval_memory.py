"""Evaluation and generation within the training memory: peak RSS of `lorakit train`, `lorakit eval
--exact-match` and `lorakit generate` on the same model and adapter, each in its own process.

    python bench/bench_eval_memory.py                   # the demo model and the Qwen2.5-0.5B shape
    python bench/bench_eval_memory.py --models demo     # the demo only (~1 min)

Models: the shipped demo (3.4M Llama) and the cached random Qwen2.5-0.5B-shaped checkpoint (bench/
.cache, vocabulary 151,936) with the demo's tokenizer beside it. Data: the demo task. Each command
runs as a child process; its peak RSS is the kernel's accounting of the finished child (wait4
ru_maxrss), its wall time the child's. The training run (QLoRA, micro-batch 4, T <= 128) writes the
adapter the other two use.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "assets" / "demo"


def run(cmd: list[str]) -> tuple[float, float, str]:
    """(peak RSS MiB, wall s, stdout) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{out[-3000:]}")
    return usage.ru_maxrss / 1024, time.perf_counter() - t0, out


def model_folder(name: str, work: Path) -> Path:
    if name == "demo":
        return DEMO / "model"
    folder = work / "qwen2.5-0.5b"  # the cached random checkpoint + the demo's tokenizer
    folder.mkdir(exist_ok=True)
    src = C.make_checkpoint("qwen2.5-0.5b")
    for f in ("config.json", "model.safetensors"):
        (folder / f).symlink_to(src / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(DEMO / "model" / f, folder / f)
    return folder


def bench(name: str, work: Path, exact_match: int, new_tokens: int) -> list[tuple]:
    lk = [sys.executable, "-m", "lorakit"]
    model = model_folder(name, work)
    run_dir = work / f"run-{name}"
    common = ["--model", str(model), "--quantization", "nf4"]
    rows = []
    rss, s, _ = run(lk + ["train", "--model", str(model), "--data", str(DEMO / "train.jsonl"), "--no-progress",
                          "--model.quantization", "nf4", "--data.template", "alpaca_short", "--data.max_seq_len", "128",
                          "--set", "data.val_size=16", "--train.max_steps", "4", "--train.micro_batch_size", "4",
                          "--train.eval_every", "0", "--train.output_dir", str(run_dir)])
    rows.append((name, "train (4 steps, micro-batch 4)", rss, s))
    rss, s, _ = run(lk + ["eval", *common, "--adapter", str(run_dir / "adapter"), "--data", str(DEMO / "test.jsonl"),
                          "--exact-match", str(exact_match), "--max-new-tokens", str(new_tokens)])
    rows.append((name, f"eval --exact-match {exact_match} ({new_tokens} new tokens)", rss, s))
    rss, s, _ = run(lk + ["generate", *common, "--adapter", str(run_dir / "adapter"), "--prompt",
                          "Turn the record into a sentence.", "--max-new-tokens", str(new_tokens)])
    rows.append((name, f"generate ({new_tokens} new tokens)", rss, s))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["demo", "qwen2.5-0.5b"], choices=["demo", "qwen2.5-0.5b"])
    ap.add_argument("--exact-match", type=int, default=60)
    ap.add_argument("--new-tokens", type=int, default=32)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [r for m in args.models for r in bench(m, Path(tmp), args.exact_match, args.new_tokens)]
    print(f"\n{'model':<14}{'command':<44}{'peak RSS MiB':>14}{'wall s':>9}")
    for name, what, rss, s in rows:
        print(f"{name:<14}{what:<44}{rss:>14.0f}{s:>9.1f}")
    for m in args.models:
        train = next(r[2] for r in rows if r[0] == m and r[1].startswith("train"))
        worst = max(r[2] for r in rows if r[0] == m and not r[1].startswith("train"))
        print(f"{m}: eval/generate peak / training peak = {worst / train:.2f}")


if __name__ == "__main__":
    main()
