"""Memory estimator and planner: predict a training step's peak memory and fit runs to a budget."""

from .estimate import Estimate, Settings, estimate
from .planner import DoesNotFit, fit, parse_size, plan_micro_batch, predict_for_run, settings_for_run
from .shapes import ModelShape, builtin_names, gpu_table, resolve_shape

__all__ = ["Estimate", "Settings", "estimate", "DoesNotFit", "fit", "parse_size", "plan_micro_batch",
           "predict_for_run", "settings_for_run", "ModelShape", "builtin_names", "gpu_table", "resolve_shape"]
