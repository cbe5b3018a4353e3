"""`lorakit.finetune(...)` and the `Run` it returns: training, looking at and using a run from Python.

    run = lorakit.finetune(model="path/or/hub-id", data="train.jsonl", quantization="nf4", r=16,
                           max_steps=200, output_dir="runs/x")
    run                                    # a notebook cell shows the summary, curves, latest samples
    run.plot()                             # matplotlib Figure: training and validation loss
    run.generate("Name an animal.")        # the best adapter, prompted with the run's template
    run.evaluate("test.jsonl", exact_match=100)
    run.merge("merged/"); run.export("model.gguf", quant="q4_k_m")
    run = lorakit.Run.load("runs/x")       # reopen it later; the model loads when first needed

A Run wraps the recipes and the run folder, nothing else: training is recipes/finetune.finetune
(what `lorakit train` runs), every number is read from the folder's files (report/summary.py), so
a reopened run says exactly what the live one said; inference is recipes/generate.py and
recipes/evaluate.py, merging recipes/merge.py and export/hf.py, export export/gguf*.py.

Which adapter: "best" (best_adapter/, the lowest validation loss; the default), "final"
(adapter/), a folder, or None for the base model alone. A run stopped mid-way has no adapter/:
"best" and "final" fall back to its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Mapping, Optional, Sequence, Union

from ..config import ConfigError, RunConfig, from_dict
from ..report.summary import RunSummary, read_config, summarize_run
from ..train.checkpoint import latest_checkpoint
from ..train.log import read_metrics
from ..utils.fs import OutputError
from .fields import config_from_fields

log = logging.getLogger("lorakit")
AdapterChoice = Union[str, os.PathLike, None]
_IN_MEMORY = Path("<weights in memory>")  # the live model's adapter when no folder holds it (a diverged run)


def finetune(config=None, *, overrides: Union[Mapping, Sequence[str], None] = None, resume: bool = False,
             overwrite: bool = False, progress: bool = True, **fields) -> "Run":
    """Train a LoRA (or QLoRA) adapter with the recipe `lorakit train` runs, and return the Run.

    `config`: a YAML path, a RunConfig or a dict; `fields`: config fields by their own name
    (model=, data=, quantization=, r=, lr=, max_steps=, output_dir=, ...); `overrides`: dotted
    names ({"train.lr": 1e-4}); see api/fields.py. Unknown, ambiguous or invalid names raise the
    ConfigError `lorakit train` prints. `resume` continues the run in train.output_dir from its
    newest checkpoint, `overwrite` starts a previous run there again (utils/fs.py). Progress is a
    notebook bar in Jupyter / Colab. If training raises (or the kernel is interrupted), the
    folder keeps its last checkpoint: `Run.load(output_dir)` reopens it, `resume=True` continues.
    """
    import torch.distributed

    from ..recipes.finetune import finetune as finetune_recipe
    from ..train import distributed

    cfg = config_from_fields(config, overrides, **fields)
    ours = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        out = finetune_recipe(cfg, resume=resume, progress=progress, overwrite=overwrite)
    except BaseException as e:
        if not isinstance(e, (ConfigError, OutputError, FileNotFoundError)):
            _recovery_note(e, Path(cfg.train.output_dir).expanduser())
        raise
    finally:
        if ours:  # under torchrun: the process group the recipe started (a caller's own one stays)
            distributed.teardown()
    return Run(out.result.run_dir, model=out.model, tokenizer=out.tokenizer)


def _recovery_note(error: BaseException, run_dir: Path) -> None:
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None and hasattr(error, "add_note"):  # Python >= 3.11
        error.add_note(f"lorakit: {run_dir} keeps its last checkpoint ({ckpt.name}); lorakit.Run.load({str(run_dir)!r}) "
                       f"reopens the run and lorakit.finetune(..., resume=True) continues it")


class Run:
    """A training run folder and, once needed, its model (see the module docstring)."""

    def __init__(self, run_dir: Union[str, os.PathLike], model=None, tokenizer=None):
        self.run_dir = Path(run_dir).expanduser()
        if not (self.run_dir / "run_config.yaml").is_file():
            raise FileNotFoundError(f"{self.run_dir} is not a lorakit run folder (it has no run_config.yaml)")
        self.config: RunConfig = from_dict(RunConfig, read_config(self.run_dir))
        self._model, self._tokenizer = model, tokenizer
        self.merge_report = None  # the logit comparison of the last merge(verify=True)
        self._format: Optional[str] = None  # data_format, once detected
        # which adapter the model's LoRA layers hold: the live model ends training with the final one
        self._loaded: Optional[Path] = None
        if model is not None:
            self._loaded = self.adapter_path.resolve() if self.adapter_path else _IN_MEMORY

    @classmethod
    def load(cls, run_dir: Union[str, os.PathLike]) -> "Run":
        """Reopen a run folder (finished or stopped); nothing is loaded until generate, chat or
        evaluate need the model."""
        return cls(run_dir)

    # ------------------------------------------------------------------ what the folder says

    @property
    def adapter_path(self) -> Optional[Path]:
        """adapter/: the adapter after the last step (None until the run finished)."""
        return _adapter_folder(self.run_dir / "adapter")

    @property
    def best_adapter_path(self) -> Optional[Path]:
        """best_adapter/: the adapter at the lowest validation loss (None without validation)."""
        return _adapter_folder(self.run_dir / "best_adapter")

    @property
    def checkpoint_path(self) -> Optional[Path]:
        """The newest complete checkpoint-NNNNNN/ folder (what resume=True continues from)."""
        return latest_checkpoint(self.run_dir)

    @property
    def metrics(self) -> list[dict]:
        """The rows of metrics.jsonl: per logged step, per evaluation, and the final "end" event."""
        return read_metrics(self.run_dir)

    @property
    def summary(self) -> RunSummary:
        """Best validation loss and its step, tokens/s, peak memory predicted (run_info.json) and
        measured, ...: report/summary.py summarize_run, read from the folder."""
        return summarize_run(self.run_dir)

    @property
    def finished(self) -> bool:
        return self.summary.finished

    def plot(self):
        """Training loss per step and validation loss per evaluation, as a matplotlib Figure
        (shown inline as the last expression of a notebook cell; no pyplot, no backend switch)."""
        from ..train.log import loss_figure
        from .figure import InlineFigure

        return loss_figure(self.metrics, InlineFigure)

    def _repr_html_(self) -> str:
        from ..report.html import run_card

        return run_card(self.run_dir)

    def __repr__(self) -> str:
        s = self.summary
        best = f", best validation loss {s.best_val_loss:.4f} at step {s.best_step}" if s.best_val_loss is not None else ""
        return f"Run({str(self.run_dir)!r}: {s.reason}, {s.steps} steps{best})"

    # ------------------------------------------------------------------ the model

    @property
    def model(self):
        """The base model (4-bit as trained) with the LoRA layers of the adapter used last."""
        return self._base()[0]

    @property
    def tokenizer(self):
        return self._base()[1]

    def close(self) -> None:
        """Drop the model (its memory comes back); the next generate / evaluate loads it again."""
        self._model = self._tokenizer = self._loaded = None

    def _base(self):
        if self._model is None:
            from ..model.load import default_device, load_from_config
            from ..precision import run_precision

            device = default_device()
            model, tokenizer = load_from_config(self.config.model, run_precision(self.config, device).compute_dtype,
                                                device)
            if tokenizer is None:
                raise FileNotFoundError(f"{self.config.model.name_or_path}: no tokenizer files")
            self._model, self._tokenizer, self._loaded = model.eval(), tokenizer, None
        return self._model, self._tokenizer

    def resolve_adapter(self, adapter: AdapterChoice = "best") -> Optional[Path]:
        """The folder `adapter` names ("best", "final", a folder), or None for the base model."""
        if adapter is None:
            return None
        if adapter == "best":
            path = self.best_adapter_path or self.adapter_path or self.checkpoint_path
        elif adapter == "final":
            path = self.adapter_path or self.checkpoint_path
        elif isinstance(adapter, (str, os.PathLike)):
            path = _adapter_folder(Path(adapter).expanduser())
            if path is None:
                raise FileNotFoundError(f"adapter={str(adapter)!r} is not an adapter folder (no adapter_config.json)")
        else:
            raise ValueError(f"adapter={adapter!r} is not allowed; use 'best', 'final', an adapter folder, or None "
                             f"(the base model alone)")
        if path is None:
            raise FileNotFoundError(f"{self.run_dir} has no adapter yet (no best_adapter/, adapter/ or checkpoint-*/)")
        return path

    @contextlib.contextmanager
    def _using(self, adapter: AdapterChoice) -> Iterator[tuple]:
        """(model, tokenizer) with `adapter` in its LoRA layers (loaded when another one is there),
        or with the base layers put in place for the block when `adapter` is None."""
        path = self.resolve_adapter(adapter)
        model, tokenizer = self._base()
        if path is None:
            with without_adapters(model, self.config.lora.bias):
                yield model, tokenizer
            return
        if path.resolve() != self._loaded:
            from ..lora.io import load_adapter

            load_adapter(model, path, trainable=False)
            self._loaded = path.resolve()
        yield model, tokenizer

    def prompt_template(self, tokenizer=None) -> str:
        """How generate() wraps a prompt: the data.template the run trained with (resolved as
        training did), "chat" for chat rows, "raw" where training used the text as it is."""
        from ..data.formats import resolve_template

        d, fmt = self.config.data, self.data_format
        if fmt in ("text", "chat"):
            return "raw" if fmt == "text" else "chat"
        template = resolve_template(d.template, tokenizer if tokenizer is not None else self.tokenizer)
        return "raw" if fmt == "prompt_completion" and template != "chat" else template

    @property
    def data_format(self) -> str:
        """data.format, or with "auto" the format training detected in the data file (read again
        when it is a local file; else "auto", and prompts are wrapped by data.template)."""
        fmt = self.config.data.format
        if fmt == "auto" and self._format is None:
            self._format = "auto"
            if Path(self.config.data.path).expanduser().is_file():
                from ..data import detect_format, load_records

                with contextlib.suppress(ValueError):
                    self._format = detect_format(load_records(self.config.data.path), self.config.data.path)
        return self._format if fmt == "auto" else fmt

    # ------------------------------------------------------------------ using it

    def generate(self, prompt: Union[str, Sequence[str]], max_new_tokens: int = 64, temperature: float = 0.0,
                 adapter: AdapterChoice = "best", template: Optional[str] = None, context: str = "",
                 stop: Optional[Sequence[str]] = None) -> Union[str, list[str]]:
        """The answer to `prompt` (or a list of answers to a list of prompts), greedy when
        temperature is 0, wrapped as in training (`template`: raw, alpaca, alpaca_short, chat, auto;
        `context`: the input / context field) and stripped of surrounding whitespace."""
        from ..recipes.generate import generate, templated_prompt

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        with self._using(adapter) as (model, tokenizer):
            how = template or self.prompt_template(tokenizer)
            texts = [templated_prompt(p, how, tokenizer, context) for p in prompts]
            answers = [a.strip() for a in generate(model, tokenizer, texts, max_new_tokens, temperature,
                                                   stop=list(stop) if stop else None)]
        return answers[0] if isinstance(prompt, str) else answers

    def chat(self, messages: Sequence[Mapping[str, str]], max_new_tokens: int = 256, temperature: float = 0.0,
             adapter: AdapterChoice = "best") -> str:
        """The assistant's next reply to `messages` ([{"role", "content"}, ...]) in the run's format:
        the chat template (ChatML without one) when it trained on chat turns; with an alpaca
        template, which holds one instruction and its answer, exactly one user message."""
        from ..data.formats import format_prompt
        from ..recipes.generate import chat_prompt, generate

        messages = [dict(m) for m in messages]
        with self._using(adapter) as (model, tokenizer):
            how = self.prompt_template(tokenizer)
            if how == "chat":
                text = chat_prompt(messages, tokenizer)
            elif how == "raw" or [m["role"] for m in messages] != ["user"]:
                raise ValueError(f"this run trained with {'plain text' if how == 'raw' else f'the {how} template'} "
                                 f"(data.format={self.data_format!r}, data.template={self.config.data.template!r}), "
                                 f"which holds one prompt and its answer, no conversation: chat() takes exactly one "
                                 f"user message here; use generate(prompt) otherwise")
            else:
                text = format_prompt(messages[0]["content"], "", how)
            return generate(model, tokenizer, [text], max_new_tokens, temperature)[0].strip()

    def evaluate(self, data: Union[str, os.PathLike], exact_match: int = 0, max_new_tokens: int = 64,
                 adapter: AdapterChoice = "best", batch_size: int = 8) -> dict:
        """Loss and perplexity over a data file (the training step's own loss), and with
        `exact_match` N the exact match of greedy answers on its first N rows: recipes/evaluate.py,
        as `lorakit eval`, with the run's format, template and max_seq_len."""
        from ..recipes.evaluate import evaluate_dataset

        d = self.config.data
        with self._using(adapter) as (model, tokenizer):
            out = evaluate_dataset(model, tokenizer, os.fspath(data), fmt=d.format, template=d.template,
                                   max_seq_len=d.max_seq_len, exact_match_limit=exact_match,
                                   max_new_tokens=max_new_tokens, batch_size=batch_size)
        path = self.resolve_adapter(adapter)
        return {**out, "adapter": str(path) if path is not None else None}

    def merge(self, out: Union[str, os.PathLike], adapter: AdapterChoice = "best", base: str = "trained",
              verify: bool = False, precision: str = "auto", overwrite: bool = False, progress: bool = True) -> Path:
        """Merge the adapter into its base and save a plain 16-bit transformers folder at `out`
        (new or empty, or a previous merge with `overwrite`). `base`: "trained" merges onto the
        weights the adapter was trained against (a QLoRA run's dequantized 4-bit weights, so the
        merged model answers as the adapter model does; the base loads once more for it), or
        "original": the 16-bit checkpoint on disk, streamed tensor by tensor (memory: about one
        tensor; what `lorakit merge` does without --quantization). `verify` compares logits
        before and after (in memory) and raises MergeVerificationError above the limits."""
        from ..recipes.merge import merge_to_folder, streams

        if base not in ("trained", "original"):
            raise ValueError(f"base={base!r} is not allowed; choose 'trained' or 'original'")
        path = self.resolve_adapter(adapter)
        if path is None:
            raise ValueError("adapter=None: there is nothing to merge into the base model")
        model_path = self.config.model.name_or_path
        quantization = self.config.model.quantization if base == "trained" else None
        if streams(model_path, quantization, verify):
            from ..dtypes import to_dtype
            from ..export.hf import stream_merge

            dtype = None if precision == "auto" else to_dtype(precision)
            return Path(stream_merge(model_path, str(path), os.fspath(out), dtype=dtype, overwrite=overwrite,
                                     progress=progress))
        self.merge_report = merge_to_folder(model_path, str(path), os.fspath(out), quantization=quantization,
                                            precision=precision, verify=verify, overwrite=overwrite)
        return Path(out).expanduser()

    def export(self, out: Union[str, os.PathLike], quant: Optional[str] = None, adapter: AdapterChoice = "best",
               format: str = "gguf", overwrite: bool = False, progress: bool = True, name: Optional[str] = None):
        """GGUF for llama.cpp / Ollama (export/gguf.py, as `lorakit export`): `format` "gguf" writes
        the base with the adapter merged in (fp32, into the 16-bit checkpoint on disk) as one file,
        `quant` f16, bf16, q8_0 (default), q4_0, q5_0, q4_k_m or q6_k; "gguf-lora" the adapter alone
        for llama.cpp's --lora (`quant` f32, f16 (default) or bf16). Returns the ExportResult
        (path, size, tensor types)."""
        path = self.resolve_adapter(adapter)
        model_path = self.config.model.name_or_path
        if format == "gguf-lora":
            from ..export.gguf_lora import export_gguf_lora

            if path is None:
                raise ValueError("format='gguf-lora' writes an adapter: adapter=None has none")
            return export_gguf_lora(model_path, str(path), os.fspath(out), quant=quant or "f16", overwrite=overwrite)
        if format != "gguf":
            raise ValueError(f"format={format!r} is not allowed; choose 'gguf' or 'gguf-lora'")
        from ..export.gguf import export_gguf

        return export_gguf(model_path, os.fspath(out), quant=quant or "q8_0", adapter_path=str(path) if path else None,
                           overwrite=overwrite, progress=progress, name=name)


def _adapter_folder(path: Path) -> Optional[Path]:
    return path if (path / "adapter_config.json").is_file() else None


@contextlib.contextmanager
def without_adapters(model, bias: str = "none"):
    """The base model for the block: each LoRALinear's base_layer and each modules_to_save
    original put back in its place (model/modules.replace_module), the adapter layers restored
    after. Refused when the run trained biases (lora.bias): those changed the base layers."""
    from ..lora.layer import LoRALinear, ModulesToSave
    from ..model.modules import replace_module

    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, ModulesToSave))]
    if wrapped and bias != "none":
        raise ValueError(f"adapter=None: this run trained the biases (lora.bias={bias!r}) inside the base layers, "
                         f"so the base model's own answers are gone from this model; load the base model itself "
                         f"(lorakit.load_model) to ask it")
    swapped: list[tuple[str, object]] = []
    try:
        for name, module in wrapped:
            if any(name.startswith(outer + ".") for outer, _ in swapped):
                continue  # inside a module already swapped out
            replace_module(model, name, module.base_layer if isinstance(module, LoRALinear) else module.original_module)
            swapped.append((name, module))
        yield model
    finally:
        for name, module in reversed(swapped):
            replace_module(model, name, module)
