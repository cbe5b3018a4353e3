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
