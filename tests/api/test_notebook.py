"""examples/colab_qlora.ipynb runs top to bottom in a Jupyter kernel of this environment (nbclient),
and its cells produce what the notebook promises: exact match on the demo task from <= 20% to
>= 80%, an inline PNG of the loss curves, a merged model that reloads in plain transformers and
answers like the adapter model, a GGUF file; progress never floods a cell."""

import json
import os
import re
import sys
import time
from pathlib import Path

import pytest

import lorakit

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "colab_qlora.ipynb"
SRC = Path(lorakit.__file__).resolve().parents[1]  # the tree these tests import: the kernel must import it too
WIDGET = "application/vnd.jupyter.widget-view+json"


def _cells(nb) -> dict:
    return {tag: c for c in nb.cells for tag in c.metadata.get("tags", ())}


def _text(cell, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def _rendered_lines(text: str) -> list[str]:
    """Stream text as a notebook shows it: a carriage return overwrites its line (tqdm's updates)."""
    return [line.rsplit("\r", 1)[-1] for line in text.split("\n") if line.rsplit("\r", 1)[-1].strip()]


def _kernel_manager(tmp_path):
    """A kernel of this very interpreter (the project's environment) importing this source tree."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    spec = tmp_path / "kernels" / "lorakit-test"
    spec.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([str(SRC)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
           "OMP_NUM_THREADS": "1"}  # as the suite's one_thread fixture: tiny models on busy cores
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "lorakit tests", "language": "python", "env": env}))
    return AsyncKernelManager(kernel_name="lorakit-test",
                              kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec.parent)]))


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert {"estimate-t4", "train", "plot", "before-after", "merge", "export"} <= set(_cells(nb))


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    probe = nbformat.v4.new_code_cell("import lorakit, sys\nprint(lorakit.__file__)\nprint(sys.executable)")
    nb.cells.insert(0, probe)  # (not in the file) which lorakit and which Python the kernel runs
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.perf_counter()
    nbclient.NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=900,
                            resources={"metadata": {"path": str(work)}}).execute()
    seconds = time.perf_counter() - t0
    cells = _cells(nb)

    assert _text(probe).split() == [str(SRC / "lorakit" / "__init__.py"), sys.executable]
    t4 = _text(cells["estimate-t4"])
    assert re.search(r"fits on a T4: True", t4), t4
    assert any("text/html" in o.get("data", {}) and "frozen_weights" in o["data"]["text/html"]
               for o in cells["estimate-t4"].outputs)

    train = cells["train"]
    assert any("lorakit run" in o.get("data", {}).get("text/html", "") for o in train.outputs)
    widget = any(WIDGET in o.get("data", {}) for o in train.outputs)   # tqdm's notebook bar (ipywidgets)
    lines = _rendered_lines(_text(train, "stderr"))
    assert len(lines) <= 3, lines                  # one bar (a text bar's redraws overwrite its line) ...
    assert len(train.outputs) <= 30, len(train.outputs)  # ... and a few redraws in the file, not one per step
    assert not _text(train), _text(train)                             # nothing printed to stdout

    assert any("image/png" in o.get("data", {}) for o in cells["plot"].outputs)

    shown = _text(cells["before-after"])
    before, after = map(float, re.search(r"exact match on 120 held-out rows: ([\d.]+)% before -> ([\d.]+)% after",
                                         shown).groups())
    assert before <= 20 and after >= 80, shown

    merged = _text(cells["merge"])
    m = re.search(r"LlamaForCausalLM \(.*, 0 LoRA modules\), exact match ([\d.]+)%, same answers as the adapter "
                  r"model on ([\d.]+)% of 120 rows", merged)
    assert m and float(m.group(1)) >= 80 and float(m.group(2)) >= 95, merged
    assert (work / "runs" / "colab_qlora_merged" / "config.json").is_file()

    assert re.search(r"GGUF -> .*colab_qlora\.q8_0\.gguf: [\d.]+ MiB, \d+ tensors .* architecture llama",
                     _text(cells["export"])), _text(cells["export"])
    assert "same summary as the live run: True" in _text(cells["reopen"])

    printed = "\n".join(f"[{tag}] {_text(c).strip()}" for tag, c in cells.items() if _text(c).strip())
    print(f"\nexamples/colab_qlora.ipynb ran in {seconds:.0f} s ({'widget' if widget else 'text'} progress bar)\n{printed}")
