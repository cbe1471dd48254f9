"""Figures for the metrics notebooks: each metric across cycles, seeds as points, the paper as a line."""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import pandas as pd

from .paper import paper_table
from .results import METRIC_COLUMNS

LABELS = {"acc": "task accuracy (%)", "probe": "probe accuracy (%)", "csi": "CSI (dense)", "u": "U (SAE codes)",
          "u_corrected": "U, unit-consistent", "ari": "ARI", "sil_u": "silhouette (argmax clusters)",
          "sil_s": "silhouette (labels)", "dbi": "Davies-Bouldin ↓", "chi": "Calinski-Harabasz", "l0": "L0",
          "csi_recon": "CSI, full recon.", "csi_recon_sharpened": "CSI, sharpened recon."}


def plot_cycles(runs: dict[str, pd.DataFrame], experiment: str, metrics=METRIC_COLUMNS, ncols: int = 4):
    """One panel per metric: mean over seeds per cycle (line), each seed (dots), paper values (dashed)."""
    paper = paper_table()
    paper = paper[paper["experiment"] == experiment]
    metrics = [m for m in metrics if any(m in f.columns for f in runs.values())]
    nrows = math.ceil(len(metrics) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4 * ncols, 3 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, metrics):
        for name, frame in runs.items():
            rows = frame[frame["experiment"] == experiment]
            if metric not in rows or rows[metric].isna().all():
                continue
            mean = rows.groupby("cycle")[metric].mean()
            line = ax.plot(mean.index, mean.values, marker="o", label=name)[0]
            ax.scatter(rows["cycle"], rows[metric], s=10, alpha=0.5, color=line.get_color())
        published = paper[paper["metric"] == metric]
        if len(published):
            ax.plot(published["cycle"], published["value"], "k--", marker="x", label="paper")
        ax.set_title(LABELS.get(metric, metric))
        ax.set_xlabel("cycle k")
        ax.set_xticks(sorted(set(paper["cycle"]) | {0, 1, 2, 3}))
    for ax in list(axes.flat)[len(metrics):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle(experiment)
    fig.tight_layout()
    return fig
