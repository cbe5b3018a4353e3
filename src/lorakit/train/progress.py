"""Progress of a run: a tqdm bar on a terminal (a notebook bar in Jupyter), one plain line every
few steps or seconds anywhere else (a log file, nohup, CI), so a log never holds a bar's carriage
returns as one huge line.

    plain line:  step 40/150  loss 1.2345  lr 2.00e-03  1234 tok/s  elapsed 0:00:31  eta 0:01:25
"""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("lorakit")
PLAIN_LINES = 20        # at least this many lines per run
PLAIN_SECONDS = 30.0    # and one at least every this many seconds
TEXT_BAR_SECONDS = 2.0  # a text bar in a notebook without ipywidgets: redrawn at most this often


def _interactive() -> bool:
    """A terminal, or a Jupyter / Colab kernel (tqdm.auto draws a widget there)."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules


def _clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def _bar(total: int, initial: int):
    """tqdm.auto's bar: a widget in Jupyter / Colab, a text bar on a terminal. In a kernel without
    ipywidgets tqdm.auto would fall back to the text bar with a warning, and each redraw is one more
    output of the cell (a notebook file keeps them all): the text bar then, redrawn at most every
    TEXT_BAR_SECONDS."""
    import importlib.util

    kwargs = dict(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
    if "ipykernel" in sys.modules and not sys.stderr.isatty() and importlib.util.find_spec("ipywidgets") is None:
        from tqdm.std import tqdm

        return tqdm(mininterval=TEXT_BAR_SECONDS, **kwargs)
    from tqdm.auto import tqdm

    return tqdm(**kwargs)


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True, interactive: bool | None = None):
        self.total, self.enabled = total, enabled
        self.interactive = _interactive() if interactive is None else interactive
        self.every = max(1, total // PLAIN_LINES)
        self.t0 = self.last = time.perf_counter()
        self.first = initial
        self.bar = None
        if enabled and self.interactive:
            self.bar = _bar(total, initial)

    def update(self, step: int, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:.0f}", refresh=False)
            self.bar.update(1)
            return
        now = time.perf_counter()
        if step % self.every and step != self.total and now - self.last < PLAIN_SECONDS:
            return
        self.last = now
        done = step - self.first
        eta = (now - self.t0) / done * (self.total - step) if done else 0.0
        log.info("step %d/%d  loss %.4f  lr %.2e  %.0f tok/s  elapsed %s  eta %s", step, self.total, loss, lr,
                 tokens_per_s, _clock(now - self.t0), _clock(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
