"""The Triton 4-bit kernels (quant/kernels/triton_4bit.py via kernels/gpu.py) against the reference.

Two ways to run, one test body: "interpreter" runs the kernels on CPU tensors through Triton's
interpreter (TRITON_INTERPRET=1, which tests/conftest.py sets on machines without CUDA; CI runs
them so), "cuda" compiles them for the GPU (marked gpu). Both compare with the CPU reference:
dequantize bit for bit, quantize byte for byte, the fused matrix-vector product to rounding.
Sizes are small (the interpreter runs each program in numpy) but ragged: odd element counts,
partial last blocks, several block sizes, a row count that is not a tile's.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from lorakit.quant import Linear4bit, kernels, nf4  # noqa: E402
from lorakit.quant.kernels import gpu  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def device(request):
    if request.param == "interpreter":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("TRITON_INTERPRET=1 is not set (tests/conftest.py sets it where there is no CUDA device)")
        gpu.allow_cpu_tensors(True)
        yield torch.device("cpu")
        gpu.allow_cpu_tensors(False)
    else:
        yield torch.device("cuda")


def _bits(t):
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:64] = 0.0  # an all-zero block
    w.view(-1)[64:100] *= 1e4  # large values (fp16 output overflows to inf, in both)
    return w.to(dtype)


def _on(state, device):
    return state.to(device)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((24, 130), 64), ((3, 67), 64), ((1, 9 * 32 + 3), 32),
                                             ((2, 4100), 4096), ((5, 300), 256)])
def test_dequantize_bit_exact(device, quant_type, double_quant, shape, blocksize):
    for src in DTYPES:
        packed, state = nf4.quantize_4bit_reference(_weights(shape, src), quant_type, blocksize, double_quant)
        for dtype in DTYPES + (None,):
            ref = nf4.dequantize_4bit_reference(packed, state, dtype)
            got = gpu.dequantize_4bit(packed.to(device), _on(state, device), dtype)
            assert got is not None, "the Triton kernel declined an input it supports"
            assert got.dtype == ref.dtype and got.shape == ref.shape and got.device.type == device.type
            assert torch.equal(_bits(got.cpu()), _bits(ref)), (src, dtype)


def test_dequantize_into_out_buffer(device):
    packed, state = nf4.quantize_4bit_reference(_weights((16, 128), torch.bfloat16), "nf4", 64, True)
    for dtype in DTYPES:
        buf = torch.full((16 * 128,), float("nan"), dtype=dtype, device=device)
        got = gpu.dequantize_4bit(packed.to(device), _on(state, device), dtype, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.shape == (16, 128)
        assert torch.equal(_bits(got.cpu()), _bits(nf4.dequantize_4bit_reference(packed, state, dtype)))


def _assert_same_state(s, s_ref):
    assert s.metadata() == s_ref.metadata()
    for key, value in s_ref.tensors().items():
        mine = s.tensors()[key].cpu()
        assert torch.equal(_bits(mine) if value.is_floating_point() else mine,
                           _bits(value) if value.is_floating_point() else value), key


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((24, 130), 64), ((7, 9), 64), ((1, 9 * 32 + 3), 32),
                                             ((2, 4100), 4096), ((3, 1000), 128)])
def test_quantize_byte_exact(device, quant_type, double_quant, shape, blocksize):
    """The bytes of the CPU reference, also on a GPU (the double-quant offset is a CPU mean)."""
    for dtype in DTYPES:
        w = _weights(shape, dtype, seed=1)
        p_ref, s_ref = nf4.quantize_4bit_reference(w, quant_type, blocksize, double_quant)
        out = gpu.quantize_4bit(w.to(device), quant_type, blocksize, double_quant)
        assert out is not None
        p, s = out
        assert p.dtype == torch.uint8 and p.shape == p_ref.shape and torch.equal(p.cpu(), p_ref), dtype
        _assert_same_state(s, s_ref)


def test_quantize_ties_and_partial_zero_tail(device):
    """Exact midpoints between code values go to the lower index; an all-zero partial last block
    stores absmax 1e-38; full blocks scale by x * (1 / absmax), the partial one by x / absmax."""
    for quant_type in ("nf4", "fp4"):
        midpoints, _ = nf4.code_midpoints(nf4.get_code(quant_type))
        block = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 31)])  # [64], absmax 1
        x = torch.cat([block, block * 0.37, block[:40] * 3.1, torch.zeros(10)])  # + a partial block + zeros
        for tail in (x, torch.cat([block, torch.zeros(10)])):
            p_ref, s_ref = nf4.quantize_4bit_reference(tail, quant_type, 64, False)
            p, s = gpu.quantize_4bit(tail.to(device), quant_type, 64, False)
            assert torch.equal(p.cpu(), p_ref) and torch.equal(_bits(s.absmax.cpu()), _bits(s_ref.absmax))


def _gemv_expected(x, packed, state):
    """fp64 sum of x times W rounded to x's dtype (what the dense path multiplies), then x's dtype."""
    w = nf4.dequantize_4bit_reference(packed, state, x.dtype).double()
    return (x.double() @ w.t()).to(x.dtype)


@pytest.mark.parametrize("quant_type,double_quant", [("nf4", True), ("fp4", False)])
@pytest.mark.parametrize("rows", [1, 3, 16])
@pytest.mark.parametrize("out_features,in_features,blocksize", [(40, 320, 64), (16, 512, 512), (33, 96, 32)])
def test_gemv_matches_reference(device, quant_type, double_quant, rows, out_features, in_features, blocksize):
    g = torch.Generator().manual_seed(rows)
    w = torch.randn(out_features, in_features, generator=g) * 0.05
    packed, state = nf4.quantize_4bit_reference(w, quant_type, blocksize, double_quant)
    for dtype in DTYPES:
        x = torch.randn(rows, in_features, generator=g).to(dtype)
        got = gpu.gemv_4bit(x.to(device), packed.to(device), _on(state, device))
        assert got is not None and got.dtype == dtype and got.shape == (rows, out_features)
        want = _gemv_expected(x, packed, state)
        tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
        torch.testing.assert_close(got.cpu().float(), want.float(), rtol=tol, atol=tol)
        ref = nf4.gemv_4bit_reference(x, packed, state)  # the definition, dense
        torch.testing.assert_close(got.cpu().float(), ref.float(), rtol=2 * tol, atol=2 * tol)


def test_gemv_keeps_leading_dims_and_declines_what_it_does_not_take(device):
    w = torch.randn(32, 128) * 0.05
    packed, state = nf4.quantize_4bit_reference(w, "nf4", 64, True)
    packed, state = packed.to(device), _on(state, device)
    x = torch.randn(1, 2, 128, device=device, dtype=torch.bfloat16)
    assert gpu.gemv_4bit(x, packed, state).shape == (1, 2, 32)
    assert gpu.gemv_4bit(torch.randn(gpu.GEMV_MAX_ROWS + 1, 128, device=device), packed, state) is None
    p2, s2 = nf4.quantize_4bit_reference(torch.randn(8, 96), "nf4", 64, True)  # 96 % 64 != 0
    assert gpu.gemv_4bit(torch.randn(1, 96, device=device), p2.to(device), _on(s2, device)) is None


def test_linear4bit_on_device_forward_backward(device):
    """Linear4bit with the Triton kernels: forward of few rows (fused matrix-vector product on CUDA),
    of many rows (dequantize + matmul), and backward; against the same layer on the CPU reference."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48)
    ref_layer = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
    layer = Linear4bit.from_linear(lin.to(device), compute_dtype=torch.bfloat16)
    assert torch.equal(layer.weight_packed.cpu(), ref_layer.weight_packed)
    assert torch.equal(_bits(layer.dequantize().cpu()), _bits(ref_layer.dequantize()))
    for rows in (1, 40):
        x = torch.randn(rows, 128)
        xd = x.detach().to(device).clone().requires_grad_(True)
        xr = x.detach().clone().requires_grad_(True)
        with kernels_backend("reference"):
            yr = ref_layer(xr)
        y = layer(xd)
        torch.testing.assert_close(y.float().cpu(), yr.float(), rtol=1e-2, atol=1e-2)
        g = torch.randn_like(yr)
        y.backward(g.to(device))
        with kernels_backend("reference"):
            yr.backward(g)
        torch.testing.assert_close(xd.grad.cpu(), xr.grad, rtol=1e-2, atol=1e-2)


class kernels_backend:
    def __init__(self, name):
        self.name = name

    def __enter__(self):
        self.before = kernels.backend_override()
        kernels.set_backend(self.name)

    def __exit__(self, *exc):
        kernels.set_backend(self.before)


def test_cpu_tensors_are_declined_outside_tests(monkeypatch):
    """In a normal run the Triton kernels never take CPU tensors (the C kernels do), also with
    TRITON_INTERPRET=1 unless a test turned the switch on."""
    packed, state = nf4.quantize_4bit_reference(torch.randn(8, 64), "nf4", 64, True)
    gpu.allow_cpu_tensors(False)
    assert gpu.dequantize_4bit(packed, state, torch.bfloat16) is None
    assert gpu.quantize_4bit(torch.randn(8, 64), "nf4", 64, True) is None
    assert gpu.gemv_4bit(torch.randn(1, 64), packed, state) is None
    gpu.allow_cpu_tensors(True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    try:
        assert gpu.dequantize_4bit(packed, state, torch.bfloat16) is None
    finally:
        gpu.allow_cpu_tensors(False)


def test_registry_lists_triton_for_cuda_only():
    names = {op: [(k.name, k.devices) for k in kernels.kernels(op)] for op in kernels.OPS}
    assert ("triton", ("cuda",)) in names["dequantize_4bit"] and ("triton", ("cuda",)) in names["quantize_4bit"]
    assert names["gemv_4bit"] == [("triton", ("cuda",))]
    assert kernels.fast_kernel("dequantize_4bit", "cuda") == "triton"  # triton is importable here
    kernels.set_backend("reference")
    try:
        assert kernels.fast_kernel("dequantize_4bit", "cuda") is None
    finally:
        kernels.set_backend(None)
