"""Linear4bit: forward/backward math, saved tensors, state_dict round trip, QuantState I/O."""

import pytest
import torch
from torch import nn

from lorakit.quant import Linear4bit, QuantState, dequantize_4bit, quantize_4bit


def _layer(compute_dtype=torch.float32, double_quant=True, quant_type="nf4", bias=True, out=48, inp=96):
    torch.manual_seed(0)
    lin = nn.Linear(inp, out, bias=bias)
    return lin, Linear4bit.from_linear(
        lin, quant_type=quant_type, blocksize=64, double_quant=double_quant, compute_dtype=compute_dtype
    )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_layout_matches_flat_packing(quant_type, double_quant):
    lin, q = _layer(quant_type=quant_type, double_quant=double_quant)
    packed, state = quantize_4bit(lin.weight.detach(), quant_type, 64, double_quant)
    assert q.weight_packed.dtype == torch.uint8 and q.weight_packed.shape == (48, 48)
    assert torch.equal(q.weight_packed.reshape(-1), packed.reshape(-1))  # row-major = flat bytes
    assert torch.equal(q.dequantize(torch.float32), dequantize_4bit(packed, state, torch.float32))
    assert not q.bias.requires_grad and q.bias.dtype == torch.float32
    assert list(q.parameters()) == [q.bias]


@pytest.mark.parametrize("compute_dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
def test_forward_and_input_grad(compute_dtype, tol):
    lin, q = _layer(compute_dtype=compute_dtype)
    w = q.dequantize(torch.float32)  # [out, in]
    x = torch.randn(2, 5, 96)
    y = q(x)
    assert y.dtype == compute_dtype and y.shape == (2, 5, 48)
    xc = x.to(compute_dtype)
    expected = xc @ w.to(compute_dtype).t() + q.bias
    assert torch.equal(y, expected)

    # gradient vs an fp32 nn.Linear holding the dequantized weight
    ref = nn.Linear(96, 48)
    with torch.no_grad():
        ref.weight.copy_(w)
        ref.bias.copy_(q.bias.float())
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    g = torch.randn(2, 5, 48)
    (q(x1).float() * g).sum().backward()
    (ref(x2) * g).sum().backward()
    assert x1.grad.dtype == torch.float32
    err = (x1.grad - x2.grad).abs().max() / x2.grad.abs().max()
    assert err < tol, err


def test_dequantized_weight_never_saved():
    lin, q = _layer(out=64, inp=128)
    saved = []

    def pack(t):
        saved.append((t.numel(), t.dtype))
        return t

    x = torch.randn(3, 128, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
        z = (y * y).sum()  # saves y: shows the hook is live
    assert saved, "the hook saw nothing: the check would be vacuous"
    big_float = [s for s in saved if s[0] >= 64 * 128 and s[1].is_floating_point]
    assert big_float == []
    assert saved == [(3 * 64, torch.float32)] * 2  # only y (twice, by mul): the 4-bit layer saves nothing
    z.backward()
    assert x.grad is not None and x.grad.shape == (3, 128)


@pytest.mark.parametrize("double_quant", [False, True])
def test_state_dict_round_trip(double_quant):
    lin, q = _layer(compute_dtype=torch.bfloat16, double_quant=double_quant)
    # a fresh layer with the other double-quant setting still loads the checkpoint exactly
    fresh = Linear4bit(96, 48, compute_dtype=torch.bfloat16, double_quant=not double_quant)
    result = fresh.load_state_dict(q.state_dict())
    assert not result.missing_keys and not result.unexpected_keys
    for k, v in q.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
    assert fresh.double_quant == double_quant
    x = torch.randn(4, 96)
    assert torch.equal(fresh(x), q(x))
    assert fresh.nbytes_weight() == q.nbytes_weight()


def test_to_dtype_keeps_quant_buffers_exact():
    lin, q = _layer()
    before = {k: v.clone() for k, v in q.state_dict().items() if k != "bias"}
    q.to(torch.float16)
    for k, v in before.items():
        assert torch.equal(q.state_dict()[k], v), k  # dtype and values unchanged
    assert q.bias.dtype == torch.float16


def test_no_bias_and_errors():
    lin, q = _layer(bias=False)
    assert q.bias is None and "bias=False" in repr(q)
    assert torch.equal(q(torch.ones(1, 96)), torch.ones(1, 96) @ q.dequantize(torch.float32).t())
    with pytest.raises(ValueError, match="even in_features"):
        Linear4bit(7, 4)
    with pytest.raises(ValueError, match="blocksize must be one of"):
        Linear4bit(8, 4, blocksize=100)


def test_nbytes_weight_counts_stored_tensors():
    lin, q = _layer(double_quant=False)
    expected = sum(v.numel() * v.element_size() for k, v in q.state_dict().items() if k != "bias")
    assert q.nbytes_weight() == expected


@pytest.mark.parametrize("double_quant", [False, True])
def test_quant_state_safetensors_round_trip(tmp_path, double_quant):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(3)
    x = torch.randn(300, 70, dtype=torch.bfloat16)
    packed, state = quantize_4bit(x, "nf4", 128, double_quant)
    tensors = state.to_dict(prefix="layer.weight.")
    tensors["layer.weight"] = packed
    save_file(tensors, str(tmp_path / "q.safetensors"))
    loaded = load_file(str(tmp_path / "q.safetensors"))
    state2 = QuantState.from_dict(loaded, prefix="layer.weight.")
    assert state2.shape == x.shape and state2.dtype == torch.bfloat16 and state2.nested == double_quant
    assert state2.blocksize == 128 and state2.quant_type == "nf4"
    assert state2.nbytes() == state.nbytes()
    assert torch.equal(dequantize_4bit(loaded["layer.weight"], state2), dequantize_4bit(packed, state))


def test_stacked_layers_share_scratch_buffer_correctly():
    """Linear4bit rebuilds each weight in one reused per-thread buffer. A chain of layers of
    different sizes (the buffer is reused and grown between them, in forward and in backward)
    must give the outputs and input gradient of plain fp32 Linears holding the same weights, and
    no output may alias the buffer (an earlier output must survive the later layers)."""
    torch.manual_seed(0)
    sizes = [64, 256, 32, 128]
    quant = [Linear4bit.from_linear(nn.Linear(a, b), compute_dtype=torch.float32) for a, b in zip(sizes, sizes[1:])]
    dense = []
    for q in quant:
        lin = nn.Linear(q.in_features, q.out_features)
        with torch.no_grad():
            lin.weight.copy_(q.dequantize(torch.float32))
            lin.bias.copy_(q.bias)
        dense.append(lin)
    x1 = torch.randn(4, 64, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    h1, h2, outs = x1, x2, []
    for q, lin in zip(quant, dense):
        h1, h2 = q(h1), lin(h2)
        outs.append((h1, h1.detach().clone()))
    for live, copy in outs:
        assert torch.equal(live, copy)
    torch.testing.assert_close(h1, h2, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(h1)
    (h1 * g).sum().backward()
    (h2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-5, atol=1e-6)


def _spy_dispatch(monkeypatch):
    from lorakit.quant import kernels

    calls = []
    real = kernels.dispatch
    monkeypatch.setattr(kernels, "dispatch", lambda op, *a, **k: calls.append(op) or real(op, *a, **k))
    return calls


def test_cpu_forward_never_asks_for_the_fused_matvec(monkeypatch):
    """On the CPU a Linear4bit always dequantizes into its scratch buffer and multiplies (the C
    kernel path is unchanged); the fused 4-bit matrix-vector kernel is for GPUs."""
    from lorakit.quant import linear4bit

    calls = _spy_dispatch(monkeypatch)
    _, q = _layer(compute_dtype=torch.bfloat16)
    q(torch.randn(1, 96))
    assert "gemv_4bit" not in calls and calls.count("dequantize_4bit") == 1
    assert linear4bit._scratch.buffers  # the CPU scratch was used


@pytest.mark.gpu
def test_cuda_forward_backward_on_a_side_stream_without_cpu_scratch(monkeypatch):
    """On CUDA the dequantized weight comes from the caching allocator (stream-ordered), never from
    the thread-local CPU scratch; few rows take the fused matrix-vector kernel, many rows dequantize;
    results match the CPU layer, also when forward and backward run on a non-default stream."""
    from lorakit.quant import linear4bit

    linear4bit.release_scratch()
    calls = _spy_dispatch(monkeypatch)
    lin, cpu_layer = _layer(compute_dtype=torch.bfloat16, out=128, inp=256)
    layer = Linear4bit.from_linear(lin.cuda(), blocksize=64, compute_dtype=torch.bfloat16)
    assert torch.equal(layer.weight_packed.cpu(), cpu_layer.weight_packed)
    stream = torch.cuda.Stream()
    for rows in (2, 64):
        x = torch.randn(rows, 256)
        xc = x.clone().requires_grad_(True)
        yc = cpu_layer(xc)
        yc.float().sum().backward()
        calls.clear()
        xg = x.cuda().requires_grad_(True)
        with torch.cuda.stream(stream):
            y = layer(xg)
            y.float().sum().backward()
        torch.cuda.synchronize()
        assert calls.count("dequantize_4bit") == (1 if rows <= 16 else 2)  # fused forward: only backward dequantizes
        torch.testing.assert_close(y.float().cpu(), yc.float(), rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(xg.grad.cpu(), xc.grad, rtol=2e-2, atol=2e-2)
    assert not any(device.type == "cuda" for _, device in linear4bit._scratch.buffers)
