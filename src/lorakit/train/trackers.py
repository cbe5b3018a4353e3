"""Experiment trackers: the run's metrics stream (metrics.jsonl) mirrored to TensorBoard, Weights &
Biases, MLflow or Trackio (train.report_to). Each library is imported only when named, and a missing
one is an error naming the pip package, before training starts.

Every tracker gets the same records MetricsWriter writes (train/log.py): numbers become scalars at
the record's "step"; the run's config is logged once at the start.
"""

from __future__ import annotations

from pathlib import Path

from ..config import TRACKERS  # noqa: F401 (the allowed names, validated in config.py)
_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}


def _scalars(record: dict) -> dict:
    return {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class TensorBoard:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        import yaml

        self.writer.add_text("config", "```\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, record: dict) -> None:
        for k, v in _scalars(record).items():
            self.writer.add_scalar(k, v, record.get("step", 0))

    def close(self) -> None:
        self.writer.close()


class Wandb:
    def __init__(self, run_dir: Path, config: dict):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(name=Path(run_dir).name, dir=str(run_dir), config=config, resume="allow")

    def log(self, record: dict) -> None:
        self.run.log(_scalars(record), step=record.get("step", 0))

    def close(self) -> None:
        self.run.finish()


class MLflow:
    def __init__(self, run_dir: Path, config: dict):
        import mlflow

        self.mlflow = mlflow
        mlflow.start_run(run_name=Path(run_dir).name)
        mlflow.log_params({f"{section}.{k}": v for section, fields in config.items() for k, v in fields.items()})

    def log(self, record: dict) -> None:
        self.mlflow.log_metrics({k.replace("/", "_"): v for k, v in _scalars(record).items()}, step=record.get("step", 0))

    def close(self) -> None:
        self.mlflow.end_run()


class Trackio:
    def __init__(self, run_dir: Path, config: dict):
        import trackio

        self.trackio = trackio
        trackio.init(project="lorakit", name=Path(run_dir).name, config=config)

    def log(self, record: dict) -> None:
        self.trackio.log(_scalars(record), step=record.get("step", 0))

    def close(self) -> None:
        self.trackio.finish()


_CLASSES = {"tensorboard": TensorBoard, "wandb": Wandb, "mlflow": MLflow, "trackio": Trackio}


def open_trackers(names, run_dir: Path, config: dict) -> list:
    """The trackers named in train.report_to, opened; a missing library is an ImportError naming the
    pip package to install."""
    out = []
    for name in names:
        try:
            out.append(_CLASSES[name](run_dir, config))
        except ImportError as e:
            for t in out:
                t.close()
            raise ImportError(f"train.report_to names {name!r}, but {e.name or _PACKAGES[name]!r} is not installed: "
                              f"pip install {_PACKAGES[name]}") from None
    return out
