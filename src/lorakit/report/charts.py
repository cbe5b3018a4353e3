"""The report's charts, built from metrics.jsonl records and run summaries (SVG strings, see svg.py)."""

from __future__ import annotations

from typing import Sequence

from .summary import RunSummary
from .svg import Series, bar_chart, line_chart

LOSS_UNIT = "loss (nats / supervised token)"


def _pts(records: Sequence[dict], key: str) -> list[tuple[float, float]]:
    return [(r["step"], r[key]) for r in records if r.get(key) is not None and "step" in r]


def loss_chart(records: Sequence[dict]) -> str:
    """Training loss per logged step, validation loss at each evaluation (markers)."""
    series = [Series("train", _pts(records, "loss")),
              Series("validation", _pts(records, "val_loss"), markers=True)]
    return line_chart(series, "loss", "optimizer step", LOSS_UNIT)


def lr_chart(records: Sequence[dict]) -> str:
    return line_chart([Series("learning rate", _pts(records, "lr"))], "learning rate", "optimizer step", "lr")


def throughput_chart(records: Sequence[dict]) -> str:
    """Tokens per second (the loop logs the running average since the run (re)started)."""
    return line_chart([Series("tokens/s", _pts(records, "tokens_per_s"))], "throughput", "optimizer step",
                      "tokens / s (running mean)")


def memory_chart(summaries: Sequence[RunSummary]) -> str:
    """Predicted vs measured peak memory per run (each run's own figure: RSS on CPU, reserved on CUDA), in MiB."""
    mib = lambda v: None if v is None else v / 2**20
    rows = [(s.name, [mib(s.predicted_peak_bytes), mib(s.peak_memory_bytes)]) for s in summaries]
    return bar_chart(rows, ["predicted", "measured"], "peak memory", "MiB")


def sweep_val_chart(named_records: Sequence[tuple[str, Sequence[dict]]]) -> str:
    """Validation loss against step, one line per run."""
    series = [Series(name, _pts(records, "val_loss"), markers=True) for name, records in named_records]
    return line_chart(series, "validation loss per run", "optimizer step", "validation " + LOSS_UNIT, height=360)


def rank_chart(summaries: Sequence[RunSummary]) -> str:
    """Best validation loss against rank (log2 axis), one line per (method, lr)."""
    done = [s for s in summaries if s.r is not None and s.best_val_loss is not None]  # unfinished runs are left out
    groups: dict[str, list[RunSummary]] = {}
    lrs = {s.lr for s in done}
    for s in done:
        label = ("qlora" if s.quantization else "lora") + (f" lr={s.lr:g}" if len(lrs) > 1 else "")
        groups.setdefault(label, []).append(s)
    series = []
    for label, runs in groups.items():
        runs = sorted(runs, key=lambda s: s.r)
        series.append(Series(label, [(s.r, s.best_val_loss) for s in runs], markers=True,
                             labels=[f"{s.best_val_loss:.3f}" for s in runs]))
    ranks = sorted({s.r for s in summaries if s.r is not None})
    return line_chart(series, "best validation loss vs rank", "LoRA rank r", "best validation loss",
                      log_x=True, xticks=ranks or None)
