"""Load a ~336M-parameter checkpoint in 4 bits: lorakit vs transformers + bitsandbytes, on CPU.

    python bench/bench_load.py                    # 2 repeats each, alternating
    python bench/bench_load.py --repeats 3 --cache /tmp/lorakit-bench

The checkpoint is created once (random weights, bf16 safetensors) in the cache folder
(default ~/.cache/lorakit-bench; never committed). Its shape is Qwen2 with

    hidden 1024, 24 layers, intermediate 2816, 16 heads, 4 kv heads (head_dim 64),
    vocab 32000, untied lm_head  ->  336.3M parameters (270.5M in the 168 target Linear layers)

Each measurement runs in a fresh child process (`python bench_load.py --child KIND FOLDER`) that
prints one JSON line: its own peak RSS (getrusage ru_maxrss), the load's wall time, and the bytes
of every tensor the loaded model holds (parameters, buffers and 4-bit quantization state). The
"baseline" child only imports torch + transformers + lorakit, so peak RSS minus baseline is the
memory the load itself added. Timings are noisy on a shared CPU; peak RSS is the reliable figure.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

SHAPE = dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=2816, num_attention_heads=16,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
             tie_word_embeddings=False, torch_dtype="bfloat16")
KINDS = ("baseline", "baseline+model-code", "lorakit", "transformers+bnb")
BASELINES = KINDS[:2]


def make_checkpoint(folder: Path) -> Path:
    """The ~336M Qwen2-shaped checkpoint of SHAPE, written once (bench/_common.py)."""
    return C.write_random_checkpoint(folder, SHAPE)


def model_bytes(model) -> int:
    """Bytes of every distinct tensor the model holds, including bitsandbytes' QuantState tensors
    (kept on `weight.quant_state`, outside parameters and buffers)."""
    import torch

    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()

    for t in list(model.parameters()) + list(model.buffers()):
        add(t)
        qs = getattr(t, "quant_state", None)
        if qs is not None:
            for v in qs.as_dict(packed=False).values() if hasattr(qs, "as_dict") else ():
                add(v)
    return total


def child(kind: str, folder: str) -> None:
    import torch
    import transformers  # noqa: F401  (the baseline imports the same libraries)

    import lorakit

    start = time.perf_counter()
    n_quantized = 0
    if kind == "lorakit":
        model, _ = lorakit.load_model(folder, quantization="nf4", compute_dtype="bf16", load_tokenizer=False)
        n_quantized = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, lorakit.Linear4bit))
    elif kind == "transformers+bnb":
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.bfloat16)
        model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=torch.bfloat16,
                                                     device_map="cpu")
        n_quantized = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit")
    elif kind == "baseline+model-code":  # also import the model class (both loaders need it)
        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(folder))]
        model = None
    else:
        model = None
    seconds = time.perf_counter() - start
    size = model_bytes(model) if model is not None else 0
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"kind": kind, "seconds": seconds, "peak_rss_mb": rss_mb, "model_mb": size / 2**20,
                      "quantized_weights": n_quantized}))


def _run(cmd: list[str]) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
    return out.stdout


def run_child(kind: str, folder: Path) -> dict:
    return json.loads(_run([sys.executable, __file__, "--child", kind, str(folder)]).strip().splitlines()[-1])


def quantize_speed() -> dict:
    """G weights/s of one [2816, 1024] bf16 matrix through lorakit.quantize_4bit and, when
    installed, bitsandbytes.functional.quantize_4bit (both NF4 + double quant, CPU)."""
    import torch

    import lorakit

    w = (torch.randn(2816, 1024) * 0.02).to(torch.bfloat16)
    fns = {"lorakit": lambda: lorakit.quantize_4bit(w, "nf4", 64, True)}
    try:
        import bitsandbytes.functional as F

        fns["bitsandbytes"] = lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4")
    except ImportError:
        pass
    speed = {}
    for name, fn in fns.items():
        fn()
        best = min(C.timed(fn) for _ in range(5))
        speed[name] = w.numel() / best / 1e9
    return speed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=os.path.expanduser("~/.cache/lorakit-bench"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", nargs=2, metavar=("KIND", "FOLDER"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, arg = args.child
        if kind == "make":
            return make_checkpoint(Path(arg))
        if kind == "speed":
            return print(json.dumps(quantize_speed()))
        return child(kind, arg)
    # This parent never imports torch: Linux carries a parent's RSS at fork into the child's
    # ru_maxrss, so a heavy parent would raise every child's measured peak to its own size.
    folder = Path(args.cache) / "qwen2-336m-bf16"
    _run([sys.executable, __file__, "--child", "make", str(folder)])
    results = {k: [] for k in KINDS}
    for _ in range(args.repeats):  # alternate so load on the shared CPU hits both sides alike
        for kind in KINDS:
            r = run_child(kind, folder)
            results[kind].append(r)
            print(json.dumps(r), flush=True)
    speed = json.loads(_run([sys.executable, __file__, "--child", "speed", "-"]).strip().splitlines()[-1])
    report(results, speed)


def report(results: dict, speed: dict) -> None:
    base = {k: min(r["peak_rss_mb"] for r in results[k]) for k in BASELINES}
    best = {k: {"seconds": min(r["seconds"] for r in v), "rss": min(r["peak_rss_mb"] for r in v),
                "rss_max": max(r["peak_rss_mb"] for r in v), "model": v[0]["model_mb"], "q": v[0]["quantized_weights"]}
            for k, v in results.items() if k not in BASELINES}
    print(f"\nbaseline (import torch + transformers + lorakit): peak RSS {base['baseline']:.0f} MB; "
          f"+ the model class's module: {base['baseline+model-code']:.0f} MB")
    print(f"{'':<18}{'load s':>8}{'peak RSS MB':>13}{'(max)':>7}{'- baseline':>12}{'model MB':>10}"
          f"{'RSS/model':>11}{'G w/s':>8}")
    for k, b in best.items():
        print(f"{k:<18}{b['seconds']:>8.1f}{b['rss']:>13.0f}{b['rss_max']:>7.0f}{b['rss'] - base['baseline']:>12.0f}"
              f"{b['model']:>10.0f}{b['rss'] / b['model']:>11.2f}{b['q'] / b['seconds'] / 1e9:>8.3f}")
    lk, peer = best["lorakit"], best["transformers+bnb"]
    print(f"\nlorakit / peer: peak RSS {lk['rss'] / peer['rss']:.2f}x (worst runs {lk['rss_max'] / peer['rss_max']:.2f}x), "
          f"above baseline {(lk['rss'] - base['baseline']) / (peer['rss'] - base['baseline']):.2f}x, "
          f"load time {lk['seconds'] / peer['seconds']:.2f}x")
    print(f"target 1: lorakit peak RSS <= 0.5x peer: {'met' if lk['rss_max'] <= 0.5 * peer['rss'] else 'MISSED'}")
    limit = 1.25 * lk["model"] + 300
    print(f"target 2: lorakit peak RSS {lk['rss']:.1f} MB (worst {lk['rss_max']:.1f}) <= 1.25 x model {lk['model']:.0f} MB "
          f"+ 300 MB = {limit:.1f} MB: {'met' if lk['rss_max'] <= limit else 'MISSED'}; the load itself adds "
          f"{lk['rss'] - base['baseline+model-code']:.0f} MB over importing the model code "
          f"({(lk['rss'] - base['baseline+model-code']) / lk['model']:.2f}x the model)")
    print("quantize_4bit speed, one [2816, 1024] bf16 matrix, NF4 + double quant (G weights/s): "
          + ", ".join(f"{k} {v:.3f}" for k, v in speed.items()))


if __name__ == "__main__":
    main()
