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
