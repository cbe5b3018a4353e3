"""Tokenizer fixtures for the data tests (builders in tests/tiny_tokenizers.py)."""

import copy

import pytest

from tiny_tokenizers import make_tokenizer

_CACHE = {}


@pytest.fixture(scope="session")
def tokenizers_by_kind():
    def get(kind):
        if kind not in _CACHE:
            _CACHE[kind] = make_tokenizer(kind)
        return copy.deepcopy(_CACHE[kind])
    return get


@pytest.fixture(scope="session")
def tok_plain(tokenizers_by_kind):
    return tokenizers_by_kind("plain")


@pytest.fixture(scope="session")
def tok_pad_eos(tokenizers_by_kind):
    return tokenizers_by_kind("pad_eos")


@pytest.fixture(scope="session")
def tok_chatml(tokenizers_by_kind):
    return tokenizers_by_kind("chatml")


@pytest.fixture(scope="session")
def tok_llama(tokenizers_by_kind):
    return tokenizers_by_kind("llama")
