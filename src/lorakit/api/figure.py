"""A matplotlib Figure that Jupyter and Colab show inline, with no pyplot and no backend switch.

IPython displays an object through its `_repr_png_`; a plain Figure has none (without pyplot's
inline backend a returned Figure prints as "<Figure size ...>"). `InlineFigure` renders itself on
its Agg canvas, so `run.plot()` as the last line of a cell shows the curves whatever backend the
session uses, and switching nothing keeps the user's own `%matplotlib` choice intact.
"""

from __future__ import annotations

import io

from matplotlib.figure import Figure


class InlineFigure(Figure):
    def _repr_png_(self) -> bytes:
        buf = io.BytesIO()
        self.savefig(buf, format="png")
        return buf.getvalue()
