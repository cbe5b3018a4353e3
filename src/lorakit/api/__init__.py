"""The notebook-first Python API: `finetune` -> `Run`, `estimate`, `sweep` (docs/api.md).

Layer 8, beside cli.py: it calls the recipes (the same functions the commands call) and adds
nothing to what they compute; fields.py maps keyword arguments onto the RunConfig.
"""

from .fields import config_from_fields
from .run import Run, finetune
from .tables import EstimateTable, SweepTable, estimate, sweep

__all__ = ["Run", "finetune", "estimate", "sweep", "EstimateTable", "SweepTable", "config_from_fields"]
