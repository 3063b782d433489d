"""Matplotlib without a display, and a figure as PNG bytes (the report's plots, a search's plot)."""

from __future__ import annotations

import io


def pyplot():
    """`matplotlib.pyplot` on the Agg backend (drivers and workers have no display)."""
    import matplotlib  # matplotlib: slow to import, only where a figure is drawn

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # matplotlib: slow to import, only where a figure is drawn

    return plt


def png(fig, dpi: int = 90) -> bytes:
    """The figure laid out and saved as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return buf.getvalue()
