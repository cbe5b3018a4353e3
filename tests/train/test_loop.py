"""The training loop: accumulation, exact resume, crash-safe checkpoints, early stopping, NaN guard."""

import json
import math

import pytest
import torch

import lorakit
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.data import Batches, collate
from lorakit.train import checkpoint as ckpt_mod
from lorakit.train import loop as loop_mod
from lorakit.train.checkpoint import list_checkpoints
from lorakit.train.loop import accumulate_gradients, train
from lorakit.train.loss import count_supervised
from lorakit.train.setup import enable_gradient_checkpointing
from lorakit.train.step import TrainStep

from killing import dies_after_checkpoint
from tiny_models import make_examples, tiny_model

PAD = 0


def adapted(seed=0, dropout=0.0, r=4, **kw):
    model = tiny_model("llama", **kw)
    torch.manual_seed(seed)
    return lorakit.add_lora(model, LoraConfig(r=r, alpha=2 * r, dropout=dropout))


def run_cfg(tmp_path, **train_kw):
    base = dict(output_dir=str(tmp_path), micro_batch_size=2, lr=5e-3, max_steps=6, eval_every=2,
                save_every=2, keep_last=10, seed=3, warmup_steps=1, precision="fp32")
    base.update(train_kw)
    return RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(**base))


def lora_grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_accumulated_micro_batches_equal_one_big_batch():
    examples = make_examples(4, seed=1)
    assert len({len(e["input_ids"]) for e in examples}) > 1  # unequal lengths
    model = adapted()
    for _, layer in lorakit.lora.inject.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    model.train()
    accumulate_gradients(TrainStep(model, 7), [collate(examples, PAD)])
    big = lora_grads(model)
    model.zero_grad()
    accumulate_gradients(TrainStep(model, 7), [collate([e], PAD) for e in examples])
    small = lora_grads(model)
    for name in big:
        assert torch.allclose(big[name], small[name], atol=1e-6, rtol=0), name


def test_chunked_loss_equals_plain_loss():
    model = tiny_model("qwen2")
    batch = collate(make_examples(3, seed=2), PAD)
    plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    for chunk, fused in ((1, False), (5, False), (1000, False), (1024, True)):
        ours = TrainStep(model, chunk, fused_loss=fused)(batch)[0] / count_supervised(batch["labels"])
        assert abs(float(ours) - float(plain)) < 1e-5


def _losses(run_dir):
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in lines if "loss" in r], [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]


class Killed(Exception):
    pass


@pytest.mark.parametrize("optimizer", ["adamw_torch", "adamw_8bit", "paged_adamw_32bit", "paged_adamw_8bit"])
def test_resume_reproduces_the_uninterrupted_run(tmp_path, monkeypatch, optimizer):
    examples, val = make_examples(10, seed=4), make_examples(3, seed=5)
    full = run_cfg(tmp_path / "full", max_steps=8, grad_accum=2, save_every=3, optimizer=optimizer)
    # r=64: LoRA matrices of 4,096+ elements, so the 8-bit optimizers really keep 8-bit state
    train(adapted(dropout=0.1, r=64), examples, val, full, pad_id=PAD, progress=False)
    want_train, want_val = _losses(tmp_path / "full")
    assert len(want_train) == 8

    part = run_cfg(tmp_path / "part", max_steps=8, grad_accum=2, save_every=3, optimizer=optimizer)
    with dies_after_checkpoint(monkeypatch, 3):  # the process dies right after checkpoint-000003
        train(adapted(dropout=0.1, r=64), examples, val, part, pad_id=PAD, progress=False)
    # a fresh process: new model object with a different LoRA init, RNG in another state
    torch.manual_seed(1234)
    train(adapted(seed=99, dropout=0.1, r=64), examples, val, part, pad_id=PAD, resume=True, progress=False)
    got_train, got_val = _losses(tmp_path / "part")
    assert [s for s, _ in got_train] == [s for s, _ in want_train]
    for (_, a), (_, b) in zip(got_train, want_train):
        assert abs(a - b) <= 1e-6
    for (_, a), (_, b) in zip(got_val, want_val):
        assert abs(a - b) <= 1e-6


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(tmp_path, monkeypatch):
    cfg = run_cfg(tmp_path, max_steps=4, save_every=2)
    real_save = torch.save
    calls = {"n": 0}

    def dying_save(obj, path, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:  # the second checkpoint's trainer state: die half way through
            with open(path, "wb") as f:
                f.write(b"partial")
            raise Killed
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(ckpt_mod.torch, "save", dying_save)
    with pytest.raises(Killed):
        train(adapted(), make_examples(6), [], cfg, pad_id=PAD, progress=False)
    monkeypatch.setattr(ckpt_mod.torch, "save", real_save)
    found = list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["checkpoint-000002"]
    assert not any(p.name.startswith("checkpoint-000004") for p in tmp_path.iterdir())
    model = adapted(seed=7)
    state = ckpt_mod.load_checkpoint(found[0], model)
    assert state["loop"]["step"] == 2
    # and training resumes from it
    result = train(model, make_examples(6), [], cfg, pad_id=PAD, resume=True, progress=False)
    assert result.steps == 4


def test_early_stopping_keeps_the_best_adapter(tmp_path):
    # 4 training rows, disjoint random validation rows and a high lr: validation loss soon rises.
    cfg = run_cfg(tmp_path, max_steps=60, lr=3e-2, eval_every=2, early_stopping_patience=3, warmup_steps=0,
                  schedule="constant")
    result = train(adapted(), make_examples(4, seed=8), make_examples(6, seed=9), cfg, pad_id=PAD, progress=False)
    assert result.stopped_early and "early stopping" in result.stopped_reason
    assert result.steps < 60 and result.best_step < result.steps
    # the saved best adapter reproduces the best validation loss
    model = lorakit.load_adapter(tiny_model("llama"), tmp_path / "best_adapter")
    val_batches = Batches(make_examples(6, seed=9), 2, 3, PAD, shuffle=False)
    assert abs(loop_mod.evaluate(TrainStep(model), val_batches, torch.device("cpu")) - result.best_val_loss) < 1e-5
    _, vals = _losses(tmp_path)
    assert min(v for _, v in vals) == pytest.approx(result.best_val_loss)


def test_overfit_warning(tmp_path):
    cfg = run_cfg(tmp_path, max_steps=30, lr=3e-2, eval_every=3, warmup_steps=0, schedule="constant")
    with pytest.warns(UserWarning, match="validation loss rose .* while training loss fell"):
        train(adapted(), make_examples(4, seed=8), make_examples(6, seed=9), cfg, pad_id=PAD, progress=False)


def test_nonfinite_steps_are_skipped_then_stop_naming_the_module(tmp_path):
    model = adapted()
    layer = model.model.layers[1].mlp.down_proj
    with torch.no_grad():
        layer.lora_B.weight[0, 0] = float("nan")
    cfg = run_cfg(tmp_path, max_steps=10, max_bad_steps=3, save_every=0)
    with pytest.warns(UserWarning, match=r"non-finite loss.*model\.layers\.1\.mlp\.down_proj"):
        result = train(model, make_examples(6), [], cfg, pad_id=PAD, progress=False)
    assert result.stopped_early and "3 non-finite steps in a row" in result.stopped_reason
    assert result.steps == 2 and not (tmp_path / "adapter").exists()


def test_run_folder_has_metrics_curve_and_adapter(tmp_path):
    cfg = run_cfg(tmp_path, max_steps=4)
    result = train(adapted(), make_examples(8), make_examples(2, seed=1), cfg, pad_id=PAD, progress=False)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "loss_curve.png").stat().st_size > 1000
    end = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert end["event"] == "end" and end["peak_memory_bytes"] > 0 and result.peak_memory_bytes > 0
    assert math.isfinite(result.final_train_loss)


@pytest.mark.parametrize("quantization", ["nf4", None])
def test_checkpointing_replays_small_frozen_outputs(tmp_path, quantization):
    """(Q)LoRA with checkpointing: the adapted frozen layers (4-bit or 16-bit) whose output is no
    wider than their input (q/k/v/o/down) run once per step, their outputs replayed during
    recomputation; the up-projections run twice; the gradients equal those without checkpointing."""
    from tiny_models import tiny_model

    tiny_model("llama").save_pretrained(tmp_path)
    examples = make_examples(3, seed=11)
    grads, calls = {}, {}
    for ckpt in (False, True):
        model, _ = lorakit.load_model(str(tmp_path), quantization=quantization, compute_dtype="fp32",
                                      load_tokenizer=False)
        torch.manual_seed(0)  # the same A in both runs
        lorakit.add_lora(model, LoraConfig(r=4, alpha=8))
        for _, layer in lorakit.lora.inject.lora_layers(model):
            torch.manual_seed(0)
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        if ckpt:
            enable_gradient_checkpointing(model)
        model.train()
        count = {}
        for name, module in model.named_modules():
            if name.endswith(("self_attn.q_proj.base_layer", "mlp.down_proj.base_layer", "mlp.up_proj.base_layer")):
                kind = name.split(".")[-2]
                module.register_forward_hook(lambda *_, kind=kind: count.__setitem__(kind, count.get(kind, 0) + 1))
        accumulate_gradients(TrainStep(model, 16), [collate(examples, PAD)])
        grads[ckpt], calls[ckpt] = lora_grads(model), count
    layers = len(model.model.layers)
    assert calls[False] == {"q_proj": layers, "up_proj": layers, "down_proj": layers}
    assert calls[True] == {"q_proj": layers, "up_proj": 2 * layers, "down_proj": layers}
    for name in grads[False]:
        assert torch.allclose(grads[False][name], grads[True][name], atol=1e-6, rtol=1e-5), name


def test_replay_refuses_an_output_that_does_not_fit():
    from lorakit.model import replay as replay_mod

    layer = lorakit.Linear4bit(8, 4, bias=False, compute_dtype=torch.float32)
    record, replay = replay_mod.replay_contexts()
    with record:
        replay_mod.replayed(layer, torch.randn(2, 8))
    with replay, pytest.raises(RuntimeError, match="does not fit input"):
        replay_mod.replayed(layer, torch.randn(3, 8))
    with replay:
        replay_mod.replayed(layer, torch.randn(2, 8))
        with pytest.raises(RuntimeError, match="more kept outputs"):
            replay_mod.replayed(layer, torch.randn(2, 8))


def test_gradient_checkpointing_gives_the_same_gradients():
    examples = make_examples(3, seed=11)
    grads = []
    for ckpt in (False, True):
        model = adapted()
        for _, layer in lorakit.lora.inject.lora_layers(model):
            torch.manual_seed(0)
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        if ckpt:
            enable_gradient_checkpointing(model)
            # transformers >= 5.2 names it activation checkpointing, earlier versions gradient checkpointing
            assert getattr(model, "is_activation_checkpointing", None) or model.is_gradient_checkpointing
        model.train()
        accumulate_gradients(TrainStep(model, 16), [collate(examples, PAD)])
        grads.append(lora_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.allclose(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5), name
