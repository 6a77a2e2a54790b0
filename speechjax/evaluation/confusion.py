"""The confusion-matrix figure `evaluate` writes next to a classification
score (W/eval/<name>.confusion.png): rows are the reference labels, columns
the predicted ones, each cell shows its count, and the shading is the row's
fraction, so a rare class's errors stand out as much as a common one's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def write_confusion_png(path: str, labels: Sequence[str], confusion: Sequence[Sequence[int]], *,
                        title: str = "") -> str:
  """Draws `confusion` (rows = reference, columns = predicted; one row per
  class, one column per entry of `labels`, which may end with an extra
  '<other>' column) to a PNG at `path`; returns `path`."""
  # Imported here: matplotlib is only needed when a figure is drawn, and Agg
  # draws without a display (servers, CI, TPU VMs).
  import matplotlib
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt

  counts = np.asarray(confusion, np.int64)
  columns = [str(x) for x in labels]
  if counts.ndim != 2 or counts.shape[1] != len(columns) or counts.shape[0] > len(columns):
    raise ValueError(f"write_confusion_png: confusion of shape {counts.shape} does not fit "
                     f"{len(columns)} labels ({columns})")
  rows = columns[:counts.shape[0]]
  row_fraction = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
  size = 1.5 + 0.55 * len(columns)
  fig, ax = plt.subplots(figsize=(size + 1.0, size))
  try:
    image = ax.imshow(row_fraction, cmap="Blues", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(columns)), labels=columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), labels=rows)
    ax.set_xlabel("predicted label")
    ax.set_ylabel("reference label")
    if title:
      ax.set_title(title)
    for i in range(counts.shape[0]):
      for j in range(counts.shape[1]):
        ax.text(j, i, str(int(counts[i, j])), ha="center", va="center", fontsize=8,
                color="white" if row_fraction[i, j] > 0.5 else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the reference row")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
  finally:
    plt.close(fig)
  return path
