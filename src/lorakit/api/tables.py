"""`lorakit.estimate(...)` and `lorakit.sweep(...)`: the commands' tables as objects a notebook cell
shows (`_repr_html_`) and a script prints (`str`), with the numbers behind them as attributes.

    lorakit.estimate("llama-2-7b", method="qlora", seq_len=512)       # per-component memory, GPUs it fits
    lorakit.sweep("configs/cpu-lora.yaml", ranks=[8, 16, 32])        # train, compare, name the best run
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence, Union

from ..config import ConfigError
from ..memory.estimate import Estimate, Settings
from ..report.summary import RunSummary
from .fields import config_from_fields
from .run import Run


class EstimateTable:
    """One memory estimate (memory/estimate.py): `components` (bytes per component), `total_bytes`
    (what must fit), `fits` (GPU name -> bool); `estimate` is the Estimate itself."""

    def __init__(self, estimate: Estimate):
        self.estimate = estimate

    @property
    def components(self) -> dict[str, int]:
        return dict(self.estimate.components)

    @property
    def total_bytes(self) -> int:
        return self.estimate.total_bytes

    @property
    def fits(self) -> dict[str, bool]:
        return self.estimate.to_dict()["fits"]

    def fits_in(self, budget: Union[str, int]) -> bool:
        """Whether the total fits `budget` ("15GiB", "24GB" or bytes)."""
        from ..memory.planner import parse_size

        return self.total_bytes <= (budget if isinstance(budget, int) else parse_size(budget))

    def __str__(self) -> str:
        from ..recipes.estimate import format_table

        return format_table(self.estimate)

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        from ..recipes.estimate import format_html

        return format_html(self.estimate)


def estimate(model, **settings) -> EstimateTable:
    """Predict the peak memory of a training step, per component, as `lorakit estimate` does.

    `model`: a built-in name ("llama-2-7b", "qwen2.5-0.5b", ...), a local folder or config.json, a
    hub id, or a loaded model. `settings`: memory/estimate.py Settings fields, named like the
    command's flags: method ("qlora", "lora", "full"), seq_len, batch_size, rank, targets,
    grad_ckpt, optimizer, dtype, device ("cuda", "cpu"), world_size, strategy, ...
    """
    from ..memory.estimate import estimate as estimate_memory

    names = [f.name for f in dataclasses.fields(Settings)]
    for key in settings:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=2)
            raise ConfigError(f"unknown estimate setting {key!r}; " + (f"did you mean {' or '.join(map(repr, close))}? "
                              if close else "") + f"allowed: {', '.join(names)}")
    if isinstance(settings.get("targets"), list):
        settings["targets"] = tuple(settings["targets"])
    return EstimateTable(estimate_memory(model, Settings(**settings)))


class SweepTable:
    """A finished sweep (recipes/sweep.py): `summaries` (one RunSummary per run), `best` and `why`,
    `table` (Markdown), `runs` (name -> Run, each reopened from its folder), `best_run`."""

    def __init__(self, result):
        self.result = result
        self.sweep_dir: Path = Path(result.sweep_dir)

    @property
    def summaries(self) -> list[RunSummary]:
        return list(self.result.summaries)

    @property
    def best(self) -> Optional[RunSummary]:
        return self.result.best

    @property
    def why(self) -> str:
        return self.result.why

    @property
    def table(self) -> str:
        return self.result.table

    @property
    def runs(self) -> dict[str, Run]:
        return {s.name: Run.load(s.run_dir) for s in self.result.summaries}

    @property
    def best_run(self) -> Optional[Run]:
        return Run.load(self.best.run_dir) if self.best is not None else None

    def __str__(self) -> str:
        return f"{self.table}\n\n{self.why}"

    def __repr__(self) -> str:
        return str(self)

    def _repr_html_(self) -> str:
        from ..report.html import sweep_card

        return sweep_card(self.sweep_dir)


def sweep(config=None, *, ranks: Sequence[int], methods: Optional[Sequence[str]] = None,
          lrs: Optional[Sequence[float]] = None, alpha_ratio: Optional[float] = None,
          out: Union[str, os.PathLike, None] = None, restart: bool = False, progress: bool = True,
          tolerance: Optional[float] = None, overrides: Union[Mapping, Sequence[str], None] = None,
          **fields) -> SweepTable:
    """Train the same run at several ranks (and methods "lora" / "qlora", learning rates) on the
    same data, split, seed and steps, compare them and name the best: recipes/sweep.py, as
    `lorakit sweep`. The config is given as to lorakit.finetune (a YAML path, RunConfig or dict,
    plus fields and overrides); `out` is the sweep folder (default: train.output_dir). Running it
    again reuses finished runs and resumes an interrupted one."""
    from ..recipes.sweep import TOLERANCE, run_sweep

    cfg = config_from_fields(config, overrides, **fields)
    methods = list(methods) if methods else ["qlora" if cfg.model.quantization else "lora"]
    ranks = [ranks] if isinstance(ranks, int) else list(ranks)
    if not ranks:
        raise ConfigError("ranks is empty; give the LoRA ranks to compare, e.g. ranks=[8, 16, 32]")
    result = run_sweep(cfg, ranks, methods, alpha_ratio, list(lrs) if lrs else None, os.fspath(out) if out else None,
                       restart, progress=progress, tolerance=TOLERANCE if tolerance is None else tolerance)
    return SweepTable(result)
