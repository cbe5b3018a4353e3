"""The dtype policy (one function) and each precision training for real."""

import math

import pytest
import torch

import lorakit
from lorakit.config import ConfigError, DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.data import Batches
from lorakit.precision import cpu_has_native_bf16, resolve_dtype, resolve_precision
from lorakit.train.loop import evaluate, train
from lorakit.train.step import TrainStep

from tiny_models import make_examples, tiny_model


def test_explicit_names_and_aliases():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("bfloat16") is torch.bfloat16
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("fp32") is torch.float32
    assert resolve_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="auto, bf16, fp16 or fp32"):
        resolve_dtype("int8")


def test_auto_on_cpu_follows_native_bf16():
    want = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert resolve_dtype("auto", "cpu") is want


@pytest.mark.parametrize("capability,want", [((7, 5), torch.float16), ((7, 0), torch.float16),
                                             ((8, 0), torch.bfloat16), ((8, 9), torch.bfloat16), ((9, 0), torch.bfloat16)])
def test_auto_on_cuda_follows_the_compute_capability(monkeypatch, capability, want):
    """A T4 (sm_75) gets fp16 even though torch.cuda.is_bf16_supported() says True there (emulation)."""
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: capability)
    assert resolve_dtype("auto", "cuda") is want
    assert resolve_precision("auto", "cuda").loss_scaling == (want is torch.float16)


def test_auto_on_mps():
    assert resolve_dtype("auto", "mps") is torch.float16


def test_loss_scaling_only_for_fp16():
    assert resolve_precision("fp16").loss_scaling and not resolve_precision("bf16").loss_scaling
    assert not resolve_precision("fp32").loss_scaling


def test_impossible_combinations_are_config_errors():
    with pytest.raises(ConfigError, match="adapter_dtype='compute' with fp16 compute"):
        resolve_precision("fp16", "cpu", adapter_dtype="compute")
    assert resolve_precision("bf16", "cpu", adapter_dtype="compute").adapter_dtype is torch.bfloat16
    assert resolve_precision("fp16", "cpu").adapter_dtype is torch.float32


def test_the_loop_checks_the_model_against_the_precision(tmp_path):
    model = lorakit.add_lora(tiny_model("llama", dtype=torch.float16), LoraConfig(r=4))
    cfg = RunConfig(train=TrainConfig(output_dir=str(tmp_path), precision="bf16", max_steps=1, save_every=0))
    with pytest.raises(ConfigError, match=r"train.precision='bf16', but the model's frozen weights are fp16"):
        train(model, make_examples(2), [], cfg, pad_id=0, progress=False)
    with pytest.raises(ConfigError, match="the run's precision is compute bf16"):
        train(model, make_examples(2), [], cfg, pad_id=0, progress=False, precision=resolve_precision("bf16"))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_trains_with_fp32_adapters(dtype, tmp_path):
    model = tiny_model("llama", dtype=dtype, initializer_range=0.2)
    lorakit.add_lora(model, LoraConfig(r=8, alpha=16))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    cfg = RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(
        output_dir=str(tmp_path), micro_batch_size=4, lr=1e-2, max_steps=25, eval_every=0, save_every=0))
    examples = make_examples(4, seed=3)
    before = evaluate(TrainStep(model), Batches(examples, 4, 0, 0, shuffle=False), torch.device("cpu"))
    result = train(model, examples, [], cfg, pad_id=0, progress=False)
    after = evaluate(TrainStep(model), Batches(examples, 4, 0, 0, shuffle=False), torch.device("cpu"))
    assert math.isfinite(result.final_train_loss) and after < 0.7 * before


def test_packed_and_unpacked_validation_loss_agree():
    model = tiny_model("llama")
    examples = make_examples(7, seed=5)
    plain = evaluate(TrainStep(model), Batches(examples, 3, 0, 0, shuffle=False), torch.device("cpu"))
    packed = evaluate(TrainStep(model), Batches(examples, 2, 0, 0, pack=True, max_seq_len=32, shuffle=False), torch.device("cpu"))
    assert abs(plain - packed) < 1e-5


def test_fp16_loss_scale_overflows_are_skipped_updates_not_divergence(tmp_path, monkeypatch, caplog):
    """A too-large loss scale overflows fp16 gradients while the loss is finite: the scaler skips the
    update and halves the scale; those steps neither count as non-finite steps nor stop the run."""
    import logging

    from lorakit.train import loop as loop_mod

    real = torch.amp.GradScaler
    monkeypatch.setattr(loop_mod.torch.amp, "GradScaler", lambda *a, **k: real(*a, **{**k, "init_scale": 2.0**30}))
    caplog.set_level(logging.INFO, logger="lorakit")
    model = tiny_model("llama", dtype=torch.float16, initializer_range=0.2)
    lorakit.add_lora(model, LoraConfig(r=8, alpha=16))
    cfg = RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(
        output_dir=str(tmp_path), micro_batch_size=4, lr=1e-2, max_steps=30, eval_every=0, save_every=0,
        max_bad_steps=2, schedule="constant"))
    result = train(model, make_examples(4, seed=3), [], cfg, pad_id=0, progress=False)
    overflows = [r for r in caplog.records if "fp16 gradient overflow" in r.getMessage()]
    assert result.stopped_reason == "completed" and result.steps == 30
    assert len(overflows) >= 3  # more than max_bad_steps in a row, and the run went on
    assert math.isfinite(result.final_train_loss)
