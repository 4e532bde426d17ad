"""How mathtune shows numbers and figures, shared by the terminal tables, `data stats` and the report.

    percent(0.2)            -> '20.0%'
    png(fig)                 # a matplotlib figure as PNG bytes, the same bytes for the same figure

matplotlib is imported on first use (`pyplot()`), so commands that draw nothing never load it.
"""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


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


def table(rows: list[tuple[str, ...]]) -> list[str]:
    """Columns aligned, the first to the left, the others to the right, a rule under the header."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


PROGRESS_MIN_BYTES = 32 << 20


@contextmanager
def progress_bar(path: Path, desc: str) -> Iterator[Callable[[int], None] | None]:
    """A byte-count progress bar on stderr for large files; None (no bar) for small ones."""
    try:
        size = path.stat().st_size
    except OSError:
        size = 0
    if size < PROGRESS_MIN_BYTES:
        yield None
        return
    from tqdm.auto import tqdm

    with tqdm(total=size, unit="B", unit_scale=True, desc=f"{desc} {path.name}", file=sys.stderr,
              dynamic_ncols=True, leave=False, mininterval=0.5) as bar:
        yield bar.update
