"""train/setup.py: the fast paths are named, logged, and one switch turns them all off with the same
loss and gradients (the references they are tested against)."""

import pytest
import torch

import lorakit
from lorakit.config import LoraConfig, ModelConfig
from lorakit.data import collate
from lorakit.model.lean import LeanGatedMLP
from lorakit.quant import kernels
from lorakit.train.setup import FastPaths, describe_fast_paths, prepare_for_training
from lorakit.train.step import TrainStep

from tiny_models import make_examples, tiny_model


def _loss_and_grads(folder, fast: FastPaths, checkpointing: bool):
    with fast.kernel_scope():
        model, _ = lorakit.load_model(str(folder), quantization="nf4", compute_dtype="bf16", load_tokenizer=False)
        applied = prepare_for_training(model, checkpointing, fast)
        torch.manual_seed(0)
        lorakit.add_lora(model, LoraConfig(r=4, alpha=8))
        for _, layer in lorakit.lora.inject.lora_layers(model):
            torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
        step = TrainStep(model, loss_chunk_size=7, fused_loss=fast.fused_loss).train()
        loss, n = step(collate(make_examples(3, seed=1), 0))
        loss.backward()
        line = describe_fast_paths(model, fast, applied)
    grads = {k: p.grad.float() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), int(n), grads, line, model


@pytest.mark.parametrize("checkpointing", [False, True])
def test_reference_and_fast_paths_give_the_same_loss_and_gradients(tmp_path, checkpointing):
    tiny_model("qwen2", dtype=torch.bfloat16).save_pretrained(tmp_path)
    l1, n1, g1, line1, fast_model = _loss_and_grads(tmp_path, FastPaths(), checkpointing)
    l2, n2, g2, line2, ref_model = _loss_and_grads(tmp_path, FastPaths.from_config(ModelConfig(fast_paths=False)),
                                                   checkpointing)
    assert n1 == n2
    assert torch.allclose(l1, l2, rtol=2e-3, atol=0), (l1, l2)
    for name in g1:
        err = (g1[name] - g2[name]).abs().max() / g2[name].abs().max().clamp(min=1e-12)
        assert err < 3e-2, (name, float(err))  # bf16: the fused loss and lean norms round differently
    assert any(isinstance(m, LeanGatedMLP) for m in fast_model.modules())
    assert not any(isinstance(m, LeanGatedMLP) for m in ref_model.modules())
    assert "lean MLP x2, lean RMSNorm x5" in line1 and "fused head loss" in line1
    assert ("checkpoint replay of down_proj/k_proj/o_proj/q_proj/v_proj" in line1) == checkpointing
    assert line2.startswith("off (model.fast_paths: false)") and "PyTorch reference" in line2
    assert kernels.backend() == "auto"  # the reference scope ended with the run


def test_reference_switch_from_the_command_line():
    import argparse

    from lorakit.config import add_run_arguments, config_from_args

    p = argparse.ArgumentParser()
    add_run_arguments(p)
    cfg = config_from_args(p.parse_args(["--model", "m", "--data", "d", "--reference"]))
    assert cfg.model.fast_paths is False
    assert FastPaths.from_config(cfg.model) == FastPaths(False, False, False, False)


def test_the_loss_curve_leaves_matplotlib_s_backend_alone(tmp_path):
    """No process-wide side effects: a notebook's inline backend stays what it was."""
    import matplotlib

    from lorakit.train.log import MetricsWriter, plot_loss_curve

    before = matplotlib.get_backend()
    matplotlib.use("svg")
    try:
        w = MetricsWriter(tmp_path)
        for step in (1, 2, 3):
            w.write({"step": step, "loss": 1.0 / step})
        w.close()
        assert plot_loss_curve(tmp_path).stat().st_size > 1000
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(before)
