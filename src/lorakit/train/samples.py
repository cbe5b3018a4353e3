"""Sample answers while a run trains: at evaluations, the adapter answers a few fixed validation
prompts, written to run_dir/samples.jsonl beside the expected answer (the report shows them step by
step; users judge a fine-tune by reading its answers as it trains).

    {"step": 50, "index": 0, "prompt": "...", "output": "...", "reference": "..."}

A prompt is its validation example's tokens before the first supervised token (exactly what
training conditioned on), the reference the supervised tokens after it (without the end token).
Decoding is greedy (model/generation.py), one small batch: no more memory than an evaluation.
"""

from __future__ import annotations

from pathlib import Path

from ..data.tokenize import IGNORE_INDEX, pad_token_id
from ..model.generation import generate_ids
from .log import JsonLines


def sample_prompts(examples: list[dict], n: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, reference ids) of the first `n` examples that have a prompt and an answer."""
    out = []
    for e in examples:
        first = next((i for i, y in enumerate(e["labels"]) if y != IGNORE_INDEX), None)
        if first is None or first == 0:
            continue
        out.append((e["input_ids"][:first], [y for y in e["labels"][first:] if y != IGNORE_INDEX]))
        if len(out) == n:
            break
    return out


class Samples:
    def __init__(self, run_dir: Path, examples: list[dict], tokenizer, n: int, max_new_tokens: int, resume: bool):
        self.tokenizer, self.max_new_tokens = tokenizer, max_new_tokens
        self.prompts = sample_prompts(examples, n) if tokenizer is not None and n else []
        self.file = JsonLines(Path(run_dir) / "samples.jsonl", resume) if self.prompts else None

    def truncate_after(self, step: int) -> None:
        if self.file is not None:
            self.file.truncate_after(step)

    def write(self, model, step: int) -> None:
        if self.file is None:
            return
        tok = self.tokenizer
        new = generate_ids(model, [p for p, _ in self.prompts], pad_token_id(tok), tok.eos_token_id, self.max_new_tokens)
        for i, ((prompt, reference), out) in enumerate(zip(self.prompts, new)):
            self.file.write({"step": step, "index": i, "prompt": tok.decode(prompt, skip_special_tokens=True),
                             "output": tok.decode(out, skip_special_tokens=True).strip(),
                             "reference": tok.decode(reference, skip_special_tokens=True).strip()})

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
