"""`lorakit` commands end to end on a tiny model folder with a real tokenizer."""

import json

import pytest
from transformers import AutoModelForCausalLM

from lorakit.cli import main
from lorakit.train.log import read_metrics

from tiny_tokenizers import ANIMALS, make_tokenizer, write_jsonl



@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"Name animal number {i % 8}.", "context": "", "response": ANIMALS[i % 8]} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def test_train_eval_merge_generate(model_dir, data_file, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train", "--model", str(model_dir), "--data", str(data_file), "--no-progress",
               "--lora.r", "8", "--train.max_steps", "30", "--train.lr", "1e-2", "--train.precision", "fp32",
               "--train.output_dir", str(run), "--train.eval_every", "10", "--set", "data.val_size=8",
               "--set", "model.quantization=nf4"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "best validation loss" in out
    import re
    measured, predicted = map(int, re.search(r"peak RSS (\d+) MiB measured, (\d+) MiB predicted", out).groups())
    # one prediction per run, printed and recorded; like for like (process + tensors vs the process's peak RSS)
    assert round(json.loads((run / "run_info.json").read_text())["predicted_peak_bytes"] / 2**20) == predicted
    assert 0.85 <= measured / predicted <= 1.15, (measured, predicted)
    records = read_metrics(run)
    train_losses = [r["loss"] for r in records if "loss" in r]
    assert len(train_losses) == 30 and train_losses[-1] < 0.5 * train_losses[0]
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "loss_curve.png").is_file()

    assert main(["eval", "--model", str(model_dir), "--adapter", str(run / "best_adapter"), "--data", str(data_file),
                 "--precision", "fp32", "--quantization", "nf4", "--exact-match", "8", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "perplexity" in out and "exact match" in out

    merged = tmp_path / "merged"
    assert main(["merge", "--model", str(model_dir), "--adapter", str(run / "adapter"), "--out", str(merged),
                 "--quantization", "nf4", "--precision", "fp32", "--verify"]) == 0
    out = capsys.readouterr().out
    assert "top-1 agreement 100.00%" in out
    plain = AutoModelForCausalLM.from_pretrained(merged)
    assert plain.config.vocab_size == len(make_tokenizer("plain"))

    assert main(["generate", "--model", str(merged), "--prompt", "Name animal number 3.", "--template", "alpaca",
                 "--max-new-tokens", "4", "--precision", "fp32"]) == 0
    assert capsys.readouterr().out.strip() != ""


def test_resume_flag_continues(model_dir, data_file, tmp_path, capsys):
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--no-progress", "--train.max_steps", "4",
            "--train.output_dir", str(tmp_path), "--train.save_every", "2", "--train.precision", "fp32"]
    assert main(args) == 0
    assert main(args + ["--resume", "--train.max_steps", "6"]) == 0
    steps = [r["step"] for r in read_metrics(tmp_path) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_fit_memory_keeps_the_effective_batch(model_dir, data_file, tmp_path, capsys, caplog):
    import logging
    caplog.set_level(logging.INFO, logger="lorakit")
    assert main(["train", "--model", str(model_dir), "--data", str(data_file), "--no-progress", "--train.max_steps", "2",
                 "--train.output_dir", str(tmp_path), "--train.micro_batch_size", "8", "--train.grad_accum", "1",
                 "--fit-memory", "2MiB", "--train.precision", "fp32"]) == 0
    import re
    fit = [r.getMessage() for r in caplog.records if r.getMessage().startswith("fit 2MiB")]
    micro, accum = map(int, re.search(r"micro_batch_size (\d+) x grad_accum (\d+)", fit[0]).groups())
    assert micro * accum == 8 and micro < 8  # a 2 MiB budget forces smaller micro-batches
    assert "MiB predicted (" in capsys.readouterr().out
    assert main(["train", "--model", str(model_dir), "--data", str(data_file), "--no-progress",
                 "--train.output_dir", str(tmp_path / "x"), "--fit-memory", "1KiB"]) == 2
    assert "does not fit" in capsys.readouterr().err


def test_estimate_command(capsys):
    assert main(["estimate", "--model", "llama-2-7b", "--method", "qlora", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["total_bytes"] > 4 * 2**30 and "components" in out


def test_data_preview(model_dir, data_file, capsys):
    assert main(["data", "preview", "--data", str(data_file), "--model", str(model_dir), "-n", "2"]) == 0
    out = capsys.readouterr().out
    assert "[[" in out and "40" in out


@pytest.mark.parametrize("argv,message", [
    (["train", "--data", "x.jsonl"], "model.name_or_path is not set"),
    (["train", "--model", "/nonexistent/model", "--data", "x.jsonl"], "does not exist"),
    (["train", "--model", "m", "--data", "d", "--lora.r", "0"], "lora.r=0 is not allowed"),
    (["train", "--model", "m", "--data", "d", "--set", "train.lrr=1"], "unknown config key 'train.lrr'"),
])
def test_errors_are_one_clear_line(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
