"""lorakit's vectorised K-quants (export/kquants.py) against gguf-py's decoder, ggml's reference
algorithm (transliterated loop for loop in kquant_reference.py) and, when llama-cpp-python is
installed, libggml's own quantizer."""

import ctypes
import os

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize

from lorakit.export import kquants

import kquant_reference

QTYPES = ["Q4_K", "Q5_K", "Q6_K"]
GGML_TYPE = {q: getattr(gguf.GGMLQuantizationType, q) for q in QTYPES}


def weights(rows=16, cols=512, seed=0):
    """Gaussian weights with the features that trip quantizers: outlier columns, an all-zero row,
    a row of tiny values, a constant row, a positive-only row."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[:, :5] *= 25
    w[1] = 0
    w[2] = torch.randn(cols, generator=g) * 1e-6
    w[3] = 0.01
    w[4] = w[4].abs()
    return w


def mse(data, qtype, w):
    return float(((gguf_dequantize(np.asarray(data), GGML_TYPE[qtype]).reshape(w.shape) - w.numpy()) ** 2).mean())


@pytest.mark.parametrize("qtype", QTYPES)
def test_layout_decodes_with_gguf_py_and_the_torch_decoder(qtype):
    w = weights()
    q = kquants.quantize(w, qtype)
    assert q.dtype == torch.uint8 and q.shape == (16, 512 // 256 * kquants.BLOCK_BYTES[qtype])
    ref = torch.from_numpy(gguf_dequantize(q.numpy(), GGML_TYPE[qtype]).reshape(w.shape))
    assert torch.equal(kquants.dequantize(q, qtype, w.shape), ref)
    assert torch.equal(ref[1], torch.zeros(512))  # an all-zero row stays exactly zero
    # relative RMS error on Gaussian weights: ~2^-bits (measured 0.072 / 0.036 / 0.018)
    g = torch.randn(64, 1024, generator=torch.Generator().manual_seed(5))
    rel = mse(kquants.quantize(g, qtype).numpy(), qtype, g) ** 0.5 / float(g.std())
    assert rel <= {"Q4_K": 0.075, "Q5_K": 0.038, "Q6_K": 0.019}[qtype]


@pytest.mark.parametrize("qtype", QTYPES)
def test_matches_ggml_reference_algorithm(qtype):
    """The slow transliteration of ggml's C gives the reference bytes; the vectorised version sums in
    another order, so a few sub-block scales land one 6-bit step apart: its error must be close to
    of the reference's (3% on this small sample) and many super-blocks byte-identical."""
    w = weights(rows=6, cols=512, seed=1)
    ref = kquant_reference.quantize(w.numpy(), qtype)
    mine = kquants.quantize(w, qtype).reshape(ref.shape).numpy()
    same = (mine == ref).all(1).mean()
    assert same >= (0.6 if qtype == "Q6_K" else 0.2)
    assert mse(mine, qtype, w) <= 1.03 * mse(ref, qtype, w)  # 12 super-blocks: a few % of noise


def test_rows_must_be_a_multiple_of_256():
    with pytest.raises(ValueError, match="multiple of 256"):
        kquants.quantize(torch.zeros(4, 96), "Q4_K")
    with pytest.raises(ValueError, match="choose one of"):
        kquants.quantize(torch.zeros(4, 256), "Q3_K")


def ggml_quantize():
    """libggml's ggml_quantize_chunk from llama-cpp-python's bundled library, or None."""
    try:
        import llama_cpp
    except ImportError:
        return None
    lib = ctypes.CDLL(os.path.join(os.path.dirname(llama_cpp.__file__), "lib", "libggml-base.so"))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]

    def run(w: np.ndarray, qtype: str) -> np.ndarray:
        w = np.ascontiguousarray(w, np.float32)
        out = np.zeros(w.size // 256 * kquants.BLOCK_BYTES[qtype], np.uint8)
        lib.ggml_quantize_chunk(int(GGML_TYPE[qtype]), w.ctypes.data, out.ctypes.data, 0, w.shape[0], w.shape[1], None)
        return out.reshape(w.shape[0], -1)

    return run


@pytest.mark.slow
@pytest.mark.parametrize("qtype", QTYPES)
def test_reconstruction_error_within_1_percent_of_llama_cpp(qtype):
    run = ggml_quantize()
    if run is None:
        pytest.skip("llama-cpp-python is not installed (scripts/build_llama_cpp.sh)")
    w = weights(rows=256, cols=1024, seed=2)
    theirs, mine = run(w.numpy(), qtype), kquants.quantize(w, qtype).numpy()
    ratio = mse(mine, qtype, w) / mse(theirs, qtype, w)
    assert ratio <= 1.01, ratio
    assert (mine.reshape(-1, kquants.BLOCK_BYTES[qtype]) == theirs.reshape(-1, kquants.BLOCK_BYTES[qtype])).all(1).mean() >= 0.3
    # and the Python transliteration of ggml is byte-exact with libggml on a few rows
    ref = kquant_reference.quantize(w.numpy()[:2], qtype)
    assert np.array_equal(ref.reshape(2, -1), theirs[:2])
