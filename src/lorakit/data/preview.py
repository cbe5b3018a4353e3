"""Human-readable views of tokenized data: the first examples with supervised spans marked, and stats."""

from __future__ import annotations

from .tokenize import IGNORE_INDEX, DataStats

MARK = ("[[", "]]")  # plain-text markers around supervised spans
ANSI = ("\033[32m", "\033[0m")  # green on / reset, used only with color=True


def _runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """Maximal runs of equal supervision: (start, end, supervised)."""
    runs: list[tuple[int, int, bool]] = []
    for i, label in enumerate(labels):
        sup = label != IGNORE_INDEX
        if runs and runs[-1][2] == sup:
            runs[-1] = (runs[-1][0], i + 1, sup)
        else:
            runs.append((i, i + 1, sup))
    return runs


def mark_supervised(example: dict, tokenizer, color: bool = False) -> str:
    """Decode one example, wrapping supervised spans in [[ ]] (or ANSI green when color=True)."""
    on, off = ANSI if color else MARK
    ids = example["input_ids"]
    parts = []
    for start, end, sup in _runs(list(example["labels"])):
        text = tokenizer.decode(ids[start:end], skip_special_tokens=False)
        parts.append(f"{on}{text}{off}" if sup else text)
    return "".join(parts)


def preview(examples: list[dict], tokenizer, n: int = 3, color: bool = False) -> str:
    """The first n examples, decoded, with supervised spans marked; color=True only for a tty."""
    on, off = ANSI if color else MARK
    head = f"supervised tokens are shown as {on}...{off}" if not color else "supervised tokens are green"
    blocks = [head]
    for i, ex in enumerate(examples[:n]):
        sides = [("", ex)]
        if "rejected_input_ids" in ex:  # a preference pair: both sequences
            sides = [(" chosen", ex), (" rejected", {"input_ids": ex["rejected_input_ids"], "labels": ex["rejected_labels"]})]
        for name, side in sides:
            n_sup = sum(label != IGNORE_INDEX for label in side["labels"])
            blocks.append(f"--- example {i}{name} ({len(side['input_ids'])} tokens, {n_sup} supervised) ---")
            blocks.append(mark_supervised(side, tokenizer, color))
    return "\n".join(blocks)


def stats_text(stats: DataStats) -> str:
    """Counts, length min/mean/max, supervised tokens, truncated and dropped rows, one per line."""
    lengths = stats.lengths or [0]
    share = stats.n_supervised_tokens / stats.n_tokens if stats.n_tokens else 0.0
    lines = [
        f"format: {stats.format or '?'}",
        f"rows: {stats.n_rows}  examples: {stats.n_examples}",
        f"length (tokens): min {min(lengths)}  mean {sum(lengths) / len(lengths):.1f}  max {max(lengths)}",
        f"tokens: {stats.n_tokens}  supervised: {stats.n_supervised_tokens} ({share:.1%})",
        f"truncated to max_seq_len: {stats.n_truncated}",
        f"dropped (no supervised token left): {stats.n_dropped_no_supervision}",
    ]
    return "\n".join(lines)
