"""NF4 / FP4 4-bit quantization: byte-exact parity with bitsandbytes.functional (CPU)."""

import pytest
import torch

from lorakit.quant.nf4 import FP4_CODE, NF4_CODE, dequantize_4bit, quantize_4bit

bnbF = pytest.importorskip("bitsandbytes.functional")

SHAPES = [(4096,), (1001,), (7, 100), (33, 33), (128, 256), (3, 5, 64), (5, 96)]


@pytest.fixture(autouse=True)
def _eager_bnb():
    # bnb's fallback dequantize (odd shapes) is wrapped in torch.compile; run it eagerly (same
    # arithmetic) so the test does not spend its time compiling.
    with torch.compiler.set_stance("force_eager"):
        yield


def _bnb_dequantize(packed, state, shape, blocksize):
    # bnb's AVX-512 CPU kernel mis-indexes absmax for 2-D shapes whose last dim is a multiple
    # of 16 but not of the blocksize (e.g. (5, 96) at blocksize 64); its flat 1-D path is
    # correct, so compare against that there. It also returns [1, n] for 1-D input.
    if len(shape) > 1 and shape[-1] % 16 == 0 and shape[-1] % blocksize != 0:
        state.shape = torch.Size([state.shape.numel()])
    return bnbF.dequantize_4bit(packed, state).reshape(shape)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("blocksize", [64, 128, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_byte_exact_vs_bnb(quant_type, double_quant, blocksize, dtype):
    torch.manual_seed(0)
    for shape in SHAPES:
        x = (torch.randn(shape) * 0.02).to(dtype)
        packed, state = quantize_4bit(x, quant_type, blocksize, double_quant)
        ref_packed, ref_state = bnbF.quantize_4bit(
            x, blocksize=blocksize, quant_type=quant_type, compress_statistics=double_quant
        )
        n = x.numel()
        assert packed.dtype == torch.uint8 and packed.shape == ((n + 1) // 2, 1)
        assert torch.equal(packed, ref_packed), shape
        assert torch.equal(state.absmax, ref_state.absmax), shape
        assert torch.equal(state.code, ref_state.code)
        assert state.nested == double_quant
        if double_quant:
            assert state.absmax.dtype == torch.uint8
            assert torch.equal(state.offset, ref_state.offset)
            assert torch.equal(state.absmax2, ref_state.state2.absmax)
            assert torch.equal(state.code2, ref_state.state2.code)
            assert state.blocksize2 == ref_state.state2.blocksize == 256
        deq = dequantize_4bit(packed, state)
        assert deq.dtype == dtype and deq.shape == x.shape
        assert torch.equal(deq, _bnb_dequantize(ref_packed, ref_state, shape, blocksize)), shape


def test_other_blocksizes_and_partial_zero_tail():
    torch.manual_seed(1)
    x = torch.randn(3 * 4096 + 70)
    x[-70:] = 0.0  # all-zero partial last block (bnb clamps its absmax to 1e-38)
    for blocksize in (32, 512, 4096):
        for quant_type in ("nf4", "fp4"):
            packed, state = quantize_4bit(x, quant_type, blocksize, double_quant=False)
            ref_packed, ref_state = bnbF.quantize_4bit(x, blocksize=blocksize, quant_type=quant_type)
            assert torch.equal(packed, ref_packed) and torch.equal(state.absmax, ref_state.absmax)
            assert torch.equal(dequantize_4bit(packed, state)[-70:], torch.zeros(70))


def test_code_tables_match_bnb():
    assert torch.equal(NF4_CODE, bnbF.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(FP4_CODE, bnbF.get_4bit_type("fp4", device="cpu"))


def test_bit_layout_high_nibble_first():
    # [-a, +a, 0, +a]: NF4 indices 0, 15, 7, 15 -> bytes 0x0F, 0x7F
    x = torch.tensor([-2.0, 2.0, 0.0, 2.0])
    packed, state = quantize_4bit(x, "nf4", 64, double_quant=False)
    assert packed.reshape(-1).tolist() == [0x0F, 0x7F]
    assert state.absmax.tolist() == [2.0]
    assert torch.equal(dequantize_4bit(packed, state), x)


def test_odd_numel_and_dtype_override():
    torch.manual_seed(2)
    x = torch.randn(3, 7, dtype=torch.bfloat16)  # 21 values: last byte has a padding nibble
    packed, state = quantize_4bit(x, "nf4", 64, double_quant=True)
    assert packed.shape == (11, 1)
    assert (packed.reshape(-1)[-1] & 0xF).item() == 7  # padding encodes 0.0 (NF4 index 7)
    deq32 = dequantize_4bit(packed, state, dtype=torch.float32)
    assert deq32.dtype == torch.float32 and deq32.shape == (3, 7)
    assert torch.equal(deq32.to(torch.bfloat16), dequantize_4bit(packed, state))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(blocksize=48), r"blocksize must be one of \(32, 64, 128, 256, 512, 1024, 2048, 4096\)"),
        (dict(blocksize=8192), "blocksize must be one of"),
        (dict(quant_type="int4"), r"quant_type must be one of \('nf4', 'fp4'\)"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quantize_4bit(torch.randn(128), **kwargs)


def test_rejects_integer_tensor():
    with pytest.raises(ValueError, match="dtype must be one of"):
        quantize_4bit(torch.ones(64, dtype=torch.int32))


def _dequantize_direct(packed, state, dtype=None):
    """The original formulation of the reference, kept as its oracle: unpack both nibbles to int64
    indices, gather the code values, zero-pad to whole blocks, multiply by the block absmax in fp32,
    slice, cast."""
    from lorakit.quant.nf4 import block_absmax, unpack_nibbles

    n = state.numel
    absmax = block_absmax(state)
    values = state.code.float()[unpack_nibbles(packed, n)]
    values = torch.nn.functional.pad(values, (0, absmax.numel() * state.blocksize - n))
    out = values.view(absmax.numel(), state.blocksize) * absmax[:, None]
    return out.reshape(-1)[:n].view(state.shape).to(dtype or state.dtype)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("shape,blocksize", [((96, 130), 64), ((3, 67), 64), ((1, 33 * 64 + 3), 32),
                                             ((2, 4100), 4096), ((300, 1100), 128), ((7,), 256)])
def test_reference_dequantize_equals_direct_formulation(quant_type, double_quant, shape, blocksize, monkeypatch):
    """dequantize_4bit_reference (byte table, chunked, torch.mul into the output dtype) gives the bits
    of the direct formulation, for every output dtype, odd sizes, partial blocks, several chunks
    (the chunk is shrunk so that (300, 1100) takes several), and with out= (a reused buffer)."""
    from lorakit.quant import nf4

    monkeypatch.setattr(nf4, "DEQUANT_CHUNK_WEIGHTS", 4096)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 0.05
    w.view(-1)[:blocksize] = 0.0  # an all-zero block
    w.view(-1)[-5:] *= 1e4  # large values in the last block (fp16 overflows to inf in both)
    bits = {2: torch.int16, 4: torch.int32}
    for src in (torch.float32, torch.bfloat16, torch.float16):
        packed, state = nf4.quantize_4bit_reference(w.to(src), quant_type, blocksize, double_quant)
        for dtype in (torch.bfloat16, torch.float16, torch.float32, None):
            want = _dequantize_direct(packed, state, dtype)
            got = nf4.dequantize_4bit_reference(packed, state, dtype)
            assert got.dtype == want.dtype and got.shape == want.shape
            view = bits[want.element_size()]
            assert torch.equal(got.view(view), want.view(view)), (src, dtype)
            buf = torch.full((state.numel,), float("nan"), dtype=want.dtype)
            into = nf4.dequantize_4bit_reference(packed, state, dtype, out=buf)
            assert into.data_ptr() == buf.data_ptr() and torch.equal(into.view(view), want.view(view))


def test_reference_dequantize_rounds_once_on_ties():
    """fp32 products that lie exactly halfway between two bf16 / fp16 values round to even, as
    .to(dtype) does (torch.mul(..., out=) must round once, not truncate): a code table of exact ties
    for each target dtype, absmax 1 and 2 (products stay ties)."""
    from lorakit.quant import nf4
    from lorakit.quant.state import QuantState

    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 16, (4096,), generator=g)
    packed = ((idx[0::2] << 4) | idx[1::2]).to(torch.uint8)[:, None]
    absmax = torch.tensor([1.0, 2.0]).repeat(32)  # [64 blocks]
    mantissa = torch.randint(0, 2**7, (16,), generator=g, dtype=torch.int32)
    ties = {torch.bfloat16: ((127 - 3) << 23) | (mantissa << 16) | 0x8000,  # halfway between bf16 values
            torch.float16: ((127 - 3) << 23) | (mantissa << 13) | 0x1000}   # halfway between fp16 values
    for dtype, bits in ties.items():
        code = torch.where(torch.arange(16) % 2 == 0, bits.view(torch.float32), -bits.view(torch.float32))
        state = QuantState(torch.Size([4096]), torch.float32, 64, "nf4", absmax, code)
        want = (code[idx].view(64, 64) * absmax[:, None]).reshape(-1).to(dtype)
        got = nf4.dequantize_4bit_reference(packed, state, dtype)
        assert torch.equal(got.view(torch.int16), want.view(torch.int16)), dtype
