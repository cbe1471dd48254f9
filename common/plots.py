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


VERDICT_COLOURS = {"supported": "tab:green", "contradicted": "tab:red", "inconclusive": "tab:gray"}


def plot_claims(claims: pd.DataFrame, standardise: bool = True):
    """Forest plot of ``common.claims.evaluate_claims``: per claim (and preset), the mean paired Δ
    with its 95% interval (line), coloured by verdict, and the paper's Δ (×).

    Every row is oriented so that the paper's claimed direction points right (``lower`` claims
    are mirrored; ``changes`` follow the sign of the paper's Δ). With ``standardise`` each row is
    divided by the sd of its own paired differences, so metrics of any unit share one axis (mean Δ / sd
    is the paired effect size d_z); rows whose differences have no spread are left out. Claims
    without at least two paired seeds (no interval) are not drawn.
    """
    rows = claims[(claims["n"] >= 2) & claims["low"].notna()].copy()
    if standardise:
        rows = rows[rows["sd"] > 0]
    sources = list(dict.fromkeys(rows["source"]))
    labels = list(dict.fromkeys(rows["claim_id"]))
    fig, ax = plt.subplots(figsize=(8.5, 0.35 * max(len(labels), 3) + 1.2))
    if rows.empty:
        ax.text(0.5, 0.5, "no claim has two or more paired seeds", ha="center", va="center", transform=ax.transAxes)
        ax.axis("off")
        return fig
    offsets = {s: (i - (len(sources) - 1) / 2) * 0.25 for i, s in enumerate(sources)}
    markers = dict(zip(sources, "osD^v<>"))
    for r in rows.itertuples(index=False):
        sign = {"higher": 1.0, "lower": -1.0}.get(r.direction, 1.0 if r.paper_effect >= 0 else -1.0)
        scale = r.sd if standardise else 1.0
        y = labels.index(r.claim_id) + offsets[r.source]
        low, high = sorted((sign * r.low / scale, sign * r.high / scale))
        colour = VERDICT_COLOURS.get(r.verdict, "black")
        ax.plot([low, high], [y, y], color=colour, lw=2)
        ax.plot(sign * r.mean / scale, y, marker=markers[r.source], color=colour, ms=5, ls="none")
        ax.plot(sign * r.paper_effect / scale, y, marker="x", color="black", ms=5, ls="none")
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(("mean paired Δ / sd of Δ" if standardise else "mean paired Δ") +
                  ", 95% interval; right = the paper's claimed direction")
    handles = [plt.Line2D([], [], color=c, lw=2, label=v) for v, c in VERDICT_COLOURS.items()]
    handles += [plt.Line2D([], [], color="black", marker=markers[s], ls="none", label=s or "ours") for s in sources]
    handles.append(plt.Line2D([], [], color="black", marker="x", ls="none", label="paper (one run)"))
    ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig
