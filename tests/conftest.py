"""Shared fixtures (model builders live in tiny_models.py, importable from any test)."""

import pytest
import torch

from tiny_models import ARCHS, TINY


@pytest.fixture(params=list(ARCHS))
def arch(request):
    return request.param


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
