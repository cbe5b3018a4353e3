"""The demo fine-tune's greedy exact match on its test split through llama.cpp (f16, q8_0, Q4_K_M
GGUF of base + adapter) beside transformers' on the merged model. Needs llama-cpp-python
(scripts/build_llama_cpp.sh) and an adapter from `lorakit demo --out RUN`.

    python bench/bench_demo_llama_cpp.py RUN/adapter [--rows 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))


def main() -> None:
    import numpy as np
    import torch
    from llama_cpp import Llama

    import lorakit
    from lorakit.export.gguf import export_gguf

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("adapter")
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--max-new-tokens", type=int, default=16)
    args = p.parse_args()
    torch.set_num_threads(1)
    demo = HERE.parent / "src/lorakit/assets/demo"
    rows = [json.loads(line) for line in (demo / "test.jsonl").read_text().splitlines()[: args.rows]]
    prompts = [f"### Instruction:\n{r['instruction']}\n\n### Input:\n{r['context']}\n\n### Response:\n" for r in rows]
    model, tok = lorakit.load_model(str(demo / "model"), compute_dtype="fp32")
    lorakit.load_adapter(model, args.adapter, trainable=False)
    merged = lorakit.merge(model).eval()
    eos = tok.eos_token_id

    def decode(ids):
        ids = ids[: ids.index(eos)] if eos in ids else ids
        return tok.decode(ids, skip_special_tokens=True).strip()

    @torch.no_grad()
    def hf(prompt):
        ids, out = tok(prompt).input_ids, []
        for _ in range(args.max_new_tokens):
            nxt = int(merged(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
        return out

    def cpp(llm, prompt):
        ids = tok(prompt).input_ids
        llm.reset()
        llm.eval(ids)
        out = []
        for _ in range(args.max_new_tokens):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(nxt)
            if nxt == eos:
                break
            llm.eval([nxt])
        return out

    ref = [hf(p) for p in prompts]
    results = {"transformers (merged, fp32)": (sum(decode(o) == r["response"] for o, r in zip(ref, rows)) / len(rows), 1.0)}
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f16", "q8_0", "q4_k_m"):
            path = export_gguf(str(demo / "model"), f"{tmp}/{quant}.gguf", quant, adapter_path=args.adapter, progress=False).path
            llm = Llama(str(path), n_ctx=512, n_threads=1, logits_all=True, verbose=False)
            outs = [cpp(llm, p) for p in prompts]
            llm.close()
            em = sum(decode(o) == r["response"] for o, r in zip(outs, rows)) / len(rows)
            same = sum(o == r for o, r in zip(outs, ref)) / len(rows)
            results[f"llama.cpp {quant}"] = (em, same)
    print(f"| decoder ({len(rows)} test rows, greedy) | exact match | same tokens as transformers |\n|---|---|---|")
    for k, (em, same) in results.items():
        print(f"| {k} | {100 * em:.1f}% | {100 * same:.1f}% |")


if __name__ == "__main__":
    main()
