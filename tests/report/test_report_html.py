"""`lorakit report`: the HTML is self-contained, shows the run's own numbers, and the SVG charts put
each point where the axes say it is. Run folders here are written with the trainer's MetricsWriter."""

import argparse
import json
import math
import re

import pytest
import torch
import yaml

import lorakit
import lorakit.memory
from lorakit.config import LoraConfig, RunConfig, to_dict
from lorakit.report import html as report_html
from lorakit.report.summary import RUN_INFO, summarize_run, write_run_info
from lorakit.report.svg import MARGIN, Series, line_chart, nice_ticks
from lorakit.train.log import MetricsWriter

from tiny_models import tiny_model


def make_run(folder, steps=12, eval_every=4, finished=True, samples=(), r=8, quantization=None):
    """A run folder in the trainer's layout with made-up but consistent numbers."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = to_dict(RunConfig())
    cfg["lora"].update(r=r, alpha=2.0 * r)
    cfg["model"]["quantization"] = quantization
    (folder / "run_config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    w = MetricsWriter(folder)
    window, best = [], (None, None)
    for step in range(1, steps + 1):
        loss = 3.0 * math.exp(-step / (2 + r / 4))
        window.append(loss)
        w.write({"step": step, "loss": loss, "lr": 1e-3 * (1 - step / (steps + 1)), "grad_norm": 1.0,
                 "tokens_per_s": 100.0 + step, "supervised_tokens": 10})
        if step % eval_every == 0:
            val = loss + 0.3 + 0.05 * (step - 8) ** 2  # falls, then rises: overfits after step 8
            w.write({"step": step, "val_loss": val, "val_ppl": math.exp(val), "train_loss_mean": sum(window) / len(window)})
            window = []
            if best[0] is None or val < best[0]:
                best = (val, step)
    if finished:
        from safetensors.torch import save_file

        (folder / "adapter").mkdir()
        save_file({"a.lora_A.weight": torch.zeros(r, 64), "a.lora_B.weight": torch.zeros(64, r)},
                  str(folder / "adapter" / "adapter_model.safetensors"))
        (folder / "adapter" / "adapter_config.json").write_text("{}")
        w.write({"step": steps, "event": "end", "reason": "completed", "peak_memory_bytes": 300 * 2**20 + r,
                 "seconds": 12.5, "best_val_loss": best[0], "best_step": best[1]})
    w.close()
    if samples:
        (folder / "samples.jsonl").write_text("".join(json.dumps(s) + "\n" for s in samples))
    return folder


def no_external_resources(html: str) -> None:
    assert "http://" not in html and "https://" not in html
    assert "<script" not in html and "<link" not in html and "<img" not in html
    assert not re.search(r"\b(src|href)\s*=", html) and "url(" not in html


def test_nice_ticks_cover_the_range_with_round_steps():
    for lo, hi in [(0.0, 1.0), (2.917, 3.718), (0.5, 0.5), (-3.0, 7.2), (1e-4, 3e-4), (100, 12345)]:
        t = nice_ticks(lo, hi)
        assert t[0] <= lo and t[-1] >= hi and 3 <= len(t) <= 8
        steps = {round(b - a, 9) for a, b in zip(t, t[1:])}
        assert len(steps) == 1
        mantissa = float(f"{steps.pop():e}".split("e")[0])
        assert mantissa in (1.0, 2.0, 2.5, 5.0)


def test_line_chart_maps_points_onto_the_axes():
    svg = line_chart([Series("a", [(0, 0.0), (5, 0.5), (10, 1.0), (11, float("nan"))])], "t", "x", "y",
                     width=400, height=300)
    pts = re.search(r'class="series" data-name="a" points="([^"]+)"', svg).group(1).split()
    xy = [tuple(map(float, p.split(","))) for p in pts]
    assert len(xy) == 3  # the NaN point is dropped
    pw, ph = 400 - MARGIN["left"] - MARGIN["right"], 300 - MARGIN["top"] - MARGIN["bottom"]
    assert xy[0] == (MARGIN["left"], MARGIN["top"] + ph)  # (0, 0): bottom-left corner (ticks 0..10, 0..1)
    assert xy[2] == (MARGIN["left"] + pw, MARGIN["top"])  # (10, 1): top-right corner
    assert xy[1] == pytest.approx((MARGIN["left"] + pw / 2, MARGIN["top"] + ph / 2), abs=0.051)


def test_run_report_shows_the_runs_numbers(tmp_path, capsys):
    run = make_run(tmp_path / "run", samples=[{"step": 12, "prompt": "say <b>hi</b>", "output": "hi & bye"}])
    parser = argparse.ArgumentParser()
    report_html.add_arguments(parser)
    assert report_html.main(parser.parse_args([str(run)])) == 0
    assert str(run / "report.html") in capsys.readouterr().out
    html = (run / "report.html").read_text()
    no_external_resources(html)
    s = summarize_run(run)
    assert s.best_step == 8 and s.finished and s.trainable_params == 2 * 8 * 64  # counted from the adapter file
    assert s.val_rise == pytest.approx(0.05 * 16 + (3.0 * math.exp(-12 / 4) - 3.0 * math.exp(-8 / 4)))
    for text in (f"{s.best_val_loss:.4f} at step 8", f"{s.final_train_loss:.4f}", f"{s.overfit_gap:+.4f}",
                 "12.5", "112", "300.0 MiB", "1,024", "say &lt;b&gt;hi&lt;/b&gt;", "hi &amp; bye",
                 "target_modules: all-linear"):
        assert text in html, text
    assert "<b>hi</b>" not in html
    assert html.count('class="series"') == 4  # train loss, validation loss, learning rate, throughput
    assert html.count('class="point"') == 3  # the three evaluations
    assert html.count("<svg") == 4 and html.count('class="bar"') == 1  # + memory (measured; no prediction)


def test_unfinished_run_and_missing_folder(tmp_path):
    run = make_run(tmp_path / "run", finished=False)
    s = summarize_run(run)
    assert not s.finished and s.reason == "unfinished" and s.adapter_bytes is None and s.seconds is None
    assert "n/a" in (report_html.write_report(run)).read_text()
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        report_html.write_report(tmp_path / "nothing")


def test_sweep_report_table_and_charts(tmp_path):
    sweep = tmp_path / "sweep"
    names = []
    for r in (4, 8):
        for q in (None, "nf4"):
            name = f"r{r}-{'qlora' if q else 'lora'}"
            make_run(sweep / name, r=r, quantization=q)
            names.append(name)
    manifest = {"runs": [{"name": n, "dir": n} for n in names], "best": "r8-lora", "why": "Best run: r8-lora <why>",
                "merge_command": "lorakit merge --adapter x", "alpha_ratio": 2.0, "base_config": to_dict(RunConfig())}
    (sweep / "sweep.json").write_text(json.dumps(manifest))
    files = report_html.write_sweep_charts(sweep)
    assert [f.name for f in files] == ["val_loss.svg", "best_val_vs_rank.svg"]
    assert files[0].read_text().startswith('<svg xmlns="http://www.w3.org/2000/svg"')
    html = report_html.write_report(sweep).read_text()
    no_external_resources(html)
    best_row = re.search(r'<tr class="best">(.*?)</tr>', html).group(1)
    assert "<td>r8-lora</td>" in best_row and html.count('<tr class="best">') == 1
    assert "Best run: r8-lora &lt;why&gt;" in html and "lorakit merge --adapter x" in html
    summaries = {n: summarize_run(sweep / n) for n in names}
    for n, s in summaries.items():
        assert f"<td>{s.best_val_loss:.4f}</td>" in html and f'data-name="{n}"' in html
    rank_svg = files[1].read_text()
    assert rank_svg.count('class="series"') == 2 and rank_svg.count('class="point"') == 4


def test_write_run_info_counts_parameters_and_records_the_runs_prediction(tmp_path):
    torch.manual_seed(0)
    model = tiny_model("llama")
    lorakit.add_lora(model, LoraConfig(r=4, alpha=8))
    info = json.loads(write_run_info(tmp_path, model, None).read_text())
    assert (info["trainable_params"], info["total_params"]) == lorakit.count_parameters(model)
    assert info["predicted_peak_bytes"] is None
    write_run_info(tmp_path, model, 123_456_789)  # the one prediction the recipe made (and printed)
    assert json.loads((tmp_path / RUN_INFO).read_text())["predicted_peak_bytes"] == 123_456_789


def test_report_of_a_sweep_in_progress(tmp_path):
    """`lorakit report` on a sweep whose later runs have not started: those rows say so."""
    sweep = tmp_path / "sweep"
    make_run(sweep / "r4-lora", r=4)
    (sweep / "sweep.json").write_text(json.dumps({"runs": [{"name": n, "dir": n} for n in ("r4-lora", "r8-lora")]}))
    html = report_html.write_report(sweep).read_text()
    row = re.search(r"<tr><td>r8-lora</td>(.*?)</tr>", html).group(1)
    assert row.count("n/a") >= 8
    assert html.count('class="point"') == 3 + 1 + 3  # val chart, rank chart (finished run only), r4's own loss chart
