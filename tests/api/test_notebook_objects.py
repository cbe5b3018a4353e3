"""What a notebook cell shows: Run.plot() as an inline PNG Figure (no backend switch), the Run's,
the estimate's and the sweep's HTML, and the sweep table's runs reopened as Runs."""

import io
import json
import re

import matplotlib
import pytest
from matplotlib.figure import Figure

import lorakit
from lorakit.config import ConfigError
from lorakit.memory.estimate import Settings, estimate as estimate_memory
from lorakit.memory.shapes import gpu_table
from lorakit.recipes.estimate import format_table

from tiny_tokenizers import write_tiny_model_folder

ANIMALS = ["cat", "dog", "fox", "owl", "bee", "cow", "pig", "hen"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("nb")
    model = write_tiny_model_folder(root / "model")
    rows = [{"instruction": f"Say {ANIMALS[i % 8]}.", "context": "", "response": ANIMALS[i % 8]} for i in range(40)]
    (root / "say.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = lorakit.finetune(model=model, data=root / "say.jsonl", r=4, max_steps=8, lr=1e-2, eval_every=4,
                           precision="fp32", val_size=8, num_samples=2, sample_max_new_tokens=3, template="alpaca",
                           output_dir=root / "run", progress=False)
    return root, run


def test_plot_is_an_inline_figure_without_a_backend_switch(tiny_run):
    _, run = tiny_run
    backend = matplotlib.get_backend()
    fig = run.plot()
    assert isinstance(fig, Figure) and matplotlib.get_backend() == backend
    png = fig._repr_png_()                                  # what Jupyter's display shows (image/png)
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    ax = fig.axes[0]
    lines = {l.get_label(): l for l in ax.get_lines()}
    steps = [r for r in run.metrics if "loss" in r]
    evals = [r for r in run.metrics if "val_loss" in r]
    assert list(lines["train"].get_ydata()) == [r["loss"] for r in steps]
    assert list(lines["validation"].get_xdata()) == [r["step"] for r in evals] == [4, 8]
    from PIL import Image
    assert Image.open(io.BytesIO(png)).size == (770, 440)   # 7 x 4 inches at 110 dpi, as loss_curve.png


def test_run_html_shows_summary_curves_and_latest_samples(tiny_run):
    _, run = tiny_run
    html = run._repr_html_()
    s = run.summary
    assert f"{s.best_val_loss:.4f} at step {s.best_step}" in html
    assert "<svg" in html and 'data-name="validation"' in html and "<style" not in html
    samples = [json.loads(l) for l in (run.run_dir / "samples.jsonl").read_text().splitlines()]
    latest = [x for x in samples if x["step"] == 8]
    assert len(latest) == 2 and "sample answers at step 8" in html
    assert all(x["reference"] in html for x in latest)
    assert repr(run).startswith(f"Run({str(run.run_dir)!r}: completed, 8 steps, best validation loss")


def test_estimate_table_matches_lorakit_estimate():
    t = lorakit.estimate("llama-2-7b", method="qlora", seq_len=512, batch_size=1)
    est = estimate_memory("llama-2-7b", Settings(method="qlora", seq_len=512, batch_size=1))
    assert t.components == est.components and t.total_bytes == est.total_bytes
    assert str(t) == format_table(est)                        # the same table `lorakit estimate` prints
    assert t.fits == {gpu: est.total_bytes <= cap for gpu, cap in gpu_table().items()}
    assert t.fits["T4 15GB"] and t.fits_in("15GiB") and not t.fits_in("4GiB")
    html = t._repr_html_()
    rows = re.findall(r"<tr><td>(\w+)</td><td>([^<]+)</td>", html)
    assert [name for name, _ in rows][:8] == list(est.components)
    assert ("T4 15GB" in html) and html.count("<table>") == 2
    with pytest.raises(ConfigError, match=r"unknown estimate setting 'seqlen'; did you mean 'seq_len'"):
        lorakit.estimate("llama-2-7b", seqlen=512)


def test_sweep_table(tiny_run, tmp_path):
    root, _ = tiny_run
    table = lorakit.sweep(model=root / "model", data=root / "say.jsonl", ranks=[2, 4], max_steps=4, lr=1e-2,
                          eval_every=2, precision="fp32", val_size=8, num_samples=0, template="alpaca",
                          output_dir=tmp_path / "sweep", progress=False)
    assert [s.name for s in table.summaries] == ["r2-lora", "r4-lora"]
    assert table.best is not None and table.best.name in ("r2-lora", "r4-lora")
    assert str(table).startswith(table.table) and table.why in str(table)
    runs = table.runs
    assert {n: r.summary for n, r in runs.items()} == {s.name: s for s in table.summaries}
    assert table.best_run.summary == table.best
    html = table._repr_html_()
    best_row = re.search(r'<tr class="best">(.*?)</tr>', html, re.S).group(1)
    assert f"<td>{table.best.name}</td>" in best_row and html.count('<tr class="best">') == 1
    assert 'data-name="r2-lora"' in html                     # the validation curves
    again = lorakit.sweep(model=root / "model", data=root / "say.jsonl", ranks=[2, 4], max_steps=4, lr=1e-2,
                          eval_every=2, precision="fp32", val_size=8, num_samples=0, template="alpaca",
                          output_dir=tmp_path / "sweep", progress=False)
    assert again.result.reused == ["r2-lora", "r4-lora"] and again.summaries == table.summaries


def test_api_outputs_follow_the_folder_rules(tiny_run, tmp_path):
    """finetune, merge and export write through utils/fs.py: a folder of someone else's files is refused,
    a previous output is replaced only with overwrite, and only lorakit's files in it."""
    from transformers import AutoModelForCausalLM

    from lorakit.utils.fs import OutputError

    root, run = tiny_run
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="not a lorakit output folder"):
        lorakit.finetune(model=root / "model", data=root / "say.jsonl", max_steps=1, output_dir=mine, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]

    merged = run.merge(tmp_path / "merged", progress=False)   # a 16-bit run: streamed
    (merged / "notes.txt").write_text("keep")
    with pytest.raises(OutputError, match="pass --overwrite"):
        run.merge(merged, progress=False)
    run.merge(merged, adapter="final", overwrite=True, progress=False)
    assert (merged / "notes.txt").read_text() == "keep"
    assert AutoModelForCausalLM.from_pretrained(merged).config.num_hidden_layers == 2

    gguf = run.export(tmp_path / "m.gguf", quant="f16", progress=False)
    assert gguf.path.is_file() and gguf.types.get("F16", 0) > 0     # the weight matrices in f16
    with pytest.raises(OutputError, match="overwrite"):
        run.export(tmp_path / "m.gguf", progress=False)
    lora = run.export(tmp_path / "lora.gguf", format="gguf-lora")
    assert lora.path.is_file() and lora.nbytes > 0


def test_notebook_without_ipywidgets_gets_a_slow_text_bar(monkeypatch):
    """tqdm.auto would warn and redraw a text bar up to 10 times a second, one cell output each; the
    training bar redraws at most every TEXT_BAR_SECONDS there (with ipywidgets: tqdm's widget)."""
    import importlib.util
    import sys
    import types

    import tqdm.std

    from lorakit.train import progress

    monkeypatch.setitem(sys.modules, "ipykernel", sys.modules.get("ipykernel") or types.ModuleType("ipykernel"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ipywidgets" else real(name, *a))
    bar = progress.Progress(10, interactive=True)
    try:
        assert type(bar.bar) is tqdm.std.tqdm and bar.bar.mininterval == progress.TEXT_BAR_SECONDS == 2.0
    finally:
        bar.close()
