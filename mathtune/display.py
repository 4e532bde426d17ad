"""How mathtune shows numbers and figures, shared by the terminal tables, `data stats` and the report.

    percent(0.2)            -> '20.0%'
    png(fig)                 # a matplotlib figure as PNG bytes, the same bytes for the same figure

matplotlib is imported on first use (`pyplot()`), so commands that draw nothing never load it.
"""

from __future__ import annotations

import io


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed: the plots only go to files
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    # No "Software" tag, so a page does not change when only matplotlib's version does.
    fig.savefig(buffer, format="png", dpi=110, metadata={"Software": None})
    pyplot().close(fig)
    return buffer.getvalue()
