"""The checkpoint format, in one place. Each checkpoint is a folder written atomically:

    checkpoint-000100/
        adapter_config.json, adapter_model.safetensors   the adapter (PEFT format)
        trainer_state.pt      optimizer, scheduler, RNG states, data position, step, best metric
                              (tensors and plain Python values only: loads with weights_only=True)
        run_config.yaml       the run's configuration

It is written to a temporary folder, fsynced and renamed, so a crash mid-save leaves the previous
checkpoint as it was. `--resume` picks the newest complete one.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Optional

import torch

from ..lora.io import load_adapter, write_adapter_files
from ..utils.fs import atomic_dir

STATE_NAME = "trainer_state.pt"
_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# What lorakit writes into a run folder (train.output_dir), as utils/fs.py manifest entries: the
# files and sub-folders `--overwrite` may replace. Anything else in the folder is the user's.
RUN_FILES = ("metrics.jsonl", "run_config.yaml", "run_info.json", "report.html", "loss_curve.png", "samples.jsonl",
             "tensorboard", "adapter", "best_adapter", "checkpoint-*", ".checkpoint-*", ".adapter*", ".best_adapter*",
             "merged", ".merged*", "demo_summary.json")


def rng_state(device: torch.device = torch.device("cpu")) -> dict:
    """This process's random states: torch's CPU generator, Python's, and the training GPU's (only
    that one: asking every visible GPU would create a CUDA context on each)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device = torch.device("cpu")) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    if "cuda" in state and device.type == "cuda":
        cuda = state["cuda"]
        torch.cuda.set_rng_state(cuda[0] if isinstance(cuda, (list, tuple)) else cuda, device)


def _as_tuple(v):
    return tuple(_as_tuple(x) for x in v) if isinstance(v, (list, tuple)) else v


def save_checkpoint(run_dir: Path, step: int, model, trainer_state: dict, config_yaml: str,
                    adapter: Optional[dict] = None) -> Path:
    """`trainer_state` holds the optimizer, schedule, loss scale, loop state and "rng_per_rank" (each
    rank's rng_state, rank 0's also as "rng"); `adapter`: its tensors when already gathered from the
    ranks (lora/io.adapter_state_dict)."""
    path = Path(run_dir) / f"checkpoint-{step:06d}"
    ranks = trainer_state.get("rng_per_rank") or [rng_state()]
    with atomic_dir(path) as tmp:
        write_adapter_files(model, tmp, tensors=adapter)
        torch.save({**trainer_state, "rng": ranks[0], "rng_per_rank": ranks}, tmp / STATE_NAME)
        (tmp / "run_config.yaml").write_text(config_yaml, encoding="utf-8")
    return path


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of an interrupted save are ignored)."""
    if not Path(run_dir).is_dir():
        return []
    found = [(int(m.group(1)), p) for p in Path(run_dir).iterdir() if (m := _PATTERN.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if (p / STATE_NAME).is_file()]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load_checkpoint(path: Path, model) -> dict:
    """Load the adapter weights into `model` (which already has its LoRA layers) and return the
    trainer state; restoring RNG states is the caller's last step (set_rng_state)."""
    load_adapter(model, path)
    return torch.load(Path(path) / STATE_NAME, map_location="cpu", weights_only=True)


def prune_checkpoints(run_dir: Path, keep_last: int, keep: Optional[Path] = None) -> None:
    """Delete all but the newest `keep_last` checkpoints, never `keep` (the best one)."""
    found = list_checkpoints(run_dir)
    doomed = found[:-keep_last] if keep_last > 0 else found
    for p in doomed:
        if keep is None or p.resolve() != Path(keep).resolve():
            shutil.rmtree(p, ignore_errors=True)
