"""A training run killed right after it wrote a given checkpoint (what a `kill -9` then would leave)."""

from contextlib import contextmanager

import pytest

from lorakit.train import loop as loop_mod


@contextmanager
def dies_after_checkpoint(monkeypatch, step: int, exc=KeyboardInterrupt):
    """Inside the block the loop raises `exc` as soon as checkpoint `step` is on disk (and the block
    must end with it); after it, checkpoints are written normally again."""
    real = loop_mod.save_checkpoint

    def save_then_die(run_dir, at, *a, **k):
        path = real(run_dir, at, *a, **k)
        if at == step:
            raise exc
        return path

    monkeypatch.setattr(loop_mod, "save_checkpoint", save_then_die)
    try:
        with pytest.raises(exc):
            yield
    finally:
        monkeypatch.setattr(loop_mod, "save_checkpoint", real)
