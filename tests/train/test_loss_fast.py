"""The fused head + cross-entropy fast path equals the general chunked path (loss and gradients)."""

import pytest
import torch

import lorakit
from lorakit.config import LoraConfig
from lorakit.data import collate
from lorakit.train import loss as loss_mod
from lorakit.train.step import TrainStep

from tiny_models import make_examples, tiny_model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows,cols", [(3, 7), (256, 8192), (5, 100)])
def test_fused_head_ce_matches_general_path(monkeypatch, dtype, rows, cols):
    torch.manual_seed(0)
    model = lorakit.add_lora(tiny_model("qwen2").to(dtype), LoraConfig(r=4, alpha=8))
    for _, layer in lorakit.lora.inject.lora_layers(model):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.05)
    batch = collate(make_examples(3, seed=2), 0)
    assert loss_mod.fast_head(model, model.get_output_embeddings(), dtype)
    monkeypatch.setattr(loss_mod, "HEAD_ROWS", rows)
    monkeypatch.setattr(loss_mod, "HEAD_COLS", cols)  # several vocabulary slices, the last one ragged
    results = []
    for fast in (True, False):
        model.zero_grad()
        loss, _ = TrainStep(model, loss_chunk_size=5, fused_loss=fast)(batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (l1, g1), (l2, g2) = results
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(l1, l2, rtol=tol, atol=0)
    for name in g1:
        err = (g1[name] - g2[name]).abs().max() / g2[name].abs().max().clamp(min=1e-12)
        assert err < tol, (name, err)


def test_fused_head_not_used_for_trainable_or_capped_heads():
    model = tiny_model("qwen2")
    head = model.get_output_embeddings()
    dtype = head.weight.dtype
    head.weight.requires_grad_(True)
    assert not loss_mod.fast_head(model, head, dtype)
    head.weight.requires_grad_(False)
    assert loss_mod.fast_head(model, head, dtype)
    model.config.final_logit_softcapping = 30.0
    assert not loss_mod.fast_head(model, head, dtype)


def test_fused_head_online_softmax_is_exact_when_the_max_moves_between_slices():
    """Logits that peak in a late vocabulary slice (and are tiny in the first) must give the same
    loss and gradient as a dense fp32 log-softmax: the running sum is rescaled, never overflows."""
    torch.manual_seed(0)
    vocab, hidden, n = 50, 8, 6
    weight = torch.randn(vocab, hidden, dtype=torch.float64).float()
    weight[-3:] *= 40.0  # the last slice holds logits ~100x larger than the first
    h = torch.randn(n, hidden, requires_grad=True)
    y = torch.tensor([0, 49, 10, 48, 25, 3])
    old = loss_mod.HEAD_COLS
    try:
        loss_mod.HEAD_COLS = 16
        fused = loss_mod.LinearCrossEntropySum.apply(h, weight, y, True)       # [n]: one CE per row
        g_rows = torch.rand(n)                                                  # a weight per row (DPO's case)
        (g_fused,) = torch.autograd.grad(fused, h, g_rows)
    finally:
        loss_mod.HEAD_COLS = old
    ref = torch.nn.functional.cross_entropy(h @ weight.t(), y, reduction="none")
    (g_ref,) = torch.autograd.grad(ref, h, g_rows)
    assert torch.isfinite(fused).all() and fused.shape == (n,)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-4)


def test_fused_head_rejects_labels_outside_the_vocabulary():
    weight = torch.randn(10, 4)
    h = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ValueError, match=r"label 10 is outside the model's vocabulary \[0, 10\)"):
        loss_mod.LinearCrossEntropySum.apply(h, weight, torch.tensor([1, 10]), True)


def test_block_sizes_per_device_and_the_planner_agrees():
    """The CPU keeps its cache-sized blocks; other devices get the larger GPU blocks, and
    transient_bytes (the planner's number) follows the device's blocks."""
    assert loss_mod.head_blocks("cpu") == (loss_mod.HEAD_ROWS, loss_mod.HEAD_COLS) == (256, 8192)
    assert loss_mod.head_blocks("cuda") == (loss_mod.GPU_HEAD_ROWS, loss_mod.GPU_HEAD_COLS)
    rows, hidden, vocab = 4096, 64, 128_256
    cpu = loss_mod.transient_bytes(rows, hidden, vocab, 2, True, 1024)
    gpu = loss_mod.transient_bytes(rows, hidden, vocab, 2, True, 1024, device="cuda")
    r, c = loss_mod.head_blocks("cuda")
    assert gpu - cpu == (r * c - 256 * 8192) * 6 + (r - 256) * hidden * 6
    assert loss_mod.transient_bytes(10, hidden, vocab, 2, False, 1024, device="cuda") == \
        loss_mod.transient_bytes(10, hidden, vocab, 2, False, 1024)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_on_cuda_with_gpu_blocks_matches_dense_cross_entropy(dtype):
    """On CUDA with its own (larger) blocks: several row blocks and vocabulary slices, the last of
    each ragged; loss and gradient against a dense fp32 log-softmax of the same logits."""
    torch.manual_seed(0)
    r, c = loss_mod.head_blocks("cuda")
    n, hidden, vocab = r + 37, 64, 2 * c + 123
    weight = (torch.randn(vocab, hidden, device="cuda") * 0.05).to(dtype)
    h = torch.randn(n, hidden, device="cuda").to(dtype).requires_grad_(True)
    y = torch.randint(0, vocab, (n,), device="cuda")
    fused = loss_mod.LinearCrossEntropySum.apply(h, weight, y, True).sum()
    (g_fused,) = torch.autograd.grad(fused, h)
    hr = h.detach().float().requires_grad_(True)
    ref = torch.nn.functional.cross_entropy((hr.to(dtype) @ weight.t()).float(), y, reduction="sum")
    (g_ref,) = torch.autograd.grad(ref, hr)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(fused, ref, rtol=tol, atol=tol * n)
    torch.testing.assert_close(g_fused.float(), g_ref, rtol=tol, atol=tol)
