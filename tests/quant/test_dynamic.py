"""8-bit dynamic blockwise quantization: byte-exact parity with bitsandbytes' CPU backend."""

import pytest
import torch

from lorakit.quant.dynamic import create_dynamic_map, dequantize_blockwise, quantize_blockwise

bnbF = pytest.importorskip("bitsandbytes.functional")


def _bnb_quantize(x, code, blocksize):
    # bnb returns (codes, QuantState); pass a copy of the code so bnb cannot alias ours.
    q, state = bnbF.quantize_blockwise(x, code=code.clone(), blocksize=blocksize)
    return q, state.absmax


def _bnb_dequantize(q, absmax, code, blocksize, dtype):
    return torch.ops.bitsandbytes.dequantize_blockwise.default(q, absmax, code.clone(), blocksize, dtype)


@pytest.mark.parametrize("signed", [True, False])
def test_dynamic_map_equals_bnb(signed):
    ours = create_dynamic_map(signed=signed)
    ref = bnbF.create_dynamic_map(signed=signed)
    assert ours.dtype == torch.float32 and ours.shape == (256,)
    assert torch.equal(ours, ref)
    assert torch.all(ours[1:] >= ours[:-1])  # sorted: the quantizer relies on it


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("blocksize,n", [(256, 256 * 37 + 11), (64, 1001), (2048, 5000)])
def test_quantize_blockwise_byte_exact(signed, dtype, blocksize, n):
    torch.manual_seed(0)
    code = create_dynamic_map(signed=signed)
    # heavy-tailed values so every exponent level of the map is exercised
    x = torch.randn(n) * torch.rand(n) ** 4
    x = (x if signed else x.abs()).to(dtype)
    q, absmax = quantize_blockwise(x, code, blocksize)
    q_ref, absmax_ref = _bnb_quantize(x, code, blocksize)
    assert q.dtype == torch.uint8 and q.shape == x.shape
    assert absmax.dtype == torch.float32 and absmax.shape == (-(-n // blocksize),)
    assert torch.equal(absmax, absmax_ref)
    assert torch.equal(q, q_ref)
    for out_dtype in (torch.float32, torch.bfloat16, torch.float16):
        ours = dequantize_blockwise(q, absmax, code, blocksize, dtype=out_dtype)
        ref = _bnb_dequantize(q_ref, absmax_ref, code, blocksize, out_dtype)
        assert ours.dtype == out_dtype and ours.shape == x.shape
        assert torch.equal(ours, ref)


def test_grid_boundary_values_byte_exact():
    """Values straddling bitsandbytes' 65536-point rounding grid, where an off-by-one in
    the grid index computation would change the code."""
    k = torch.arange(1, 65536, dtype=torch.float64)
    centre = ((k - 0.5) / 65535 * 2 - 1).float()  # [65535] exact half-grid points
    up, down, vals = centre, centre, [centre]
    for _ in range(2):
        up = torch.nextafter(up, torch.tensor(2.0))
        down = torch.nextafter(down, torch.tensor(-2.0))
        vals += [up, down]
    x = torch.cat(vals).clamp(-1, 1)
    n_blocks = -(-x.numel() // 255)
    x = torch.nn.functional.pad(x, (0, n_blocks * 255 - x.numel())).view(n_blocks, 255)
    x = torch.cat([x, torch.ones(n_blocks, 1)], dim=1).reshape(-1)  # absmax 1 -> normed == x
    for signed in (True, False):
        code = create_dynamic_map(signed=signed)
        xs = x if signed else x.abs()
        assert torch.equal(quantize_blockwise(xs, code, 256)[0], _bnb_quantize(xs, code, 256)[0])


def test_zero_block_and_shapes():
    code = create_dynamic_map()
    x = torch.zeros(3, 200)
    x[2, 150] = -2.5
    q, absmax = quantize_blockwise(x, code, 256)
    q_ref, absmax_ref = _bnb_quantize(x, code, 256)
    assert torch.equal(q, q_ref) and torch.equal(absmax, absmax_ref)
    assert absmax[0].item() == 0.0 and absmax[2].item() == 2.5
    deq = dequantize_blockwise(q, absmax, code, 256)
    assert deq.shape == (3, 200)
    assert torch.equal(deq.reshape(-1)[:512], torch.zeros(512))  # all-zero blocks stay exactly 0
    # -absmax maps to the most negative code, -0.99297 in the signed map
    assert deq[2, 150].item() == pytest.approx(code[0].item() * 2.5)


def test_roundtrip_error_bounded():
    torch.manual_seed(1)
    code = create_dynamic_map()
    x = torch.randn(64, 256)
    q, absmax = quantize_blockwise(x, code, 256)
    deq = dequantize_blockwise(q, absmax, code, 256)
    # largest gap of the signed map near 1.0 is ~0.0141; half of it is the max normalised error
    assert ((deq - x).abs() / absmax.repeat_interleave(256).view(64, 256)).max() < 0.0075
