"""Predicted vs measured peak memory of training steps, over lorakit.memory.measure.GRID.

    python bench/bench_memory.py                 # the whole grid (minutes on CPU)
    python bench/bench_memory.py --only tiny     # cases whose name contains "tiny"
    python bench/bench_memory.py --fit           # also: the --fit pick for a tight budget, measured
    python bench/bench_memory.py --json out.json

On CPU the measure is the allocator's live bytes from torch.profiler memory events; on a GPU,
torch.cuda.max_memory_allocated (see lorakit/memory/measure.py). A case passes when the
prediction (peak allocated, i.e. without the runtime overhead) is within 15% of the measurement.
The --fit check asks the planner for the cheapest configuration that fits 85% of the case's own
predicted total, measures it, and passes when the measurement is within that budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from lorakit.memory.estimate import estimate
from lorakit.memory.measure import GRID, MeasureCase, build_hf_config, measure_case, on_device
from lorakit.memory.planner import fit, format_bytes
from lorakit.memory.shapes import from_hf_config

TOLERANCE = 0.15


def run_case(case: MeasureCase, device: str) -> dict:
    shape = from_hf_config(build_hf_config(case.config), name=case.name)
    est = estimate(shape, case.settings)
    t0 = time.perf_counter()
    m = measure_case(case, device=device)
    ratio = est.peak_allocated_bytes / m.peak_bytes
    return {"case": case.name, "params_M": round(shape.n_params() / 1e6, 1), "predicted": est.peak_allocated_bytes,
            "measured": m.peak_bytes, "ratio": ratio, "ok": abs(ratio - 1) <= TOLERANCE, "seconds": time.perf_counter() - t0,
            "method": m.method, "components": est.components}


def run_fit(case: MeasureCase, device: str) -> dict:
    shape = from_hf_config(build_hf_config(case.config), name=case.name)
    budget = int(0.85 * estimate(shape, case.settings).total_bytes)
    options = fit(shape, case.settings, budget, effective_batch=case.settings.batch_size)
    if not options:
        return {"case": case.name, "budget": budget, "pick": None, "ok": True}
    pick = options[0]
    m = measure_case(MeasureCase(case.name + "-fit", case.config, pick.settings, grad_accum=pick.grad_accum),
                     device=device)
    return {"case": case.name, "budget": budget, "pick": pick.describe(), "predicted_total": pick.predicted_bytes,
            "measured": m.peak_bytes, "ok": m.peak_bytes <= budget}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="", help="run the cases whose name contains this text")
    p.add_argument("--fit", action="store_true", help="also measure the planner's pick for a tight budget")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    cases = [on_device(c, args.device) for c in GRID if args.only in c.name]
    rows, fits = [], []
    print(f"{'case':<28} {'params':>8} {'predicted':>11} {'measured':>11} {'pred/meas':>9}  ok   ({args.device})")
    for case in cases:
        r = run_case(case, args.device)
        rows.append(r)
        print(f"{r['case']:<28} {r['params_M']:>7.1f}M {format_bytes(r['predicted']):>11} {format_bytes(r['measured']):>11} "
              f"{r['ratio']:>9.3f}  {'yes' if r['ok'] else 'NO'}  {r['seconds']:.0f}s", flush=True)
    if args.fit:
        print("\n--fit at 85% of each case's predicted total: the planner's first pick, measured")
        for case in cases:
            f = run_fit(case, args.device)
            fits.append(f)
            if f["pick"] is None:
                print(f"{f['case']:<28} budget {format_bytes(f['budget'])}: nothing fits (nothing to measure)")
            else:
                print(f"{f['case']:<28} budget {format_bytes(f['budget'])}: {f['pick']}; measured "
                      f"{format_bytes(f['measured'])} {'<= budget' if f['ok'] else '> BUDGET'}", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump({"device": args.device, "cases": rows, "fit": fits}, fh, indent=2)
    bad = [r["case"] for r in rows if not r["ok"]] + [f["case"] + " (fit)" for f in fits if not f["ok"]]
    print(f"\n{len(rows) - sum(not r['ok'] for r in rows)}/{len(rows)} within {TOLERANCE:.0%}"
          + (f"; failing: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
