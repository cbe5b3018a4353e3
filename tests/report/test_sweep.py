"""`lorakit sweep`: 2 ranks x 2 methods on a tiny Llama, interrupted mid-sweep and rerun; the table's
numbers are checked against each run's own metrics.jsonl, and the choice of the best run."""

import argparse
import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import lorakit
from lorakit.config import ConfigError, RunConfig, LoraConfig, TrainConfig
from lorakit.recipes import sweep
from lorakit.report.summary import RunSummary
from lorakit.train import loop as loop_mod
from lorakit.train.log import read_metrics

from tiny_tokenizers import ANIMALS, write_jsonl

RANKS, METHODS = (4, 8), ("lora", "qlora")
NAMES = [f"r{r}-{m}" for m in METHODS for r in RANKS]  # plan order: method-major, then rank
STEPS, EVAL_EVERY = 8, 4
INTERRUPT_AT_STEP = 6  # in the 3rd run (r4-qlora), after its step-4 checkpoint


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    # short prompt/completion rows (~10 tokens) keep 4 runs fast on a CPU
    rows = [{"prompt": f"animal {i % 8}:", "completion": f" {ANIMALS[i % 8]}"} for i in range(40)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows)


def sweep_argv(model_dir, data_file, out, *extra):
    return ["--model", str(model_dir), "--data", str(data_file), "--rank", ",".join(map(str, RANKS)),
            "--method", ",".join(METHODS), "--alpha-ratio", "2", "--out", str(out), "--no-progress",
            "--set", f"train.max_steps={STEPS}", "--set", f"train.eval_every={EVAL_EVERY}",
            "--set", f"train.save_every={EVAL_EVERY}", "--set", "train.keep_last=1", "--set", "train.lr=1e-2",
            "--set", "train.precision=fp32", "--set", "train.seed=0", "--set", "data.val_size=8", *extra]


def run_main(argv) -> int:
    parser = argparse.ArgumentParser()
    sweep.add_arguments(parser)
    return sweep.main(parser.parse_args(argv))


@pytest.fixture(scope="module")
def interrupted_sweep(model_dir, data_file, tmp_path_factory):
    """Run the sweep, interrupt it (Ctrl-C) in the middle of its 3rd run, then run the same command again."""
    out = tmp_path_factory.mktemp("sweep")
    calls = {"n": 0}
    real = loop_mod.accumulate_gradients

    def interrupting(*a, **k):  # one call per optimizer step (grad_accum = 1)
        calls["n"] += 1
        if calls["n"] == 2 * STEPS + INTERRUPT_AT_STEP:
            raise KeyboardInterrupt
        return real(*a, **k)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is ~5x faster than several on a busy machine
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(loop_mod, "accumulate_gradients", interrupting)
            rc_first = run_main(sweep_argv(model_dir, data_file, out))
        after_interrupt = {n: (out / n / "metrics.jsonl").read_bytes() if (out / n / "metrics.jsonl").exists()
                           else None for n in NAMES}
        checkpoints = sorted(p.name for p in (out / NAMES[2]).glob("checkpoint-*"))
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            rc_second = run_main(sweep_argv(model_dir, data_file, out))
    finally:
        torch.set_num_threads(threads)
    return {"out": out, "rc": (rc_first, rc_second), "after_interrupt": after_interrupt,
            "checkpoints": checkpoints, "stdout": buf.getvalue()}


def test_interrupted_sweep_reuses_finished_runs(interrupted_sweep):
    s = interrupted_sweep
    out = s["out"]
    assert s["rc"] == (130, 0)
    first, second, third, fourth = (s["after_interrupt"][n] for n in NAMES)
    assert first is not None and second is not None and fourth is None
    assert b'"event": "end"' not in third and s["checkpoints"] == ["checkpoint-000004"]
    # the finished runs were reused as they were, not trained again
    for n in NAMES[:2]:
        assert (out / n / "metrics.jsonl").read_bytes() == s["after_interrupt"][n]
    assert f"reused finished runs: {NAMES[0]}, {NAMES[1]}" in s["stdout"]
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["reused", "reused", "resumed", "trained"]
    # the interrupted run resumed from step 4: every step logged once, both evaluations, one end event
    recs = read_metrics(out / NAMES[2])
    assert [r["step"] for r in recs if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in recs if "val_loss" in r] == [EVAL_EVERY, STEPS]
    assert [r.get("event") for r in recs].count("end") == 1 and recs[-1]["event"] == "end"
    # the table is complete
    assert [r["name"] for r in manifest["results"]] == NAMES
    assert all(r["finished"] for r in manifest["results"])
    for n in NAMES:
        assert (out / n / "adapter" / "adapter_model.safetensors").is_file()  # every adapter is kept
        assert (out / n / "best_adapter" / "adapter_model.safetensors").is_file()


def test_table_matches_each_runs_metrics(interrupted_sweep, model_dir):
    out, stdout = interrupted_sweep["out"], interrupted_sweep["stdout"]
    results = {r["name"]: r for r in json.loads((out / "sweep.json").read_text())["results"]}
    trainable_by_rank = {}
    for r in RANKS:
        model, _ = lorakit.load_model(str(model_dir), compute_dtype="fp32")
        lorakit.add_lora(model, LoraConfig(r=r, alpha=2.0 * r))
        trainable_by_rank[r] = lorakit.count_parameters(model)[0]
    for name in NAMES:
        recs = read_metrics(out / name)
        steps = [x for x in recs if "loss" in x]
        evals = [x for x in recs if "val_loss" in x]
        end = recs[-1]
        best = min(evals, key=lambda x: x["val_loss"])
        row = results[name]
        assert row["best_val_loss"] == best["val_loss"] == end["best_val_loss"]
        assert row["best_step"] == best["step"] == end["best_step"]
        assert row["final_train_loss"] == steps[-1]["loss"]
        assert row["overfit_gap"] == evals[-1]["val_loss"] - evals[-1]["train_loss_mean"]
        assert row["seconds"] == end["seconds"] and row["peak_memory_bytes"] == end["peak_memory_bytes"]
        assert row["tokens_per_s"] == steps[-1]["tokens_per_s"]
        assert row["steps"] == STEPS
        assert row["adapter_bytes"] == sum(p.stat().st_size for p in (out / name / "adapter").iterdir())
        cfg = yaml.safe_load((out / name / "run_config.yaml").read_text())
        assert row["trainable_params"] == trainable_by_rank[cfg["lora"]["r"]]
        # the printed table shows these numbers on the run's line
        line = next(l for l in stdout.splitlines() if l.startswith(f"| {name} "))
        for text in (f"{best['val_loss']:.4f}", f"{steps[-1]['loss']:.4f}", f"{trainable_by_rank[cfg['lora']['r']]:,}"):
            assert text in line


def test_runs_differ_only_in_the_swept_fields(interrupted_sweep):
    out = interrupted_sweep["out"]
    cfgs = {n: yaml.safe_load((out / n / "run_config.yaml").read_text()) for n in NAMES}
    varied = {("lora", "r"), ("lora", "alpha"), ("model", "quantization"), ("train", "output_dir")}
    base = cfgs[NAMES[0]]
    for name, cfg in cfgs.items():
        for section, fields in cfg.items():
            for key, value in fields.items():
                if (section, key) not in varied:
                    assert value == base[section][key], (name, section, key)
        r, method = int(name.split("-")[0][1:]), name.split("-")[1]
        assert cfg["lora"]["r"] == r and cfg["lora"]["alpha"] == 2.0 * r
        assert cfg["model"]["quantization"] == ("nf4" if method == "qlora" else None)
        assert Path(cfg["train"]["output_dir"]) == out / name


def test_best_run_charts_and_report(interrupted_sweep):
    out, stdout = interrupted_sweep["out"], interrupted_sweep["stdout"]
    manifest = json.loads((out / "sweep.json").read_text())
    rows = manifest["results"]
    lowest = min(r["best_val_loss"] for r in rows)
    best = next(r for r in rows if r["name"] == manifest["best"])
    assert best["best_val_loss"] <= lowest * (1 + sweep.TOLERANCE)
    for r in rows:  # no run with fewer trainable parameters was within the tolerance
        if r["trainable_params"] < best["trainable_params"]:
            assert r["best_val_loss"] > lowest * (1 + sweep.TOLERANCE)
    assert f"Best run: {best['name']}" in stdout and f"Best run: {best['name']}" in manifest["why"]
    adapter = out / best["name"] / "best_adapter"
    assert f"--adapter {adapter}" in manifest["merge_command"] and manifest["merge_command"] in stdout
    assert ("--quantization nf4" in manifest["merge_command"]) == (best["quantization"] == "nf4")
    val_svg = (out / "val_loss.svg").read_text()
    assert val_svg.count('class="series"') == len(NAMES)
    for n in NAMES:
        assert f'data-name="{n}"' in val_svg
    rank_svg = (out / "best_val_vs_rank.svg").read_text()
    assert rank_svg.count('class="series"') == len(METHODS) and rank_svg.count('class="point"') == len(NAMES)
    html = (out / "report.html").read_text()
    assert "http://" not in html and "https://" not in html and "<script" not in html
    for r in rows:
        assert r["name"] in html and f"{r['best_val_loss']:.4f}" in html
    table = (out / "sweep_table.md").read_text()
    assert all(f"| {n} " in table for n in NAMES)
    for n in NAMES:  # each run got its own report too
        assert (out / n / "report.html").is_file() and (out / n / "run_info.json").is_file()


def test_rerun_with_another_config_is_refused_untouched(interrupted_sweep, model_dir, data_file):
    out = interrupted_sweep["out"]
    before = (out / "sweep.json").read_bytes()
    argv = sweep_argv(model_dir, data_file, out)
    argv[argv.index("train.lr=1e-2")] = "train.lr=2e-2"
    with pytest.raises(ConfigError, match=r"different config \(train\.lr\).*--restart"):
        run_main(argv)
    assert (out / "sweep.json").read_bytes() == before


# ------------------------------------------------------------------ no training below


def summary(name, r, best, params, gap=0.1, rise=0.0, final_train=1.0) -> RunSummary:
    return RunSummary(name=name, run_dir=f"/x/{name}", finished=True, steps=10, best_val_loss=best,
                      best_step=10 if best is not None else None, final_train_loss=final_train,
                      final_val_loss=None if best is None else best + rise, overfit_gap=gap,
                      val_rise=None if best is None else rise, seconds=1.0, tokens_per_s=1.0,
                      peak_memory_bytes=1, predicted_peak_bytes=None, memory_figure="peak RSS", trainable_params=params, adapter_bytes=1,
                      reason="completed", r=r, alpha=2.0 * r, lr=1e-3, quantization=None)


def test_choose_best_prefers_smaller_rank_within_noise():
    runs = [summary("r8", 8, 1.004, 800), summary("r16", 16, 1.000, 1600), summary("r32", 32, 1.200, 3200, gap=0.9)]
    best, why = sweep.choose_best(runs)
    assert best.name == "r8"
    assert "r16 reached 1.0000, only 0.40% lower: within the 1% noise tolerance" in why
    assert "r32, is 20.0% worse" in why and "largest overfit gap is r32's (+0.9000)" in why


def test_choose_best_outside_noise_takes_the_lowest_and_flags_a_rise():
    runs = [summary("r8", 8, 1.10, 800), summary("r16", 16, 1.00, 1600, rise=0.05)]
    best, why = sweep.choose_best(runs)
    assert best.name == "r16" and "r8, is 10.0% worse" in why
    assert "rose by 0.0500 after step 10: use best_adapter/" in why
    best, _ = sweep.choose_best(runs, tolerance=0.2)
    assert best.name == "r8"


def test_choose_best_without_validation_says_so():
    runs = [summary("a", 8, None, 800, final_train=0.5), summary("b", 16, None, 1600, final_train=0.3)]
    best, why = sweep.choose_best(runs)
    assert best.name == "b" and "No validation loss was recorded" in why and "final training loss 0.3000" in why


def test_plan_and_argument_errors():
    cfg = RunConfig(lora=LoraConfig(r=4, alpha=12.0), train=TrainConfig(output_dir="/tmp/x", lr=1e-3))
    plan = sweep.plan_sweep(cfg, [2, 8], ["lora", "qlora"], lrs=[1e-3, 3e-3])
    assert [p.name for p in plan][:4] == ["r2-lora-lr0.001", "r8-lora-lr0.001", "r2-qlora-lr0.001", "r8-qlora-lr0.001"]
    assert [p.cfg.lora.alpha for p in plan[:2]] == [6.0, 24.0]  # the config's alpha / r = 3 is kept
    assert {p.cfg.model.quantization for p in plan if p.method == "qlora"} == {"nf4"}
    assert len({p.run_dir for p in plan}) == 8
    with pytest.raises(ConfigError, match="--method 'svd': 'svd' is not allowed; combine with '\\+' from lora, qlora"):
        sweep.plan_sweep(cfg, [8], ["svd"])
    with pytest.raises(ConfigError, match="two initialisations"):
        sweep.plan_sweep(cfg, [8], ["pissa+olora"])
    with pytest.raises(ConfigError, match="--rank: 'x' is not a valid int"):
        sweep.parse_list("8,x", int, "--rank")
    with pytest.raises(ConfigError, match="repeats"):
        sweep.parse_list("8,8", int, "--rank")
    with pytest.raises(ConfigError, match="lora.r=0 is not allowed"):
        sweep.plan_sweep(cfg, [0], ["lora"])


def test_methods_set_exactly_their_fields():
    cfg = RunConfig(lora=LoraConfig(r=4, alpha=8.0, use_rslora=True, dropout=0.1),
                    train=TrainConfig(output_dir="/tmp/x", neftune_alpha=3.0))
    plan = {p.method: p.cfg for p in sweep.plan_sweep(cfg, [8], ["lora", "qlora+dora", "rslora+pissa", "olora+loraplus",
                                                                 "neftune", "pissa_niter_4"])}
    def fields(c):
        return (c.model.quantization, c.lora.use_rslora, c.lora.use_dora, c.lora.init, c.train.loraplus_lr_ratio,
                c.train.neftune_alpha)
    assert fields(plan["lora"]) == (None, False, False, "default", 0.0, 0.0)
    assert fields(plan["qlora+dora"]) == ("nf4", False, True, "default", 0.0, 0.0)
    assert fields(plan["rslora+pissa"]) == (None, True, False, "pissa", 0.0, 0.0)
    assert fields(plan["olora+loraplus"]) == (None, False, False, "olora", 16.0, 0.0)
    assert fields(plan["neftune"]) == (None, False, False, "default", 0.0, 3.0)  # the config's alpha
    assert plan["pissa_niter_4"].lora.init == "pissa_niter_4"
    assert all(c.lora.dropout == 0.1 and c.lora.r == 8 for c in plan.values())  # the rest is the config's
    from lorakit.config import to_dict
    from lorakit.methods import method_of
    assert [method_of(to_dict(c)) for c in plan.values()] == list(plan)  # names round-trip


def test_sweep_compares_variant_methods(model_dir, data_file, tmp_path, capsys):
    """One rank, five methods on the same data, split and seed; each run folder's config says its method."""
    methods = ["lora", "dora", "qlora+pissa", "loraplus", "neftune+rslora"]
    argv = sweep_argv(model_dir, data_file, tmp_path / "s")
    argv[argv.index("--rank") + 1], argv[argv.index("--method") + 1] = "4", ",".join(methods)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert run_main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    table = capsys.readouterr().out
    for m, shown in zip(methods, ["lora", "dora", "qlora (nf4)+pissa", "loraplus", "rslora+neftune"]):
        assert f"| r4-{m} " in table and f" {shown} |" in table, (m, table)
        saved = yaml.safe_load((tmp_path / "s" / f"r4-{m}" / "run_config.yaml").read_text())
        assert saved["data"] == yaml.safe_load((tmp_path / "s" / "r4-lora" / "run_config.yaml").read_text())["data"]
        assert saved["train"]["seed"] == 0
    assert (tmp_path / "s" / "r4-qlora+pissa" / "adapter" / "as_lora" / "adapter_config.json").is_file()
