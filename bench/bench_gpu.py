"""The GPU benchmark: lorakit against transformers + PEFT + bitsandbytes on one CUDA device.

    bash bench/gpu_check.sh                 # the prepared check: wheels, pytest -m gpu, then this
    python bench/bench_gpu.py               # this part alone (defaults below, ~5 min on one H200)
    python bench/bench_gpu.py --smoke       # CPU, tiny shapes: tests this script, measures nothing

Every measurement runs in a child process (bench/_gpu_child.py), so each side starts from an empty
GPU and the parent never initialises CUDA:

1. info: device, compute capability, memory, versions, what `precision: auto` picks.
2. checkpoint: a Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 heads, 8 KV heads,
   vocab 128,256, untied head) with --layers of its 32 decoder layers (default 8: every matrix
   has the real model's shape, the file is 5.6 GB instead of 16 GB, so 4 children can each load it
   inside the time budget; tokens/s scale with the layer count, MFU and the kernel figures do not),
   random N(0, 0.02) bf16 weights drawn on the GPU, written once into --dir.
3. kernels: dequantize of each 8B matrix shape to bf16 (lorakit's registered kernel, bitsandbytes,
   lorakit's PyTorch reference) in GB/s of bytes read + written; one-row matvec (decoding).
4. training, alternating children: lorakit-qlora, peer-qlora, lorakit-lora16, peer-lora16. QLoRA =
   NF4 + double quant, bf16 compute; LoRA r=16, alpha 32, dropout 0, all-linear; gradient
   checkpointing on both sides (the peer: prepare_model_for_kbit_training, non-reentrant); torch
   AdamW lr 2e-4; labels = inputs (every position supervised), no padding; seq --seq, each
   --micro size in turn (peak stats reset in between); --warmup then --steps timed optimizer steps.
   Reported: tokens/s, MFU = 4 * N * tokens/s / peak (N = the matmul parameters: every decoder
   Linear + the head; a frozen base costs 2N forward + 2N input-gradient FLOPs per token; the
   recomputation of checkpointing is not counted), peak allocated and reserved, and lorakit's
   predicted peak (lorakit.memory.estimate) beside them. An out-of-memory run is reported as OOM.

Prints one table and writes it with the machine, the versions and every raw number to --out
(bench/GPU.md). Without a CUDA device it exits with status 2 and one line saying so.
"""

from __future__ import annotations

import argparse
import importlib.metadata as md
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = HERE / "_gpu_child.py"
KINDS = ("lorakit-qlora", "peer-qlora", "lorakit-lora16", "peer-lora16")
# Dense bf16 tensor-core peak FLOP/s by device name (NVIDIA datasheets, as used by NeMo for MFU:
# ../shared/notes/gpu-perf-anchors.md); fp16 for the T4, which has no bf16.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12,
              "RTX 4090": 165e12, "RTX 3090": 71e12, "A6000": 155e12, "T4": 65e12, "V100": 125e12}
GIB = 2**30


class Child:
    """Runs child jobs with a shared time budget; a failure or timeout becomes an error dict."""

    def __init__(self, budget_s: float, device: str, tiny: bool):
        self.deadline = time.monotonic() + budget_s
        self.device, self.tiny = device, tiny

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, job: str, *args: str, limit: float = 600) -> dict:
        timeout = min(limit, self.left())
        if timeout < 20:
            return {"error": f"skipped: the time budget is spent ({self.left():.0f} s left)"}
        cmd = [sys.executable, str(CHILD), job, *args, "--device", self.device] + (["--tiny"] if self.tiny else [])
        env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        t0 = time.monotonic()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode != 0 or not lines:
            tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["(no output)"]
            return {"error": f"rc {out.returncode}: {tail[0][:300]}", "stderr": out.stderr[-3000:]}
        result = json.loads(lines[-1][len("RESULT "):])
        result["wall_s"] = time.monotonic() - t0
        return result


def matmul_params(shape: dict) -> int:
    """Parameters in matmuls per token: q, k, v, o, gate, up, down of every layer, plus the head."""
    h, i, v, layers = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    kv = h // shape["num_attention_heads"] * shape["num_key_value_heads"]
    return layers * (2 * h * h + 2 * h * kv + 3 * h * i) + h * v


def peak_flops(name: str) -> float | None:
    return next((v for k, v in PEAK_FLOPS.items() if k in (name or "")), None)


def versions() -> dict:
    out = {}
    for pkg in ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "safetensors"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    out["python"] = sys.version.split()[0]
    try:
        out["lorakit_commit"] = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                                               capture_output=True, text=True, timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.TimeoutExpired):
        out["lorakit_commit"] = "unknown"
    return out


def _gib(x) -> str:
    return f"{x / GIB:.2f}" if isinstance(x, (int, float)) else "-"


def kernel_table(k: dict) -> list[str]:
    if "error" in k:
        return [f"kernels: {k['error']}"]
    lines = ["| matrix | shape | lorakit GB/s (kernel) | bitsandbytes GB/s | PyTorch reference GB/s | lorakit / bnb "
             "| bit-exact vs reference | same bytes / values as bnb | 1-row matvec ms: lorakit fused / dequant+matmul / bnb |",
             "|---|---|---:|---:|---:|---:|---|---|---|"]
    for r in k["rows"]:
        ratio = f"{r['lorakit_gbs'] / r['bnb_gbs']:.2f}x" if "bnb_gbs" in r else "-"
        same = f"{r.get('same_bytes_as_bnb', '-')} / {r.get('same_values_as_bnb', '-')}"
        mv = " / ".join(f"{r[key]:.3f}" if key in r else "-" for key in ("gemv_ms", "dequant_matmul_ms", "bnb_gemv_ms"))
        lines.append(f"| {r['matrix']} | {r['shape'][0]}x{r['shape'][1]} | {r['lorakit_gbs']:.0f} ({r['kernel']}) "
                     f"| {r.get('bnb_gbs', float('nan')):.0f} | {r['reference_gbs']:.0f} | {ratio} "
                     f"| {r['bit_exact_vs_reference']} | {same} | {mv} |")
    return lines


def train_table(results: list[dict], shape: dict, peak: float | None) -> list[str]:
    n = matmul_params(shape)
    lines = ["| side | method | micro-batch | tokens/s | MFU (4N) | step s | peak allocated GiB | peak reserved GiB "
             "| predicted allocated / reserved GiB | load s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        side, method = r["kind"].split("-")
        if "error" in r:
            lines.append(f"| {side} | {method} | - | {r['error']} | | | | | | |")
            continue
        for run in r["runs"]:
            if "oom" in run:
                lines.append(f"| {side} | {method} | {run['micro_batch']} | OOM (does not fit) | | | | | "
                             f"{_gib(run.get('predicted_allocated'))} / {_gib(run.get('predicted_reserved'))} | |")
                continue
            mfu = f"{100 * 4 * n * run['tokens_per_s'] / peak:.1f}%" if peak else "-"
            pred = (f"{_gib(run['predicted_allocated'])} / {_gib(run['predicted_reserved'])}"
                    if "predicted_allocated" in run else "-")
            lines.append(f"| {side} | {method} | {run['micro_batch']} | {run['tokens_per_s']:.0f} | {mfu} "
                         f"| {run['step_s']:.3f} | {_gib(run.get('peak_allocated'))} | {_gib(run.get('peak_reserved'))} "
                         f"| {pred} | {r['load_s']:.1f} |")
    return lines


def comparisons(results: list[dict]) -> list[str]:
    """lorakit / peer per method and micro-batch, and the planner's error."""
    by = {(r["kind"], run["micro_batch"]): run for r in results if "runs" in r for run in r["runs"] if "oom" not in run}
    lines = []
    for method in ("qlora", "lora16"):
        for (kind, mbs), ours in sorted(by.items()):
            if kind != f"lorakit-{method}":
                continue
            peer = by.get((f"peer-{method}", mbs))
            text = f"{method} micro-batch {mbs}:"
            if peer:
                text += f" tokens/s {ours['tokens_per_s'] / peer['tokens_per_s']:.2f}x the peer's"
                if ours.get("peak_reserved") and peer.get("peak_reserved"):
                    text += f", peak reserved {ours['peak_reserved'] / peer['peak_reserved']:.2f}x"
            if ours.get("peak_reserved") and "predicted_reserved" in ours:
                text += (f"; planner {100 * (ours['predicted_reserved'] / ours['peak_reserved'] - 1):+.0f}% vs reserved, "
                         f"{100 * (ours['predicted_allocated'] / ours['peak_allocated'] - 1):+.0f}% vs allocated")
            lines.append(text)
    return lines


def load_bound(results: list[dict], shape: dict) -> list[str]:
    """The streaming loader's bound on the GPU (lorakit-qlora child): GPU peak during load vs the
    4-bit model + the largest 16-bit tensor + 256 MiB; host peak RSS for the record."""
    r = next((r for r in results if r["kind"] == "lorakit-qlora" and "error" not in r), None)
    if r is None or "gpu_load_peak_allocated" not in r:
        return []
    largest = 2 * shape["vocab_size"] * shape["hidden_size"]
    bound = r["model_bytes"] + largest + 256 * 2**20
    ok = r["gpu_load_peak_allocated"] <= bound
    return [f"load (lorakit, 4-bit): GPU peak {_gib(r['gpu_load_peak_allocated'])} GiB vs bound {_gib(bound)} GiB "
            f"(model {_gib(r['model_bytes'])} + largest 16-bit tensor {_gib(largest)} + 0.25): "
            f"{'within' if ok else 'EXCEEDED'}; host peak RSS {_gib(r['host_peak_rss'])} GiB (imports included)"]


def write_report(path: Path, args, info: dict, vers: dict, ckpt: dict, k: dict, results: list[dict], lines: list[str],
                 pytest_line: str) -> None:
    text = ["# lorakit on a GPU: measured", "",
            f"Written by `bench/gpu_check.sh` (bench/bench_gpu.py) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.",
            "", "## Machine and versions", "",
            f"- device: {info.get('name', info.get('device'))}, compute capability {info.get('capability')}, "
            f"{info.get('sms')} SMs, {_gib(info.get('mem_total'))} GiB (free at start {_gib(info.get('mem_free'))} GiB)",
            f"- `precision: auto` picks {info.get('auto_dtype')}",
            "- " + ", ".join(f"{k_}: {v}" for k_, v in vers.items()),
            f"- CUDA (torch build): {info.get('cuda')}",
            f"- pytest -m gpu: {pytest_line or 'not run'}", "",
            "## Setting", "",
            f"Llama-3-8B shapes with {args.layers} of its 32 decoder layers ({matmul_params(ckpt.get('shape', {})) / 1e9:.2f}B "
            "matmul parameters incl. the head), random bf16 weights; QLoRA NF4 + double quant / 16-bit LoRA, r=16 "
            f"all-linear, seq {args.seq}, gradient checkpointing on both sides, torch AdamW; median of {args.steps} steps "
            f"after {args.warmup} warm-up.", "", "## Results", "", *lines, "",
            "<details><summary>raw results (JSON)</summary>", "", "```json",
            json.dumps({"info": info, "versions": vers, "checkpoint": ckpt, "kernels": k, "train": results}, indent=1),
            "```", "</details>", ""]
    path.write_text("\n".join(text))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8, help="decoder layers of the Llama-3-8B-shaped checkpoint (of 32)")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--micro", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS))
    ap.add_argument("--dir", default=os.environ.get("LORAKIT_BENCH_DIR", "/tmp/lorakit-gpu-bench"),
                    help="where the random checkpoint is written (5.6 GB at 8 layers; outside the repository)")
    ap.add_argument("--out", default=str(HERE / "GPU.md"))
    ap.add_argument("--budget", type=float, default=420, help="seconds for everything this script does")
    ap.add_argument("--pytest-line", default="", help="the summary line of pytest -m gpu (gpu_check.sh passes it)")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny shapes, 1 layer, seq 64: tests this script only")
    args = ap.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if args.smoke:
        args.layers, args.seq, args.micro, args.steps, args.warmup = 1, 64, [1, 2], 1, 1
        args.dir = str(Path(args.dir) / "smoke")
    child = Child(args.budget, device, tiny=args.smoke)
    info = child.run("info", limit=120)
    if "error" in info:
        print(f"bench_gpu: cannot start: {info['error']}")
        return 2
    if device == "cuda" and not info.get("name"):
        print(f"bench_gpu: no CUDA device: torch {info.get('torch')} (CUDA build {info.get('cuda')}) sees none; nothing measured")
        return 2
    vers = versions()
    print(f"device {info.get('name', 'cpu')} cc {info.get('capability')} | " + ", ".join(f"{k} {v}" for k, v in vers.items()),
          flush=True)
    ckpt = child.run("checkpoint", str(Path(args.dir) / f"llama3-8b-shaped-{args.layers}l"), str(args.layers), limit=240)
    if "error" in ckpt:
        print(f"bench_gpu: could not create the checkpoint: {ckpt['error']}")
        return 1
    print(f"checkpoint {ckpt['folder']} ({'created in %.0f s' % ckpt['seconds'] if ckpt['created'] else 'cached'})", flush=True)
    k = child.run("kernels", limit=120)
    print("\n".join(kernel_table(k)), flush=True)
    results = []
    for kind in args.kinds:  # alternating sides
        r = child.run("train", kind, ckpt["folder"], "--seq", str(args.seq), "--micro", *map(str, args.micro),
                      "--steps", str(args.steps), "--warmup", str(args.warmup), limit=300)
        r.setdefault("kind", kind)
        results.append(r)
        print(f"  {kind}: " + (r["error"] if "error" in r else ", ".join(
            f"mbs {x['micro_batch']}: " + ("OOM" if "oom" in x else f"{x['tokens_per_s']:.0f} tok/s") for x in r["runs"])),
            flush=True)
    peak = peak_flops(info.get("name", ""))
    lines = ["### Dequantize (NF4 + double quant -> bf16) and one-row matvec", "", *kernel_table(k), "",
             "### Training steps", "", *train_table(results, ckpt["shape"], peak), "",
             *(f"- {line}" for line in comparisons(results) + load_bound(results, ckpt["shape"])),
             f"- MFU peak: {peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "- MFU: peak FLOP/s of this device unknown"]
    print("\n" + "\n".join(lines))
    out = Path(args.out)
    write_report(out, args, info, vers, ckpt, k, results, lines, args.pytest_line)
    print(f"\nwritten to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
