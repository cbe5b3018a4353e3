"""`lorakit report RUN_DIR|SWEEP_DIR`: one self-contained HTML file per run or sweep.

Everything is inline (CSS and SVG charts, no scripts, no fonts, no remote or local resources), so
the file opens offline in any browser and can be mailed or attached to an issue as it is.

    run report    config, key numbers, loss (train + validation points), learning rate, throughput,
                  evaluations, peak memory predicted vs measured, sample generations (samples.jsonl)
    sweep report  the comparison table, the best run and why, validation loss per run, best
                  validation loss vs rank, memory per run, then a short section per run
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from html import escape
from pathlib import Path
from typing import Optional, Sequence

from ..train.log import read_metrics
from . import charts
from .summary import RunSummary, end_event, fmt_bytes, fmt_num, read_run_info, read_samples, summarize_run, table_rows
from ..utils.fs import atomic_file, check_output_file
from .svg import standalone

log = logging.getLogger("lorakit")
REPORT_NAME = "report.html"
SWEEP_MANIFEST = "sweep.json"  # written by lorakit.recipes.sweep

CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1180px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
tr.best td { background: #e8f5e9; font-weight: bold; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow-x: auto; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; } .note { color: #555; font-size: 13px; }
"""


GENERATOR = '<meta name="generator" content="lorakit">'  # how lorakit knows a report file is its own


def is_report(path: Path) -> bool:
    """True when `path` is an HTML report lorakit wrote (its head names lorakit as the generator)."""
    try:
        with open(path, "rb") as f:
            return GENERATOR.encode() in f.read(4096)
    except OSError:
        return False


def _page(title: str, body: list[str]) -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">" + GENERATOR +
            f"<title>{escape(title)}</title><style>{CSS}</style></head><body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def html_table(headers: Sequence[str], rows: Sequence[Sequence[str]], highlight: Optional[int] = None) -> str:
    """A table of escaped cells; row `highlight` gets class "best"."""
    out = ["<table><tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>"]
    for i, row in enumerate(rows):
        cls = ' class="best"' if i == highlight else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{escape(str(c))}</td>" for c in row) + "</tr>")
    return "\n".join(out + ["</table>"])


def _key_numbers(s: RunSummary) -> str:
    return html_table(["", "value"], [
        ("status", s.reason), ("optimizer steps", s.steps),
        ("best validation loss", f"{fmt_num(s.best_val_loss)} at step {fmt_num(s.best_step, 'd')}"),
        ("final training loss", fmt_num(s.final_train_loss)),
        ("overfit gap (last val - train loss)", fmt_num(s.overfit_gap, "+.4f")),
        ("wall time (s)", fmt_num(s.seconds, ".1f")), ("tokens / s", fmt_num(s.tokens_per_s, ".0f")),
        ("trainable parameters", fmt_num(s.trainable_params, ",d")), ("adapter size", fmt_bytes(s.adapter_bytes)),
    ])


def _memory(run_dir: Path, s: RunSummary) -> list[str]:
    """Predicted beside measured, like for like: the process's peak RSS on CPU; on CUDA the caching
    allocator's peak reserved (nvidia-smi shows it plus the CUDA context) and peak allocated."""
    pred = read_run_info(run_dir).get("predicted_memory") or {}
    end = end_event(read_metrics(run_dir)) or {}
    ratio = lambda m, p: f"{m / p:.2f}" if m and p else "n/a"
    rows = [(s.memory_figure, fmt_bytes(s.predicted_peak_bytes), fmt_bytes(s.peak_memory_bytes),
             ratio(s.peak_memory_bytes, s.predicted_peak_bytes))]
    if pred.get("device") == "cuda":
        rows.append(("peak allocated (tensors)", fmt_bytes(pred.get("allocated_bytes")),
                     fmt_bytes(end.get("peak_allocated_bytes")), ratio(end.get("peak_allocated_bytes"), pred.get("allocated_bytes"))))
    out = [html_table(["figure", "predicted", "measured", "measured / predicted"], rows), charts.memory_chart([s])]
    if pred.get("device") == "cpu":
        heap = (pred.get("rss_bytes") or 0) - (pred.get("process_bytes") or 0) - (pred.get("allocated_bytes") or 0)
        out.append(f'<p class="note">Predicted peak RSS = the process without tensors, measured before training '
                   f'({fmt_bytes(pred.get("process_bytes"))}: Python, torch, transformers, the model code, tokenizer, data) '
                   f'+ the tensors at the peak of a step ({fmt_bytes(pred.get("allocated_bytes"))}, lorakit.memory) + heap '
                   f'overhead ({fmt_bytes(heap)}). Measured: the process\'s peak resident set during training.</p>')
    elif pred.get("device") == "cuda":
        out.append('<p class="note">Measured: torch.cuda.max_memory_reserved and max_memory_allocated during training; '
                   "nvidia-smi also shows the CUDA context (~0.3-0.6 GiB), which neither figure includes.</p>")
    return out


def _samples(run_dir: Path) -> list[str]:
    samples = read_samples(run_dir)
    if not samples:
        return ['<p class="note">No sample generations were recorded (samples.jsonl).</p>']
    rows = [(s.get("step", ""), s.get("prompt", ""), s.get("output", s.get("generation", "")), s.get("reference", ""))
            for s in samples]
    return [html_table(["step", "prompt", "output", "reference"], rows)]


def _config_text(run_dir: Path) -> str:
    path = run_dir / "run_config.yaml"
    return path.read_text(encoding="utf-8") if path.is_file() else "(no run_config.yaml)"


def run_body(run_dir: Path, summary: RunSummary, level: int = 1) -> list[str]:
    """The sections of one run (h{level} title)."""
    records = read_metrics(run_dir)
    evals = [r for r in records if "val_loss" in r]
    h, h2 = f"h{level}", f"h{level + 1}"
    out = [f"<{h}>run {escape(summary.name)}</{h}>", _key_numbers(summary),
           f"<{h2}>curves</{h2}>", '<div class="charts">', charts.loss_chart(records), charts.lr_chart(records),
           charts.throughput_chart(records), "</div>", f"<{h2}>evaluations</{h2}>"]
    out.append(html_table(["step", "validation loss", "perplexity", "mean train loss since last eval"],
                      [(r["step"], fmt_num(r["val_loss"]), fmt_num(r.get("val_ppl"), ".3f"),
                        fmt_num(r.get("train_loss_mean"))) for r in evals])
               if evals else '<p class="note">No validation set: no evaluations.</p>')
    out += [f"<{h2}>memory</{h2}>"] + _memory(run_dir, summary)
    out += [f"<{h2}>sample generations</{h2}>"] + _samples(run_dir)
    out += [f"<{h2}>config</{h2}>", f"<pre>{escape(_config_text(run_dir))}</pre>"]
    return out


def run_card(run_dir: str | os.PathLike, max_samples: int = 5) -> str:
    """An HTML fragment for a notebook cell (lorakit.Run's _repr_html_): the key numbers, peak memory
    predicted and measured, the loss curves and the latest sample answers (samples.jsonl). No page
    and no style sheet: the notebook's own styles apply, nothing leaks into the rest of it."""
    run_dir = Path(run_dir)
    s = summarize_run(run_dir)
    samples = read_samples(run_dir)
    last = max((x.get("step", 0) for x in samples), default=None)
    latest = [x for x in samples if x.get("step", 0) == last][:max_samples]
    memory = (f"{s.memory_figure}: {fmt_bytes(s.peak_memory_bytes)} measured, {fmt_bytes(s.predicted_peak_bytes)} "
              f"predicted")
    out = [f"<div><strong>lorakit run {escape(str(run_dir))}</strong> ({escape(s.reason)})", _key_numbers(s),
           f"<p>{escape(memory)}</p>", charts.loss_chart(read_metrics(run_dir))]
    if latest:
        out += [f"<p>sample answers at step {last}:</p>",
                html_table(["prompt", "output", "reference"],
                           [(x.get("prompt", ""), x.get("output", ""), x.get("reference", "")) for x in latest])]
    return "\n".join(out + ["</div>"])


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)


def _manifest(sweep_dir: Path) -> dict:
    return json.loads((sweep_dir / SWEEP_MANIFEST).read_text(encoding="utf-8"))


def sweep_runs(sweep_dir: Path) -> list[tuple[str, Path]]:
    return [(r["name"], sweep_dir / r["dir"]) for r in _manifest(sweep_dir)["runs"]]


def _comparison(man: dict, summaries: list[RunSummary]) -> list[str]:
    """The comparison table (the best run highlighted), why it is the best, how to merge it."""
    best = man.get("best")
    idx = next((i for i, s in enumerate(summaries) if s.name == best), None)
    headers, rows = table_rows(summaries)
    out = [html_table(headers, rows, idx)]
    if man.get("why"):
        out.append(f"<p>{escape(man['why'])}</p>")
    if man.get("merge_command"):
        out.append(f"<p>Merge the chosen adapter:</p><pre>{escape(man['merge_command'])}</pre>")
    return out


def sweep_card(sweep_dir: str | os.PathLike) -> str:
    """An HTML fragment for a notebook cell (lorakit.sweep's table): the comparison, the choice and
    the validation curves; no page, and one style rule scoped to the card (the best run's row)."""
    sweep_dir = Path(sweep_dir)
    runs = sweep_runs(sweep_dir)
    summaries = [summarize_run(d, name) for name, d in runs]
    out = ['<div class="lorakit-sweep"><style>.lorakit-sweep tr.best td { font-weight: bold; background: #e8f5e9; }'
           f"</style><strong>lorakit sweep {escape(str(sweep_dir))}</strong>", *_comparison(_manifest(sweep_dir), summaries),
           '<div style="display:flex;flex-wrap:wrap;gap:12px">',
           charts.sweep_val_chart([(name, read_metrics(d)) for name, d in runs]), charts.rank_chart(summaries), "</div>"]
    return "\n".join(out + ["</div>"])


def sweep_body(sweep_dir: Path) -> list[str]:
    man = _manifest(sweep_dir)
    runs = sweep_runs(sweep_dir)
    summaries = [summarize_run(d, name) for name, d in runs]
    out = [f"<h1>sweep {escape(sweep_dir.name)}</h1>", "<h2>comparison</h2>", *_comparison(man, summaries)]
    out.append('<p class="note">Same data, validation split, seed and step budget for every run; alpha = '
               f"{fmt_num(man.get('alpha_ratio'), 'g')} x r. Overfit gap = validation loss minus the mean training "
               "loss since the previous evaluation, at the last evaluation.</p>")
    named = [(name, read_metrics(d)) for name, d in runs]
    out += ["<h2>validation loss</h2>", '<div class="charts">', charts.sweep_val_chart(named),
            charts.rank_chart(summaries), "</div>", "<h2>peak memory</h2>", charts.memory_chart(summaries)]
    out += ["<h2>base config</h2>", '<p class="note">Each run changes only lora.r, lora.alpha, model.quantization, '
            "train.lr and train.output_dir.</p>", f"<pre>{escape(_yaml(man.get('base_config', {})))}</pre>"]
    for (name, d), s in zip(runs, summaries):
        out.append(f'<details><summary>run {escape(name)}: {escape(s.reason)}</summary>')
        out += run_body(d, s, level=2) + ["</details>"]
    return out


def write_sweep_charts(sweep_dir: str | os.PathLike) -> list[Path]:
    """val_loss.svg and best_val_vs_rank.svg beside sweep.json (standalone SVG files)."""
    sweep_dir = Path(sweep_dir)
    runs = sweep_runs(sweep_dir)
    summaries = [summarize_run(d, name) for name, d in runs]
    files = {"val_loss.svg": charts.sweep_val_chart([(n, read_metrics(d)) for n, d in runs]),
             "best_val_vs_rank.svg": charts.rank_chart(summaries)}
    for name, svg in files.items():
        (sweep_dir / name).write_text(standalone(svg), encoding="utf-8")
    return [sweep_dir / n for n in files]


def write_report(path: str | os.PathLike, out: Optional[str | os.PathLike] = None, overwrite: bool = False) -> Path:
    """Write report.html for a run folder or a sweep folder (one with sweep.json); returns its path.
    Inside the folder it is lorakit's own file and is brought up to date; `out` elsewhere must be a
    new file, or with `overwrite` a report lorakit wrote (utils/fs.py)."""
    path = Path(path)
    if (path / SWEEP_MANIFEST).is_file():
        title, body = f"lorakit sweep {path.name}", sweep_body(path)
    elif (path / "metrics.jsonl").is_file():
        title, body = f"lorakit run {path.name}", run_body(path, summarize_run(path))
    else:
        raise FileNotFoundError(f"{path}: neither a run folder (metrics.jsonl) nor a sweep folder ({SWEEP_MANIFEST})")
    if out is None:
        target = path / REPORT_NAME
        check_output_file(target, "report", True, is_report)  # only ever replaces its own report
    else:
        target = check_output_file(out, "report", overwrite, is_report)
    with atomic_file(target) as tmp:
        tmp.write_text(_page(title, body), encoding="utf-8")
    return target


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="a run folder (with metrics.jsonl) or a sweep folder (with sweep.json)")
    p.add_argument("--out", default=None, help=f"output file [default: PATH/{REPORT_NAME}]")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it is a report lorakit wrote")


def main(args) -> int:
    target = write_report(args.path, args.out, overwrite=args.overwrite)
    print(f"report -> {target}")
    return 0
