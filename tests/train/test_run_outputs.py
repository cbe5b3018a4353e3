"""What a run shows besides the loss: sample answers at evaluations, plain progress lines off a
terminal, trackers mirroring metrics.jsonl."""

import json
import logging

import pytest
import torch

import lorakit
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.train import progress as progress_mod
from lorakit.train.loop import train
from lorakit.train.log import read_metrics
from lorakit.train.samples import sample_prompts

from tiny_models import make_examples, tiny_model
from tiny_tokenizers import make_tokenizer


def _run(tmp_path, **train_kw):
    tok = make_tokenizer("plain")
    model = tiny_model("llama", vocab_size=len(tok))
    torch.manual_seed(0)
    lorakit.add_lora(model, LoraConfig(r=4, alpha=8))
    base = dict(output_dir=str(tmp_path / "run"), micro_batch_size=2, lr=1e-2, max_steps=6, eval_every=3,
                save_every=0, precision="fp32", num_samples=2, sample_max_new_tokens=5)
    cfg = RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(**{**base, **train_kw}))
    examples = make_examples(6, seed=1, vocab=len(tok))
    val = make_examples(4, seed=2, vocab=len(tok))
    return train(model, examples, val, cfg, pad_id=tok.pad_token_id, progress=True, tokenizer=tok), tok, val


def test_sample_answers_are_written_at_each_evaluation_and_shown_in_the_report(tmp_path):
    result, tok, val = _run(tmp_path)
    lines = [json.loads(l) for l in (result.run_dir / "samples.jsonl").read_text().splitlines()]
    assert [(r["step"], r["index"]) for r in lines] == [(3, 0), (3, 1), (6, 0), (6, 1)]
    (prompt, ref), _ = sample_prompts(val, 2)
    assert lines[0]["prompt"] == tok.decode(prompt, skip_special_tokens=True)
    assert lines[0]["reference"] == tok.decode(ref, skip_special_tokens=True).strip()
    from lorakit.report.html import write_report

    html = write_report(result.run_dir).read_text()
    assert "No sample generations" not in html and lines[-1]["prompt"][:20] in html


def test_sample_every_zero_writes_none(tmp_path):
    result, _, _ = _run(tmp_path, sample_every=0)
    assert not (result.run_dir / "samples.jsonl").exists()


def test_plain_progress_lines_off_a_terminal(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(progress_mod, "_interactive", lambda: False)
    caplog.set_level(logging.INFO, logger="lorakit")
    _run(tmp_path, max_steps=40, eval_every=0)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("step ")]
    assert len(lines) == 20 and lines[-1].startswith("step 40/40 ")  # one line every 2 steps
    for word in ("loss", "lr", "tok/s", "eta"):
        assert word in lines[0]
    assert all("\r" not in line for line in lines)


def test_tensorboard_holds_the_loss_sequence_of_metrics_jsonl(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, _, _ = _run(tmp_path, report_to=("tensorboard",))
    acc = EventAccumulator(str(result.run_dir / "tensorboard"))
    acc.Reload()
    events = [(e.step, e.value) for e in acc.Scalars("loss")]
    want = [(r["step"], r["loss"]) for r in read_metrics(result.run_dir) if "loss" in r]
    assert [s for s, _ in events] == [s for s, _ in want]
    assert all(abs(a - b) < 1e-6 for (_, a), (_, b) in zip(events, want))


def test_no_tracker_unless_named_and_a_missing_one_names_its_package(tmp_path, monkeypatch):
    result, _, _ = _run(tmp_path / "a")
    assert not (result.run_dir / "tensorboard").exists()
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *a, **k):
        if name == "wandb":
            raise ImportError("No module named 'wandb'", name="wandb")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ImportError, match="pip install wandb"):
        _run(tmp_path / "b", report_to=("wandb",))
    with pytest.raises(lorakit.ConfigError, match="train.report_to='comet'"):
        TrainConfig(report_to=("comet",))
