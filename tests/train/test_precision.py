"""The dtype policy (one function) and each precision training for real."""

import math

import pytest
import torch

import lorakit
from lorakit.config import DataConfig, LoraConfig, RunConfig, TrainConfig
from lorakit.train.loop import Batches, evaluate, train
from lorakit.train.precision import cpu_has_native_bf16, precision_policy, resolve_dtype

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


def test_auto_on_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_dtype("auto", "cuda") is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_dtype("auto", "cuda") is torch.float16  # e.g. a T4
    assert resolve_dtype("auto", "mps") is torch.float16


def test_loss_scaling_only_for_fp16():
    assert precision_policy("fp16").loss_scaling and not precision_policy("bf16").loss_scaling
    assert not precision_policy("fp32").loss_scaling


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_base_trains_with_fp32_adapters(dtype, tmp_path):
    model = tiny_model("llama", dtype=dtype, initializer_range=0.2)
    lorakit.add_lora(model, LoraConfig(r=8, alpha=16))
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
    cfg = RunConfig(data=DataConfig(max_seq_len=64), train=TrainConfig(
        output_dir=str(tmp_path), micro_batch_size=4, lr=1e-2, max_steps=25, eval_every=0, save_every=0))
    examples = make_examples(4, seed=3)
    before = evaluate(model, Batches(examples, 4, 0, 0, shuffle=False), torch.device("cpu"), 1024)
    result = train(model, examples, [], cfg, pad_id=0, progress=False)
    after = evaluate(model, Batches(examples, 4, 0, 0, shuffle=False), torch.device("cpu"), 1024)
    assert math.isfinite(result.final_train_loss) and after < 0.7 * before


def test_packed_and_unpacked_validation_loss_agree():
    model = tiny_model("llama")
    examples = make_examples(7, seed=5)
    plain = evaluate(model, Batches(examples, 3, 0, 0, shuffle=False), torch.device("cpu"), 1024)
    packed = evaluate(model, Batches(examples, 2, 0, 0, pack=True, max_seq_len=32, shuffle=False), torch.device("cpu"), 1024)
    assert abs(plain - packed) < 1e-5
