"""Predicted vs measured peak memory of real training steps on tiny models (CPU allocator bytes).

The whole grid, up to ~250M parameters, runs in bench/bench_memory.py.
"""

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from lorakit.memory.estimate import estimate
from lorakit.memory.measure import GRID, MeasureCase, build_hf_config, measure_case, peak_in_window
from lorakit.memory.planner import fit
from lorakit.memory.shapes import from_hf_config

TOLERANCE = 0.15


def test_profiler_measure_sees_every_live_byte():
    """The measuring method itself: known allocations and frees give the known peak."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        keep = torch.empty(3000, dtype=torch.uint8)
        with record_function("window"):
            a = torch.empty(1000, dtype=torch.float32)  # +4000
            b = torch.empty(500, dtype=torch.float64)   # +4000 -> peak 3000 + 8000
            del a
            c = torch.empty(100, dtype=torch.uint8)     # 3000 + 4000 + 100 < peak
        del b, c
    loaded, peak = peak_in_window(prof, "window")
    assert (loaded, peak) == (3000, 11000)
    del keep


def _shape(case):
    return from_hf_config(build_hf_config(case.config), name=case.name)


def test_predicted_peak_within_15_percent_of_measured():
    torch.manual_seed(0)
    for case in [c for c in GRID if c.name.startswith("tiny")]:
        predicted = estimate(_shape(case), case.settings).peak_allocated_bytes
        measured = measure_case(case, device="cpu").peak_bytes
        assert abs(predicted / measured - 1) <= TOLERANCE, (case.name, predicted, measured)


def test_fit_pick_measures_within_the_budget():
    torch.manual_seed(0)
    case = GRID[0]
    shape = _shape(case)
    budget = int(0.85 * estimate(shape, case.settings).total_bytes)
    options = fit(shape, case.settings, budget)
    assert options, "some change must fit 85% of the unchanged run"
    assert options[0].settings != case.settings
    pick = options[0]
    measured = measure_case(MeasureCase("fit-pick", case.config, pick.settings, grad_accum=pick.grad_accum),
                            device="cpu").peak_bytes
    assert measured <= budget
