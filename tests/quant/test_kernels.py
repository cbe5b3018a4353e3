"""Fast CPU 4-bit kernels (lorakit.quant.kernels) against the plain-PyTorch reference: bit for bit.
The Triton (CUDA) kernels have their own file, test_triton_kernels.py."""

import warnings

import pytest
import torch

from lorakit.quant import Linear4bit, kernels, nf4
from lorakit.quant.kernels import cpu

DTYPES = (torch.bfloat16, torch.float32, torch.float16)


def _c_kernels_or_skip():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if cpu.load() is None:
            pytest.skip("no working C compiler: the C kernels are unavailable (the reference is used)")


def _bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bits, so equality also distinguishes -0.0 / +0.0 and NaN payloads."""
    return t.view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _weights(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    w.view(-1)[:64] = 0.0  # one all-zero block (absmax 0)
    w.view(-1)[64:128] *= 1e4  # a block of large values
    return w.to(dtype)


def _cpu_kernels(op):
    return [k.name for k in kernels.kernels(op) if "cpu" in k.devices]


@pytest.fixture(autouse=True)
def _auto_backend():
    kernels.set_backend(None)
    yield
    kernels.set_backend(None)


@pytest.mark.parametrize("name", _cpu_kernels("dequantize_4bit"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((96, 130), 64), ((40, 96), 32), ((3, 1000), 128), ((2, 4100), 4096)])
def test_dequantize_bit_exact(name, quant_type, double_quant, shape, blocksize):
    _c_kernels_or_skip()
    kernel = next(k for k in kernels.kernels("dequantize_4bit") if k.name == name)
    torch.manual_seed(0)
    for src_dtype in DTYPES:
        packed, state = nf4.quantize_4bit_reference(_weights(shape, src_dtype), quant_type, blocksize, double_quant)
        for dtype in DTYPES + (None,):
            ref = nf4.dequantize_4bit_reference(packed, state, dtype)
            out = kernel.fn(packed, state, dtype)
            assert out is not None, "the kernel declined a CPU input it supports"
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert torch.equal(_bits(out), _bits(ref)), (src_dtype, dtype)


@pytest.mark.parametrize("name", _cpu_kernels("quantize_4bit"))
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((96, 130), 64), ((7, 9), 64), ((1, 33 * 64 + 3), 32), ((2, 4100), 4096)])
def test_quantize_byte_exact(name, quant_type, double_quant, shape, blocksize):
    _c_kernels_or_skip()
    kernel = next(k for k in kernels.kernels("quantize_4bit") if k.name == name)
    for dtype in DTYPES:
        w = _weights(shape, dtype, seed=1)
        p_ref, s_ref = nf4.quantize_4bit_reference(w, quant_type, blocksize, double_quant)
        out = kernel.fn(w, quant_type, blocksize, double_quant)
        assert out is not None
        p, s = out
        assert p.dtype == torch.uint8 and torch.equal(p, p_ref), dtype
        assert s.metadata() == s_ref.metadata()
        for key, value in s_ref.tensors().items():
            assert torch.equal(_bits(s.tensors()[key]) if value.is_floating_point() else s.tensors()[key],
                               _bits(value) if value.is_floating_point() else value), key


def test_quantize_ties_and_partial_zero_tail():
    """Exact midpoints between code values go to the lower index; an all-zero partial last block
    stores absmax 1e-38 (bitsandbytes' clamp); full blocks scale by x * (1 / absmax)."""
    _c_kernels_or_skip()
    for quant_type in ("nf4", "fp4"):
        midpoints, _ = nf4.code_midpoints(nf4.get_code(quant_type))
        block = torch.cat([torch.tensor([1.0]), midpoints, -midpoints, torch.zeros(64 - 31)])  # [64], absmax 1
        x = torch.cat([block, block * 0.37, torch.zeros(10)])  # two full blocks + a zero tail of 10
        p_ref, s_ref = nf4.quantize_4bit_reference(x, quant_type, 64, False)
        p, s = cpu.quantize_4bit(x, quant_type, 64, False)
        assert torch.equal(p, p_ref) and torch.equal(_bits(s.absmax), _bits(s_ref.absmax))
        assert s.absmax[-1] == torch.tensor(1e-38, dtype=torch.float32)


@pytest.mark.parametrize("threads", [1, 2])
def test_threaded_kernels_match(threads):
    """Large enough to run the OpenMP loops (more than 1024 blocks) with 1 and 2 threads."""
    _c_kernels_or_skip()
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        w = _weights((512, 576), torch.bfloat16, seed=2)  # 4608 blocks of 64
        p_ref, s_ref = nf4.quantize_4bit_reference(w, "nf4", 64, True)
        p, s = cpu.quantize_4bit(w, "nf4", 64, True)
        assert torch.equal(p, p_ref)
        assert torch.equal(_bits(cpu.dequantize_4bit(p, s, torch.bfloat16)),
                           _bits(nf4.dequantize_4bit_reference(p_ref, s_ref, torch.bfloat16)))
    finally:
        torch.set_num_threads(before)


def test_public_functions_dispatch_and_reference_backend(monkeypatch):
    _c_kernels_or_skip()
    w = _weights((64, 128), torch.bfloat16)
    calls = []
    original = cpu.dequantize_4bit
    spy = kernels.Kernel("dequantize_4bit", "spy", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    monkeypatch.setitem(kernels._REGISTRY, "dequantize_4bit", [spy])
    packed, state = nf4.quantize_4bit(w)
    fast = nf4.dequantize_4bit(packed, state)
    assert calls == [1]
    kernels.set_backend("reference")
    slow = nf4.dequantize_4bit(packed, state)
    assert calls == [1]  # the reference backend never calls a kernel
    assert torch.equal(_bits(fast), _bits(slow))
    kernels.set_backend(None)
    monkeypatch.setenv("LORAKIT_KERNELS", "reference")
    nf4.dequantize_4bit(packed, state)
    assert calls == [1]
    monkeypatch.setenv("LORAKIT_KERNELS", "fastest")
    with pytest.raises(ValueError, match="LORAKIT_KERNELS='fastest'.*auto.*reference"):
        nf4.dequantize_4bit(packed, state)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_dequantize_into_out_buffer(backend):
    """dequantize_4bit(..., out=buf) writes the same bits into buf (a reused buffer) and returns a
    view of it, for every dtype and both backends; a buffer of the wrong dtype or size is refused."""
    if backend == "auto":
        _c_kernels_or_skip()
    kernels.set_backend(backend)
    packed, state = nf4.quantize_4bit_reference(_weights((48, 128), torch.bfloat16), "nf4", 64, True)
    for dtype in DTYPES:
        buf = torch.full((48 * 128,), float("nan"), dtype=dtype)
        got = nf4.dequantize_4bit(packed, state, dtype, out=buf)
        assert got.data_ptr() == buf.data_ptr() and got.shape == (48, 128)
        assert torch.equal(_bits(got), _bits(nf4.dequantize_4bit_reference(packed, state, dtype)))
    with pytest.raises(ValueError, match="out must be a contiguous torch.bfloat16 tensor of 6144"):
        nf4.dequantize_4bit(packed, state, torch.bfloat16, out=torch.empty(6144, dtype=torch.float32))
    with pytest.raises(ValueError, match="6144 elements"):
        nf4.dequantize_4bit(packed, state, torch.bfloat16, out=torch.empty(100, dtype=torch.bfloat16))


def test_kernel_declines_unsupported_input():
    """An odd element count is not handled by the C dequantizer: it returns None and the public
    function still answers through the reference."""
    _c_kernels_or_skip()
    x = torch.randn(3, 67)
    packed, state = nf4.quantize_4bit(x, "nf4", 64, True)
    assert cpu.dequantize_4bit(packed, state, torch.float32) is None
    assert torch.equal(nf4.dequantize_4bit(packed, state), nf4.dequantize_4bit_reference(packed, state))


def test_linear4bit_forward_backward_same_with_and_without_kernels():
    _c_kernels_or_skip()
    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 96)
    x = torch.randn(2, 5, 128)
    results = []
    for backend in ("auto", "reference"):
        kernels.set_backend(backend)
        layer = Linear4bit.from_linear(lin, compute_dtype=torch.bfloat16)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        y.float().pow(2).sum().backward()
        results.append((layer.weight_packed.clone(), y.detach(), xi.grad))
    (p1, y1, g1), (p2, y2, g2) = results
    assert torch.equal(p1, p2) and torch.equal(y1, y2) and torch.equal(g1, g2)


def test_missing_compiler_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    monkeypatch.setattr(cpu, "_state", {})
    w = torch.randn(32, 64)
    with pytest.warns(RuntimeWarning, match="no C compiler found.*LORAKIT_KERNELS=reference"):
        packed, state = nf4.quantize_4bit(w)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        out = nf4.dequantize_4bit(packed, state)
    p_ref, s_ref = nf4.quantize_4bit_reference(w)
    assert torch.equal(packed, p_ref) and torch.equal(out, nf4.dequantize_4bit_reference(p_ref, s_ref))


def test_registry_rejects_bad_names():
    with pytest.raises(ValueError, match="kernel op must be one of"):
        kernels.register("matmul", "x", lambda: None)
    with pytest.raises(ValueError, match="already registered"):
        kernels.register("dequantize_4bit", "c-cpu", lambda: None)
    with pytest.raises(ValueError, match="must be one of \\('auto', 'reference'\\)"):
        kernels.set_backend("triton")


def test_missing_compiler_warning_names_what_to_install(monkeypatch):
    monkeypatch.setattr(cpu, "_compiler", lambda: None)
    monkeypatch.setattr(cpu, "_state", {})
    real = cpu.install_hint
    monkeypatch.setattr(cpu, "install_hint", lambda: real("Linux"))
    with pytest.warns(RuntimeWarning, match=r"sudo apt-get install gcc \(Debian/Ubuntu\)"):
        cpu.load()
    assert "xcode-select --install" in real("Darwin")
    assert "WSL2" in real("Windows")
