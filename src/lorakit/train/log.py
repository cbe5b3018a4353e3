"""Run records: metrics as JSON lines (mirrored to the trackers of train.report_to), sample
generations, a loss-curve PNG, peak memory."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch

from ..utils.memory import peak_rss_bytes

log = logging.getLogger("lorakit")


def reset_peak_memory(device: torch.device) -> None:
    """Start the peak figures of `peak_memory` from now (CUDA peak stats; on Linux also the process's
    RSS high-water mark, by writing 5 to /proc/self/clear_refs, proc(5), so a second run in the same
    process (a sweep, a notebook) does not report the first one's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        log.debug("could not reset the peak-RSS record: CPU peaks are since the process started")


def peak_memory(device: torch.device) -> dict:
    """The measured peaks, each named for exactly what it is: "peak_rss_bytes" (the process's resident
    set, what a CPU user sees in top); on CUDA also "peak_allocated_bytes" (torch.cuda.max_memory_allocated:
    tensors) and "peak_reserved_bytes" (max_memory_reserved: what the caching allocator holds, what
    nvidia-smi shows minus the CUDA context). "peak_memory_bytes": the headline figure, RSS on CPU,
    reserved on CUDA."""
    out = {"peak_rss_bytes": peak_rss_bytes()}
    if device.type == "cuda":
        out.update(peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
                   peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)))
    out["peak_memory_bytes"] = out.get("peak_reserved_bytes", out["peak_rss_bytes"])
    return out


class JsonLines:
    """Appends one JSON object per line to a run file; on resume drops the lines of steps after the
    checkpoint the run restarts from."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and self.path.is_file():
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")

    def truncate_after(self, step: int) -> None:
        self._file.close()
        lines = [l for l in self.path.read_text(encoding="utf-8").splitlines() if l.strip()]
        kept = [l for l in lines if json.loads(l).get("step", 0) <= step]
        self.path.write_text("".join(l + "\n" for l in kept), encoding="utf-8")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class NullWriter:
    """What ranks other than 0 write: nothing (rank 0 keeps the run's files)."""

    def write(self, record: dict) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class MetricsWriter(JsonLines):
    """run_dir/metrics.jsonl, each record also sent to the run's trackers (train/trackers.py)."""

    def __init__(self, run_dir: Path, resume: bool = False, trackers: list = ()):
        super().__init__(Path(run_dir) / "metrics.jsonl", resume)
        self.trackers = list(trackers)

    def write(self, record: dict) -> None:
        super().write(record)
        for t in self.trackers:
            t.log(record)

    def close(self) -> None:
        super().close()
        for t in self.trackers:
            t.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()] if path.is_file() else []


def loss_figure(records: list[dict], figure_class=None):
    """Train and validation loss against step, drawn on an explicit matplotlib Figure (of
    `figure_class`, a Figure subclass, if given) with the Agg canvas: no pyplot, no process-wide
    backend switch (which would turn off inline plots in the user's Jupyter or Colab session).
    ImportError without matplotlib."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = (figure_class or Figure)(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    if train:
        ax.plot(*zip(*train), label="train", lw=1.2)
    if val:
        ax.plot(*zip(*val), "o-", label="validation", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats / supervised token)")
    ax.grid(alpha=0.3)
    if train or val:
        ax.legend()
    fig.tight_layout()
    return fig


def plot_loss_curve(run_dir: Path, out: Optional[Path] = None) -> Optional[Path]:
    """loss_figure of the run's metrics.jsonl as a PNG; None (with a note) without matplotlib."""
    try:
        fig = loss_figure(read_metrics(run_dir))
    except ImportError:
        log.info("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None
    out = Path(out or Path(run_dir) / "loss_curve.png")
    fig.savefig(out)
    return out
