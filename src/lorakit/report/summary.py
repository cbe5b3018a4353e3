"""What one run folder says about its run, read from its files only (so a report or a sweep table can
be rebuilt at any time, and its numbers are exactly those of metrics.jsonl).

Run folder (written by lorakit.train.loop):
    metrics.jsonl       {"step","loss","lr","grad_norm","tokens_per_s","supervised_tokens"} per logged step,
                        {"step","val_loss","val_ppl","train_loss_mean"} per evaluation,
                        {"step","event":"end","reason","peak_memory_bytes","seconds","best_val_loss","best_step"}
    run_config.yaml     the RunConfig
    adapter/, best_adapter/   PEFT-format adapters
    run_info.json       (optional, `write_run_info`) trainable parameters and predicted peak memory
    samples.jsonl       (optional) {"prompt", "output", "reference"?, "step"?} sample generations
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from ..methods import method_of as config_method
from ..train.log import read_metrics
from ..utils.fs import atomic_file

log = logging.getLogger("lorakit")
RUN_INFO = "run_info.json"


@dataclass
class RunSummary:
    name: str
    run_dir: str
    finished: bool
    steps: int
    best_val_loss: Optional[float]
    best_step: Optional[int]
    final_train_loss: Optional[float]
    final_val_loss: Optional[float]
    overfit_gap: Optional[float]
    """Validation loss minus the mean training loss of the steps before it, at the last evaluation:
    how much better the adapter does on rows it trained on than on held-out rows."""
    val_rise: Optional[float]
    """Last validation loss minus the best one (> 0: validation got worse after its best step)."""
    seconds: Optional[float]
    tokens_per_s: Optional[float]
    peak_memory_bytes: Optional[int]
    """Measured headline peak: the process's peak RSS on CPU, max_memory_reserved on CUDA."""
    predicted_peak_bytes: Optional[int]
    """The prediction of the same figure (run_info.json)."""
    memory_figure: str
    """What the two figures above are: "peak RSS" or "peak reserved" (or "n/a")."""
    trainable_params: Optional[int]
    adapter_bytes: Optional[int]
    reason: str
    r: Optional[int]
    alpha: Optional[float]
    lr: Optional[float]
    quantization: Optional[str]
    method: Optional[str] = None  # config.method_of: "lora", "qlora+dora", "pissa+loraplus", ...

    def to_dict(self) -> dict:
        return asdict(self)


def end_event(records: list[dict]) -> Optional[dict]:
    """The run's final {"event": "end"} record, if the last record is one."""
    return records[-1] if records and records[-1].get("event") == "end" else None


def is_finished(run_dir: str | os.PathLike) -> bool:
    """A run is finished when metrics.jsonl ends with the "end" event and adapter/ was written."""
    run_dir = Path(run_dir)
    return end_event(read_metrics(run_dir)) is not None and (run_dir / "adapter" / "adapter_config.json").is_file()


def folder_bytes(folder: str | os.PathLike) -> Optional[int]:
    """Total size of the files in a folder (None when it does not exist)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def adapter_param_count(folder: str | os.PathLike) -> Optional[int]:
    """Number of values stored in an adapter's safetensors file (its header only is read)."""
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        return None
    from safetensors import safe_open

    total = 0
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total


def read_config(run_dir: str | os.PathLike) -> dict:
    import yaml

    path = Path(run_dir) / "run_config.yaml"
    return (yaml.safe_load(path.read_text(encoding="utf-8")) or {}) if path.is_file() else {}


def read_run_info(run_dir: str | os.PathLike) -> dict:
    path = Path(run_dir) / RUN_INFO
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_run_info(run_dir: str | os.PathLike, model, predicted_peak_bytes: Optional[int],
                   predicted_memory: Optional[dict] = None) -> Path:
    """Record what only the live run knows beside it: trainable parameters and the run's one memory
    prediction (the numbers `lorakit train` printed): `predicted_peak_bytes` is the figure of the same
    kind as the measured peak_memory_bytes (RSS on CPU, reserved on CUDA), `predicted_memory` every
    predicted figure (memory/planner.py MemoryPrediction)."""
    from ..lora.inject import count_parameters

    trainable, total = count_parameters(model)
    info = {"trainable_params": trainable, "total_params": total, "predicted_peak_bytes": predicted_peak_bytes,
            "predicted_memory": predicted_memory}
    path = Path(run_dir) / RUN_INFO
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return path


def read_samples(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "samples.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def summarize_run(run_dir: str | os.PathLike, name: Optional[str] = None) -> RunSummary:
    """Every number of the comparison table for one run, from its folder."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "val_loss" in r]
    end = end_event(records) or {}
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None  # first of equal minima, as the loop keeps
    last = evals[-1] if evals else None
    cfg, info = read_config(run_dir), read_run_info(run_dir)
    lora, train, model = cfg.get("lora", {}), cfg.get("train", {}), cfg.get("model", {})
    trainable = info.get("trainable_params")
    if trainable is None:
        trainable = adapter_param_count(run_dir / "adapter")
    return RunSummary(
        name=name or run_dir.name, run_dir=str(run_dir), finished=is_finished(run_dir),
        steps=int(end.get("step", steps[-1]["step"] if steps else 0)),
        best_val_loss=best["val_loss"] if best else None, best_step=best["step"] if best else None,
        final_train_loss=steps[-1]["loss"] if steps else None,
        final_val_loss=last["val_loss"] if last else None,
        overfit_gap=last["val_loss"] - last["train_loss_mean"] if last else None,
        val_rise=last["val_loss"] - best["val_loss"] if last else None,
        seconds=end.get("seconds"), tokens_per_s=steps[-1].get("tokens_per_s") if steps else None,
        peak_memory_bytes=end.get("peak_memory_bytes"), predicted_peak_bytes=info.get("predicted_peak_bytes"),
        memory_figure=_memory_figure(end, info),
        trainable_params=trainable, adapter_bytes=folder_bytes(run_dir / "adapter"),
        reason=end.get("reason", "unfinished"), r=lora.get("r"), alpha=lora.get("alpha"), lr=train.get("lr"),
        quantization=model.get("quantization"), method=config_method(cfg) if cfg else None,
    )


def _memory_figure(end: dict, info: dict) -> str:
    device = (info.get("predicted_memory") or {}).get("device")
    if device is None and end:
        device = "cuda" if "peak_reserved_bytes" in end else "cpu"
    return {"cpu": "peak RSS", "cuda": "peak reserved"}.get(device, "n/a")


# ------------------------------------------------------------------ formatting


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def fmt_num(v: Any, spec: str = ".4f") -> str:
    if v is None:
        return "n/a"
    return format(v, spec)


def method_of(s: RunSummary) -> str:
    """The run's method ('lora', 'qlora+dora', ...: config.method_of), with its 4-bit type."""
    method = s.method or ("qlora" if s.quantization else "lora")
    return method.replace("qlora", f"qlora ({s.quantization})", 1) if s.quantization else method


# (header, cell text) for the comparison table, shared by the terminal and the HTML report.
COLUMNS = (
    ("run", lambda s: s.name),
    ("method", method_of),
    ("r", lambda s: fmt_num(s.r, "d")),
    ("alpha", lambda s: fmt_num(s.alpha, "g")),
    ("lr", lambda s: fmt_num(s.lr, "g")),
    ("best val loss", lambda s: fmt_num(s.best_val_loss)),
    ("at step", lambda s: fmt_num(s.best_step, "d")),
    ("final train loss", lambda s: fmt_num(s.final_train_loss)),
    ("overfit gap", lambda s: fmt_num(s.overfit_gap, "+.4f")),
    ("wall s", lambda s: fmt_num(s.seconds, ".1f")),
    ("tokens/s", lambda s: fmt_num(s.tokens_per_s, ".0f")),
    ("memory figure", lambda s: s.memory_figure),
    ("predicted", lambda s: fmt_bytes(s.predicted_peak_bytes)),
    ("measured", lambda s: fmt_bytes(s.peak_memory_bytes)),
    ("trainable params", lambda s: fmt_num(s.trainable_params, ",d")),
    ("adapter size", lambda s: fmt_bytes(s.adapter_bytes)),
)


def table_rows(summaries: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    return [h for h, _ in COLUMNS], [[cell(s) for _, cell in COLUMNS] for s in summaries]


def format_table(summaries: list[RunSummary]) -> str:
    """A Markdown table (readable as plain text in a terminal)."""
    headers, rows = table_rows(summaries)
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + " |"
    sep = "|" + "|".join("-" * (w + 1) + ":" if i else "-" * (w + 2) for i, w in enumerate(widths)) + "|"
    return "\n".join([line(headers), sep] + [line(r) for r in rows])
