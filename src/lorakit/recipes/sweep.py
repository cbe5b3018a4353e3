"""`lorakit sweep`: train the same config at several ranks / methods / learning rates and compare.

    plan      one RunConfig per (method, rank, lr): same data, split, seed and steps; alpha = ratio * r;
              a method ("lora", "qlora", "dora", "qlora+pissa", "loraplus", ...) sets the variant
              fields of config.with_method, everything else is the config's
    train     sequentially, in this process; a finished run folder is reused, an interrupted one
              resumes from its newest checkpoint (or restarts when it has none)
    compare   a table read back from each run's metrics.jsonl, the best run and why, two plots,
              and report.html (lorakit.report.html)

Sweep folder:
    sweep.json              the plan, each run's status, the results and the choice
    sweep_table.md          the comparison table
    val_loss.svg, best_val_vs_rank.svg
    report.html             self-contained report (open offline)
    r8-lora/, r8-qlora/ ... one ordinary run folder per run (adapter/, best_adapter/ kept)
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence


from ..config import ConfigError, RunConfig, add_run_arguments, config_from_args, to_dict
from ..methods import METHOD_PARTS, method_of, parse_method, with_method
from ..report.summary import RunSummary, end_event, fmt_num, format_table, read_config, summarize_run
from ..train.log import read_metrics
from ..utils.fs import atomic_file, claim_folder

log = logging.getLogger("lorakit")
METHODS = METHOD_PARTS  # combined with "+" (config.parse_method)
MANIFEST = "sweep.json"
# What a sweep writes into its folder besides its run folders (utils/fs.py manifest entries).
SWEEP_FILES = (MANIFEST, "sweep_table.md", "val_loss.svg", "best_val_vs_rank.svg", "report.html", ".*.tmp-*")
TOLERANCE = 0.01  # best-val-loss differences under 1% are treated as noise (the "within e.g. 1%")


@dataclass(frozen=True)
class PlannedRun:
    name: str
    method: str
    cfg: RunConfig

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.train.output_dir)


@dataclass
class SweepResult:
    sweep_dir: Path
    summaries: list[RunSummary]
    best: Optional[RunSummary]
    why: str
    table: str
    reused: list[str]
    trained: list[str]
    report: Optional[Path]


# ------------------------------------------------------------------ plan


def parse_list(text: str, kind: Callable, option: str) -> list:
    """'8,16,32' -> [8, 16, 32]; an error names the option and the bad item."""
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ConfigError(f"{option} is empty; give a comma-separated list, e.g. {option} 8,16,32")
    out = []
    for t in items:
        try:
            out.append(kind(t))
        except ValueError:
            raise ConfigError(f"{option}: {t!r} is not a valid {kind.__name__}") from None
    if len(set(out)) != len(out):
        raise ConfigError(f"{option} {text!r} repeats a value")
    return out


def plan_sweep(cfg: RunConfig, ranks: Sequence[int], methods: Sequence[str], alpha_ratio: Optional[float] = None,
               lrs: Optional[Sequence[float]] = None, sweep_dir: Optional[str | os.PathLike] = None) -> list[PlannedRun]:
    """One config per (method, rank, lr); only lora.r/alpha, train.lr, output_dir and the method's
    fields (config.with_method) vary."""
    for m in methods:
        parse_method(m)
    if alpha_ratio is not None and not alpha_ratio > 0:
        raise ConfigError(f"--alpha-ratio={alpha_ratio!r} is not allowed; it must be > 0")
    ratio = alpha_ratio if alpha_ratio is not None else cfg.lora.alpha / cfg.lora.r  # keep the config's alpha/r
    lrs = list(lrs) if lrs else [cfg.train.lr]
    root = Path(sweep_dir or cfg.train.output_dir)
    plan = []
    for lr in lrs:
        for method in methods:
            for r in ranks:
                name = f"r{r}-{method}" + (f"-lr{lr:g}" if len(lrs) > 1 else "")
                run = replace(cfg, lora=replace(cfg.lora, r=r, alpha=float(ratio * r)),
                              train=replace(cfg.train, lr=lr, output_dir=str(root / name)))
                plan.append(PlannedRun(name, method, with_method(run, method)))  # qlora: the config's 4-bit type or NF4
    return plan


# ------------------------------------------------------------------ run


def run_done(run_dir: Path) -> bool:
    """The trainer wrote its "end" event and either the adapter or a failure reason (diverged)."""
    end = end_event(read_metrics(run_dir))
    if end is None:
        return False
    return (run_dir / "adapter" / "adapter_config.json").is_file() or str(end.get("reason", "")).startswith("stopped:")


def config_differences(saved: dict, planned: RunConfig) -> list[str]:
    """Dotted keys whose saved value differs from the planned one (saved via YAML, so compare as YAML)."""
    import yaml

    want = yaml.safe_load(yaml.safe_dump(to_dict(planned)))
    diffs = []
    for section, fields in want.items():
        for key, value in fields.items():
            if saved.get(section, {}).get(key, object()) != value:
                diffs.append(f"{section}.{key}")
    return diffs


def train_run(run: PlannedRun, resume: bool, progress: bool, overwrite: bool = False) -> None:
    """Train one run (or resume it); finetune leaves run_info.json and report.html in its folder."""
    from .finetune import finetune

    gc.collect()
    out = finetune(run.cfg, resume=resume, progress=progress, overwrite=overwrite)  # seeds the LoRA init
    del out
    gc.collect()


def check_conflicts(plan: Sequence[PlannedRun]) -> None:
    """Refuse (before touching anything) to reuse a sweep folder whose finished runs had other configs."""
    for run in plan:
        if run.run_dir.exists() and run_done(run.run_dir):
            diffs = config_differences(read_config(run.run_dir), run.cfg)
            if diffs:
                raise ConfigError(f"{run.run_dir} holds a finished run with a different config ({', '.join(diffs)}); "
                                  f"use another --out, or --restart to retrain every run")


def prepare_run(run: PlannedRun, restart: bool) -> Optional[str]:
    """None: reuse the finished run; else how to train it: "new", "resume" or "again" (a previous
    run's folder started over: only the files lorakit wrote there are replaced, utils/fs.py)."""
    d = run.run_dir
    if not d.exists():
        return "new"
    if restart:
        return "again"
    diffs = config_differences(read_config(d), run.cfg)
    if run_done(d) and not diffs:
        return None
    from ..train.checkpoint import latest_checkpoint

    if not diffs and latest_checkpoint(d) is not None:
        return "resume"
    log.info("%s: unfinished and %s: starting it again", d, "config changed" if diffs else "no checkpoint")
    return "again"


def execute(run: PlannedRun, restart: bool, progress: bool) -> str:
    """Bring one run to done; returns "reused", "trained" or "resumed"."""
    how = prepare_run(run, restart)
    if how is None:
        return "reused"
    train_run(run, resume=how == "resume", progress=progress, overwrite=how == "again")
    if how == "resume" and not run_done(run.run_dir):  # e.g. killed between its last checkpoint and the adapter
        log.info("%s: the resumed run did not finish cleanly: training it again from step 0", run.name)
        train_run(run, resume=False, progress=progress, overwrite=True)
        return "trained"
    return "resumed" if how == "resume" else "trained"


# ------------------------------------------------------------------ compare


def _score(s: RunSummary, key: str) -> Optional[float]:
    v = getattr(s, key)
    return v if v is not None and math.isfinite(v) else None


def choose_best(summaries: Sequence[RunSummary], tolerance: float = TOLERANCE) -> tuple[Optional[RunSummary], str]:
    """Lowest best validation loss; runs within `tolerance` (relative) of it count as tied, and the tie
    goes to the fewest trainable parameters (the smaller rank). Returns (best, explanation)."""
    key = "best_val_loss"
    scored = [s for s in summaries if _score(s, key) is not None]
    notes = []
    if not scored:
        key = "final_train_loss"
        scored = [s for s in summaries if _score(s, key) is not None]
        notes.append("No validation loss was recorded (data.val_size=0?): runs are ranked by final training "
                     "loss, which rewards overfitting; hold out validation rows for an honest comparison.")
    if not scored:
        return None, "No run produced a finite loss."
    what = "best validation loss" if key == "best_val_loss" else "final training loss"
    lowest = min(scored, key=lambda s: _score(s, key))
    lo = _score(lowest, key)
    ties = [s for s in scored if _score(s, key) <= lo + tolerance * abs(lo)]
    best = min(ties, key=lambda s: (s.trainable_params if s.trainable_params is not None else math.inf, _score(s, key)))
    at = f" at step {best.best_step}" if key == "best_val_loss" else ""
    lines = [f"Best run: {best.name} ({what} {_score(best, key):.4f}{at} of {best.steps})."]
    if best is not lowest:
        pct = 100 * (_score(best, key) - lo) / abs(lo)
        lines.append(f"{lowest.name} reached {lo:.4f}, only {pct:.2f}% lower: within the {100 * tolerance:g}% noise "
                     f"tolerance, so the smaller run is preferred ({fmt_num(best.trainable_params, ',d')} vs "
                     f"{fmt_num(lowest.trainable_params, ',d')} trainable parameters: a smaller adapter that overfits less).")
    others = [s.name for s in ties if s is not best and s is not lowest]
    if others:
        lines.append(f"Also tied within {100 * tolerance:g}%: {', '.join(others)}.")
    rest = sorted((s for s in scored if s not in ties), key=lambda s: _score(s, key))
    if rest:
        pct = 100 * (_score(rest[0], key) - lo) / abs(lo)
        lines.append(f"The next best outside the tolerance, {rest[0].name}, is {pct:.1f}% worse.")
    lines += _overfit_notes(best, scored) + notes
    return best, " ".join(lines)


def _overfit_notes(best: RunSummary, scored: Sequence[RunSummary]) -> list[str]:
    out = []
    if best.overfit_gap is not None:
        out.append(f"Its overfit gap (validation minus training loss at the last evaluation) is {best.overfit_gap:+.4f}.")
    if best.val_rise is not None and best.val_rise > 0:
        out.append(f"Its validation loss rose by {best.val_rise:.4f} after step {best.best_step}: use best_adapter/ "
                   f"(saved at step {best.best_step}), not adapter/.")
    gaps = [s for s in scored if s.overfit_gap is not None]
    worst = max(gaps, key=lambda s: s.overfit_gap) if gaps else None
    if worst is not None and worst is not best and worst.overfit_gap > 0:
        out.append(f"The largest overfit gap is {worst.name}'s ({worst.overfit_gap:+.4f}).")
    return out


def merge_command(best: RunSummary, cfg: RunConfig, sweep_dir: Path) -> str:
    adapter = Path(best.run_dir) / ("best_adapter" if (Path(best.run_dir) / "best_adapter").is_dir() else "adapter")
    quant = f" --quantization {best.quantization}" if best.quantization else ""
    return f"lorakit merge --model {cfg.model.name_or_path} --adapter {adapter} --out {sweep_dir / 'merged'}{quant}"


# ------------------------------------------------------------------ the sweep


def _write_json(path: Path, data: dict) -> None:
    with atomic_file(path) as tmp:  # a reader sees the old manifest or the new one, never half of one
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _manifest(cfg: RunConfig, plan: Sequence[PlannedRun], status: dict, ratio_note: dict) -> dict:
    base = to_dict(replace(cfg, train=replace(cfg.train, output_dir=str(plan[0].run_dir.parent))))
    return {"version": 1, "base_config": base, **ratio_note,
            "runs": [{"name": p.name, "method": p.method, "r": p.cfg.lora.r, "alpha": p.cfg.lora.alpha,
                      "lr": p.cfg.train.lr, "quantization": p.cfg.model.quantization, "dir": p.name,
                      "status": status.get(p.name, "planned")} for p in plan]}


def run_sweep(cfg: RunConfig, ranks: Sequence[int], methods: Sequence[str] = ("lora",),
              alpha_ratio: Optional[float] = None, lrs: Optional[Sequence[float]] = None,
              sweep_dir: Optional[str | os.PathLike] = None, restart: bool = False, progress: bool = True,
              tolerance: float = TOLERANCE) -> SweepResult:
    """Plan, train (reusing finished runs), compare, and write the sweep folder."""
    from ..report.html import write_report, write_sweep_charts

    root = Path(sweep_dir or cfg.train.output_dir)
    plan = plan_sweep(cfg, ranks, methods, alpha_ratio, lrs, root)
    # a sweep folder is continued by running the same command again (finished runs are reused)
    claim_folder(root, "sweep", SWEEP_FILES + tuple(p.name for p in plan), resume=True)
    if not restart:
        check_conflicts(plan)
    note = {"alpha_ratio": plan[0].cfg.lora.alpha / plan[0].cfg.lora.r, "tolerance": tolerance}
    status: dict[str, str] = {}
    _write_json(root / MANIFEST, _manifest(cfg, plan, status, note))
    for i, run in enumerate(plan, 1):
        log.info("sweep: run %d/%d %s", i, len(plan), run.name)
        t0 = time.perf_counter()
        status[run.name] = execute(run, restart, progress)
        log.info("sweep: %s %s (%.1f s)", run.name, status[run.name], time.perf_counter() - t0)
        _write_json(root / MANIFEST, _manifest(cfg, plan, status, note))
    summaries = [summarize_run(p.run_dir, p.name) for p in plan]
    best, why = choose_best(summaries, tolerance)
    table = format_table(summaries)
    manifest = _manifest(cfg, plan, status, note)
    manifest.update(results=[s.to_dict() for s in summaries], best=best.name if best else None, why=why,
                    merge_command=merge_command(best, cfg, root) if best else None)
    _write_json(root / MANIFEST, manifest)
    (root / "sweep_table.md").write_text(table + "\n\n" + why + "\n", encoding="utf-8")
    write_sweep_charts(root)
    report = write_report(root)
    return SweepResult(root, summaries, best, why, table,
                       [n for n, s in status.items() if s == "reused"],
                       [n for n, s in status.items() if s != "reused"], report)


# ------------------------------------------------------------------ command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_run_arguments(p)
    p.add_argument("--rank", required=True, metavar="R1,R2,..", help="LoRA ranks to compare, comma-separated, e.g. 8,16,32")
    p.add_argument("--method", default=None, metavar="lora,dora,..", help="methods to compare, comma-separated; each "
                   f"is parts joined by '+' from {', '.join(METHODS)} (e.g. lora,qlora,dora,qlora+pissa,loraplus): "
                   "qlora = 4-bit base (NF4 unless the config says fp4), rslora / dora / pissa / olora / gaussian = "
                   "lora.use_rslora / use_dora / init, loraplus = train.loraplus_lr_ratio (the config's or 16), "
                   "neftune = train.neftune_alpha (the config's or 5); a method sets exactly these fields "
                   "(docs/methods.md) [default: the config's own]")
    p.add_argument("--alpha-ratio", type=float, default=None, metavar="RATIO",
                   help="alpha = ratio * r for every run [default: the config's alpha / r]")
    p.add_argument("--lr", default=None, metavar="LR1,LR2,..", help="learning rates to compare, comma-separated [default: the config's]")
    p.add_argument("--out", default=None, metavar="DIR", help="sweep folder [default: the config's train.output_dir]")
    p.add_argument("--restart", action="store_true", help="retrain every run from scratch (replaces the files lorakit wrote in their folders, nothing else)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE, metavar="FRACTION",
                   help="relative best-val-loss difference treated as noise when naming the best run [default: 0.01]")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args) -> int:
    cfg = config_from_args(args)
    ranks = parse_list(args.rank, int, "--rank")
    methods = parse_list(args.method, str, "--method") if args.method else [method_of(to_dict(cfg))]
    lrs = parse_list(args.lr, float, "--lr") if args.lr else None
    try:
        res = run_sweep(cfg, ranks, methods, args.alpha_ratio, lrs, args.out, args.restart,
                        progress=not args.no_progress, tolerance=args.tolerance)
    except KeyboardInterrupt:
        print("lorakit sweep: interrupted; run the same command again to continue (finished runs are reused, "
              "the interrupted one resumes from its last checkpoint)", flush=True)
        return 130
    print(res.table)
    print()
    print(res.why)
    if res.reused:
        print(f"reused finished runs: {', '.join(res.reused)}")
    if res.best is not None:
        print(f"merge it: {merge_command(res.best, cfg, res.sweep_dir)}")
    print(f"table -> {res.sweep_dir / 'sweep_table.md'}; report -> {res.report}")
    return 0
