"""Shared fixtures (model builders live in tiny_models.py, importable from any test), the `gpu`
marker's skip, and Triton's interpreter on machines without CUDA."""

import os

import pytest
import torch

# Without a CUDA device the Triton kernels (quant/kernels/triton_4bit.py) are tested on CPU tensors
# through Triton's interpreter, which triton.jit chooses when TRITON_INTERPRET=1 at the moment a
# kernel is defined (lorakit defines them lazily, on first use; only tests let CPU tensors in:
# tests/quant/test_triton_kernels.py). Nothing else in lorakit uses Triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.gpu` tests skip where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (marked gpu)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)

from tiny_models import ARCHS, TINY
from tiny_tokenizers import write_tiny_model_folder


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny Llama model folder with its tokenizer (tiny_tokenizers.write_tiny_model_folder)."""
    return write_tiny_model_folder(tmp_path_factory.mktemp("model"))


@pytest.fixture
def input_ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, TINY["vocab_size"], (2, 12), generator=g)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine the thread
    hand-offs made them 10-100x slower (measured while writing these tests)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
