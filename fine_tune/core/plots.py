"""Matplotlib without a display: the one way every command and launcher draws and saves a plot.

matplotlib is imported only when a plot is drawn (seconds), and with the Agg backend, so a
plot works on a cluster node or over ssh.
"""

from __future__ import annotations

import os
from pathlib import Path

DPI = 110


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only, no window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: str | os.PathLike) -> Path:
    """Write the figure to ``path`` (its folder made if missing) and free it."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    pyplot().close(fig)
    return out
