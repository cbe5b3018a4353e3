"""lorakit.finetune(...) -> Run: the same recipe as `lorakit train`, a Run that reopens to the same
numbers, the named errors for bad keyword arguments, and a crash that leaves the run resumable."""

import json
import re

import pytest
import torch

import lorakit
from lorakit.api.fields import config_from_fields, dotted_name, field_index
from lorakit.cli import main
from lorakit.config import ConfigError, LoraConfig, RunConfig, to_dict
from lorakit.train.checkpoint import STATE_NAME, list_checkpoints

from tiny_tokenizers import ANIMALS, write_jsonl

# the same run for the CLI and the API (fp32: bit-for-bit reproducible on any CPU)
FLAGS = {"lora.r": 4, "lora.alpha": 8, "train.max_steps": 6, "train.lr": 1e-2, "train.eval_every": 3,
         "train.save_every": 3, "train.precision": "fp32", "data.val_size": 8, "train.num_samples": 2,
         "train.sample_max_new_tokens": 4, "model.quantization": "nf4"}
TIMING = {"tokens_per_s", "seconds", "peak_memory_bytes", "peak_rss_bytes"}  # wall-clock and process figures


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = [{"instruction": f"Name animal number {i % 8}.", "context": "", "response": ANIMALS[i % 8]} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


@pytest.fixture(scope="module")
def say_file(tmp_path_factory):
    """A task the tiny random model learns in a few steps: say the animal the instruction names."""
    rows = [{"instruction": f"Say {ANIMALS[i % 8]}.", "context": "", "response": ANIMALS[i % 8]} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("say") / "say.jsonl", rows)


def _api_kwargs(model_dir, data_file, out):
    return dict(model=model_dir, data=data_file, r=4, alpha=8, max_steps=6, lr=1e-2, eval_every=3, save_every=3,
                precision="fp32", val_size=8, num_samples=2, sample_max_new_tokens=4, quantization="nf4",
                output_dir=out, progress=False)


def _without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def test_finetune_equals_lorakit_train(model_dir, data_file, tmp_path, capsys):
    """Same settings, same seed: the same metrics (every loss, lr, grad norm, validation loss) and the
    same adapter bytes from the CLI and from Python; Run.load of the CLI's folder gives the summary
    `lorakit train` printed, and the live Run's summary."""
    cli_dir, api_dir = tmp_path / "cli", tmp_path / "api"
    args = ["train", "--model", str(model_dir), "--data", str(data_file), "--no-progress",
            "--train.output_dir", str(cli_dir)] + [a for k, v in FLAGS.items() for a in (f"--{k}", str(v))]
    assert main(args) == 0
    printed = capsys.readouterr().out
    run = lorakit.finetune(**_api_kwargs(model_dir, data_file, api_dir))
    assert capsys.readouterr().out == ""  # the library prints nothing (progress off)

    assert isinstance(run, lorakit.Run) and run.run_dir == api_dir
    assert _without_timing(run.metrics) == _without_timing(lorakit.Run.load(cli_dir).metrics)
    assert len([r for r in run.metrics if "loss" in r]) == 6 and len([r for r in run.metrics if "val_loss" in r]) == 2
    for name in ("adapter", "best_adapter"):
        assert (api_dir / name / "adapter_model.safetensors").read_bytes() == \
               (cli_dir / name / "adapter_model.safetensors").read_bytes()
    cli_cfg = (cli_dir / "run_config.yaml").read_text().replace(str(cli_dir), "OUT")
    assert cli_cfg == (api_dir / "run_config.yaml").read_text().replace(str(api_dir), "OUT")
    assert run.adapter_path == api_dir / "adapter" and run.best_adapter_path == api_dir / "best_adapter"

    reopened = lorakit.Run.load(cli_dir).summary
    best = re.search(r"best validation loss ([\d.]+) at step (\d+)", printed)
    measured, predicted = map(int, re.search(r"peak RSS (\d+) MiB measured, (\d+) MiB predicted", printed).groups())
    assert f"{reopened.best_val_loss:.4f}" == best.group(1) and reopened.best_step == int(best.group(2))
    assert round(reopened.peak_memory_bytes / 2**20) == measured
    assert round(reopened.predicted_peak_bytes / 2**20) == predicted
    assert reopened.finished and reopened.steps == 6 and reopened.tokens_per_s > 0

    live = run.summary
    assert lorakit.Run.load(api_dir).summary == live   # reopening reproduces it, field for field
    end = run.metrics[-1]
    assert (live.best_val_loss, live.best_step, live.peak_memory_bytes) == \
           (end["best_val_loss"], end["best_step"], end["peak_memory_bytes"])
    assert live.predicted_peak_bytes == json.loads((api_dir / "run_info.json").read_text())["predicted_peak_bytes"]
    assert live.tokens_per_s == [r for r in run.metrics if "loss" in r][-1]["tokens_per_s"]


def test_run_uses_the_trained_adapter(model_dir, say_file, tmp_path):
    """generate / evaluate / chat with the adapter and the run's template; a reopened Run (model
    loaded lazily) answers exactly as the live one; adapter=None is the untouched base model."""
    kwargs = _api_kwargs(model_dir, say_file, tmp_path / "run")
    kwargs.update(max_steps=30, eval_every=10, save_every=30, template="alpaca")
    run = lorakit.finetune(**kwargs)
    prompts = [f"Say {a}." for a in ANIMALS]
    live = run.generate(prompts, max_new_tokens=4)
    assert sum(a == b for a, b in zip(live, ANIMALS)) >= 6, live   # it learned the task
    assert run.generate(prompts[3], max_new_tokens=4) == live[3]   # one prompt -> one string

    reopened = lorakit.Run.load(run.run_dir)
    assert reopened._model is None                                 # nothing loaded yet
    assert reopened.generate(prompts, max_new_tokens=4) == live
    assert reopened.chat([{"role": "user", "content": prompts[2]}], max_new_tokens=4) == live[2]
    with pytest.raises(ValueError, match="exactly one user message"):
        reopened.chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                       {"role": "user", "content": "c"}])

    res = run.evaluate(say_file, exact_match=16, max_new_tokens=4)
    assert res["exact_match_n"] == 16 and res["exact_match"] >= 0.75 and res["adapter"] == str(run.best_adapter_path)
    base = run.evaluate(say_file, exact_match=16, max_new_tokens=4, adapter=None)
    assert base["exact_match"] <= 0.25 and base["loss"] > res["loss"]

    # the base alone, as lorakit.load_model gives it: adapter=None swaps the base layers in and back
    plain, tok = lorakit.load_model(str(model_dir), quantization="nf4", compute_dtype="fp32")
    base_answers = run.generate(prompts, max_new_tokens=4, adapter=None)
    from lorakit.recipes.generate import generate, templated_prompt
    assert base_answers == [a.strip() for a in generate(plain, tok, [templated_prompt(p, "alpaca", tok) for p in prompts], 4)]
    assert run.generate(prompts, max_new_tokens=4) == live       # the adapter is back in place
    assert run.generate(prompts, max_new_tokens=4, adapter="final") == run.generate(prompts, max_new_tokens=4,
                                                                                      adapter=run.adapter_path)


def test_bad_keyword_arguments_raise_named_errors(model_dir, data_file, tmp_path, capsys):
    with pytest.raises(ConfigError, match=r"unknown config field 'rank'; did you mean 'r'"):
        config_from_fields(model="m", data="d", rank=8)
    with pytest.raises(ConfigError, match=r"lora\.r is given twice"):
        config_from_fields(model="m", data="d", r=8, overrides={"lora.r": 16})
    with pytest.raises(ConfigError, match=r"model\.name_or_path is not set"):
        config_from_fields(data="d")
    with pytest.raises(ConfigError, match=r"model= takes a path"):
        config_from_fields(model=torch.nn.Linear(2, 2), data="d")
    # the errors `lorakit train` prints, word for word, for a bad dotted key and a bad value
    base = ["train", "--model", str(model_dir), "--data", str(data_file), "--train.output_dir", str(tmp_path / "x")]
    for cli_extra, api_kwargs in ((["--set", "lora.rr=3"], {"overrides": {"lora.rr": 3}}),
                                  (["--set", "lora.r=0"], {"r": 0}),
                                  (["--train.schedule", "cosine2"], {"schedule": "cosine2"}),
                                  (["--set", "train.lr=fast"], {"overrides": ["train.lr=fast"]})):
        assert main(base + cli_extra) == 2
        printed = capsys.readouterr().err.strip()
        with pytest.raises(ConfigError) as e:
            lorakit.finetune(model=model_dir, data=data_file, output_dir=tmp_path / "y", **api_kwargs)
        assert printed == f"lorakit: error: {e.value}"
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_ambiguous_field_names_are_refused():
    """A name that is a field of two sections must be given dotted (a config class with such a
    field, as a later section might add)."""
    from dataclasses import dataclass, field

    @dataclass(frozen=True)
    class A:
        seed: int = 0
        size: int = 1

    @dataclass(frozen=True)
    class B:
        seed: int = 0

    @dataclass(frozen=True)
    class Both:
        a: A = field(default_factory=A)
        b: B = field(default_factory=B)

    assert field_index(Both) == {"seed": ["a.seed", "b.seed"], "size": ["a.size"]}
    assert dotted_name("size", Both) == "a.size"
    with pytest.raises(ConfigError, match=r"'seed' is ambiguous: it is a field of a\.seed and b\.seed.*overrides"):
        dotted_name("seed", Both)
    # today's RunConfig: every field name is unique, and each maps to its own section
    index = field_index(RunConfig)
    assert all(len(v) == 1 for v in index.values()), {k: v for k, v in index.items() if len(v) > 1}


def test_config_sources_combine():
    """A RunConfig, a dict or a YAML file, then fields, sections and overrides, in that order."""
    base = RunConfig()
    cfg = config_from_fields(base, model="m", data="d.jsonl", r=32, lr=1e-3, quantization="nf4",
                             overrides={"train.max_steps": 7, "data.val_size": 0})
    assert (cfg.model.name_or_path, cfg.data.path, cfg.lora.r, cfg.train.lr, cfg.model.quantization,
            cfg.train.max_steps, cfg.data.val_size) == ("m", "d.jsonl", 32, 1e-3, "nf4", 7, 0)
    assert config_from_fields(to_dict(cfg)) == cfg
    cfg2 = config_from_fields({"model": {"name_or_path": "m"}}, data="d.jsonl", lora=LoraConfig(r=4, alpha=4),
                              train={"lr": 5e-4}, overrides=["train.max_steps=3"])
    assert (cfg2.lora.r, cfg2.lora.alpha, cfg2.train.lr, cfg2.train.max_steps) == (4, 4.0, 5e-4, 3)


def test_yaml_config_path(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  name_or_path: m\ndata:\n  path: d.jsonl\nlora:\n  r: 8\ntrain:\n  lr: 2e-4\n")
    cfg = config_from_fields(path, r=16)
    assert (cfg.lora.r, cfg.train.lr, cfg.model.name_or_path) == (16, 2e-4, "m")
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_fields(tmp_path / "missing.yaml")


def test_crash_leaves_checkpoint_and_run_reopens(model_dir, data_file, tmp_path, monkeypatch):
    """An exception in the middle of training (here: in step 5, after the checkpoint of step 3) leaves
    that checkpoint complete, Run.load reopens the folder and answers with it, and resume=True
    finishes the run with exactly the metrics and adapter of an uninterrupted one."""
    import lorakit.train.loop as loop

    out = tmp_path / "crashed"
    real = loop.accumulate_gradients
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise RuntimeError("simulated failure in step 5")
        return real(*args, **kwargs)

    monkeypatch.setattr(loop, "accumulate_gradients", failing)
    with pytest.raises(RuntimeError, match="simulated failure") as e:
        lorakit.finetune(**_api_kwargs(model_dir, data_file, out))
    if hasattr(e.value, "__notes__"):
        assert any("resume=True" in n and "checkpoint-000003" in n for n in e.value.__notes__)
    monkeypatch.setattr(loop, "accumulate_gradients", real)

    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-000003"]
    state = torch.load(out / "checkpoint-000003" / STATE_NAME, weights_only=True)
    assert state["loop"]["step"] == 3
    run = lorakit.Run.load(out)
    assert not run.finished and run.summary.reason == "unfinished" and run.adapter_path is None
    assert run.resolve_adapter("final") == out / "checkpoint-000003"
    assert run.resolve_adapter("best") == out / "best_adapter"          # the evaluation of step 3
    assert isinstance(run.generate("Name animal number 1.", max_new_tokens=2), str)
    assert "unfinished" in run._repr_html_()

    resumed = lorakit.finetune(**_api_kwargs(model_dir, data_file, out), resume=True)
    straight = lorakit.finetune(**_api_kwargs(model_dir, data_file, tmp_path / "straight"))
    assert resumed.finished and _without_timing(resumed.metrics) == _without_timing(straight.metrics)
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == \
           (tmp_path / "straight" / "adapter" / "adapter_model.safetensors").read_bytes()


def test_chat_rows_are_prompted_as_chat(model_dir, tmp_path):
    """A run on chat rows (data.format auto: detected from the file) prompts generate and chat with the
    chat format it trained on (ChatML: the tiny tokenizer has no template of its own)."""
    from lorakit.recipes.generate import chat_prompt

    rows = [{"messages": [{"role": "user", "content": f"Say {a}."}, {"role": "assistant", "content": a}]}
            for a in ANIMALS * 3]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = lorakit.finetune(model=model_dir, data=path, max_steps=2, val_size=0, precision="fp32",
                           output_dir=tmp_path / "run", progress=False)
    assert run.config.data.format == "auto" and run.data_format == "chat" and run.prompt_template() == "chat"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say owl."}]
    text = chat_prompt(messages, run.tokenizer)
    assert text.startswith("<|im_start|>system\nBe brief.<|im_end|>") and text.endswith("<|im_start|>assistant\n")
    assert run.chat(messages, max_new_tokens=3) == run.generate(text, template="raw", max_new_tokens=3)
    assert run.generate("Say owl.", max_new_tokens=3) == run.chat([messages[1]], max_new_tokens=3)
