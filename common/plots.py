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


# ----------------------------------------------------------------------------- pictures of a run's SAEs
# Inputs are the small per-cycle files of a run directory (``<run>/seed_<s>/cycle_<k>/``): the metrics
# stage's feature_density.json, the sharpen stage's top features (sharpen.json: CIFAR-10 / ImageNet;
# top_features.json: DIGIT-MNIST) and the training histories (adapt.json and sae_train.json;
# train.json). Every function below takes what :func:`run_artifacts` read and draws what is there.
HISTORY_FILES = {"adapt.json": "fine-tuning", "sae_train.json": "SAE training", "train.json": "MLP + SAE training"}
_NOT_CURVES = {"epoch", "seconds", "lr", "examples_per_s"}


def run_artifacts(run_dir) -> dict:
    """``{(seed, cycle): {"density", "top_features", "histories", "dir"}}`` for the cycle directories of
    a run; ``density`` (per-feature firing share) and ``top_features`` (classes x k) are None when
    their file is absent, ``histories`` maps a history file's label to its list of per-epoch records."""
    from pathlib import Path

    import torch

    from .io import read_json
    from .sae_quality import read_feature_density

    found = {}
    for cycle_dir in sorted(Path(run_dir).glob("seed_*/cycle_*")):
        try:
            key = (int(cycle_dir.parent.name[len("seed_"):]), int(cycle_dir.name[len("cycle_"):]))
        except ValueError:
            continue
        top = None
        if (cycle_dir / "sharpen.json").is_file():
            top = read_json(cycle_dir / "sharpen.json").get("top_features")
        elif (cycle_dir / "top_features.json").is_file():
            top = read_json(cycle_dir / "top_features.json").get("per_class")
        histories = {}
        for name, label in HISTORY_FILES.items():
            if (cycle_dir / name).is_file():
                history = read_json(cycle_dir / name).get("history") or []
                if history:
                    histories[label] = history
        found[key] = {"density": read_feature_density(cycle_dir),
                      "top_features": torch.tensor(top) if top else None, "histories": histories, "dir": cycle_dir}
    return dict(sorted(found.items()))


def runs_with(artifacts: dict[str, dict], field: str, source: str) -> dict[str, dict]:
    """The runs of ``{name: run_artifacts(...)}`` that have ``field`` ("density", "top_features" or
    "histories") for some cycle; prints one line for each run without it (``source`` says which file)."""
    have = {}
    for name, runs in artifacts.items():
        if any(a[field] for a in runs.values()) if field == "histories" else \
                any(a[field] is not None for a in runs.values()):
            have[name] = runs
        else:
            print(f"{name}: no {source} in its cycle directories; this picture is skipped for it")
    return have


def plot_feature_density(runs: dict[str, dict], bins: int = 40):
    """log10 feature-density histograms, one panel per run, one step line per cycle (first seed with
    densities); features that never fire on the test set are counted in the legend ("dead")."""
    import numpy as np

    fig, axes = plt.subplots(1, len(runs), figsize=(5 * len(runs), 3.4), squeeze=False)
    for ax, (name, artifacts) in zip(axes.flat, runs.items()):
        have = {k: a["density"] for k, a in artifacts.items() if a["density"] is not None}
        seed = min(s for s, _ in have)
        densities = {c: d.numpy() for (s, c), d in have.items() if s == seed}
        alive = np.concatenate([d[d > 0] for d in densities.values()])
        edges = np.linspace(np.log10(alive.min()), 0.0, bins + 1) if len(alive) else np.linspace(-6, 0, bins + 1)
        for cycle, density in densities.items():
            ax.hist(np.log10(density[density > 0]), bins=edges, histtype="step", linewidth=1.4,
                    label=f"k={cycle} ({int((density == 0).sum())} dead of {len(density)})")
        ax.set_xlabel("log10 feature density (share of test examples where the feature fires)")
        ax.set_ylabel("features")
        ax.set_title(f"{name}, seed {seed}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def plot_top_features(artifacts: dict, title: str = "", max_classes: int = 20):
    """Each class's top features per cycle (first seed; rows: classes, columns: the features in any
    class's top list, colour: rank, 1 = highest mean activation), and the share of each class's top
    features that the next cycle's SAE also ranks in that class's top list. Consecutive cycles' SAEs
    start from the same seeded initialisation, which is all that ties feature j of one to feature j of
    the next: the overlap says how much the features' roles stayed in place."""
    import numpy as np

    seed = min(s for (s, c), a in artifacts.items() if a["top_features"] is not None)
    tops = {c: a["top_features"] for (s, c), a in artifacts.items() if s == seed and a["top_features"] is not None}
    cycles = sorted(tops)
    n_classes, k = tops[cycles[0]].shape
    shown = min(n_classes, max_classes)
    fig, axes = plt.subplots(1, len(cycles) + 1, figsize=(3.6 * len(cycles) + 3, 0.28 * shown + 1.8), squeeze=False,
                             gridspec_kw={"width_ratios": [3] * len(cycles) + [1]})
    for ax, cycle in zip(axes.flat, cycles):
        top = tops[cycle][:shown].numpy()
        features = np.unique(top)
        rank = np.full((shown, len(features)), np.nan)
        for row, feats in enumerate(top):
            rank[row, np.searchsorted(features, feats)] = np.arange(1, k + 1)
        image = ax.imshow(rank, aspect="auto", cmap="viridis_r", interpolation="nearest", vmin=1, vmax=k)
        ax.set_title(f"k={cycle}: {len(features)} distinct features", fontsize=9)
        ax.set_xlabel("features in some class's top list")
        ax.set_ylabel("class")
        ax.set_yticks(range(shown))
        ax.tick_params(labelsize=6)
    fig.colorbar(image, ax=list(axes.flat[:len(cycles)]), label="rank in the class's top list", shrink=0.8)
    overlap_ax = axes.flat[-1]
    pairs = list(zip(cycles, cycles[1:]))
    if pairs:
        overlap = np.array([[len(set(tops[a][c].tolist()) & set(tops[b][c].tolist())) / k for a, b in pairs]
                            for c in range(shown)])
        shown_overlap = overlap_ax.imshow(overlap, aspect="auto", cmap="magma", vmin=0, vmax=1, interpolation="nearest")
        for (row, col), value in np.ndenumerate(overlap):
            overlap_ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=6,
                            color="white" if value < 0.6 else "black")
        overlap_ax.set_xticks(range(len(pairs)), [f"{a}→{b}" for a, b in pairs])
        overlap_ax.set_yticks(range(shown))
        overlap_ax.tick_params(labelsize=6)
        overlap_ax.set_title("shared with next cycle", fontsize=9)
        fig.colorbar(shown_overlap, ax=overlap_ax, shrink=0.8)
    else:
        overlap_ax.axis("off")
    suffix = f" (first {shown} of {n_classes} classes)" if shown < n_classes else ""
    fig.suptitle(f"{title} seed {seed}: each class's top-{k} SAE features{suffix}".strip(), fontsize=10)
    return fig


def plot_decoder_images(first_layer_weight, decoder_weight, top_features, per_class: int = 6, title: str = "",
                        crop: int = 4):
    """MNIST: each class's top features as 28x28 images. A feature's decoder direction d_j lives in h1
    = relu(W1 x + b1); W1ᵀ d_j is the pixel pattern that moves W1 x the most along d_j (red: pixels
    that push h1 along the feature, blue: against). Rows: classes; columns: the class's top features.
    ``crop`` pixels are cut from each edge: MNIST digits sit in the central 20x20 box, and the rarely
    lit border pixels keep large weights that say little (raw 0-255 inputs, Adam's per-weight steps)."""
    import numpy as np

    w1 = first_layer_weight.detach().double()          # (hidden, 784)
    directions = decoder_weight.detach().double()      # (hidden, d_sae): column j = feature j's atom
    images = (w1.T @ directions).T.reshape(-1, 28, 28).numpy()
    images = images[:, crop:28 - crop, crop:28 - crop]
    top = top_features[:, :per_class].numpy()
    fig, axes = plt.subplots(len(top), per_class, figsize=(1.1 * per_class, 1.1 * len(top)), squeeze=False)
    for row, feats in enumerate(top):
        for col, feat in enumerate(feats):
            image = images[feat]
            bound = float(np.abs(image).max()) or 1.0
            axes[row, col].imshow(image, cmap="RdBu_r", vmin=-bound, vmax=bound, interpolation="nearest")
            axes[row, col].set_xticks([])
            axes[row, col].set_yticks([])
            axes[row, col].set_title(f"#{feat}", fontsize=6, pad=1)
        axes[row, 0].set_ylabel(str(row), rotation=0, labelpad=8, fontsize=8)
    fig.suptitle(f"{title}: W1ᵀ·decoder direction of each class's top features".strip(": "), fontsize=9)
    fig.tight_layout()
    return fig


def plot_histories(artifacts: dict, title: str = ""):
    """Training curves of the first seed: one row per history file (fine-tuning, SAE training, MNIST's
    joint training), one panel per recorded quantity, one line per cycle; the x-axis is the epoch."""
    seed = min(s for s, _ in artifacts)
    per_kind: dict[str, dict[int, list]] = {}
    for (s, cycle), a in artifacts.items():
        if s == seed:
            for label, history in a["histories"].items():
                per_kind.setdefault(label, {})[cycle] = history
    kinds = {label: sorted({key for history in by_cycle.values() for record in history for key, value in record.items()
                            if key not in _NOT_CURVES and isinstance(value, (int, float))})
             for label, by_cycle in per_kind.items()}
    ncols = max(len(keys) for keys in kinds.values())
    fig, axes = plt.subplots(len(kinds), ncols, figsize=(3.4 * ncols, 2.7 * len(kinds)), squeeze=False)
    for row, (label, keys) in enumerate(kinds.items()):
        for col in range(ncols):
            ax = axes[row, col]
            if col >= len(keys):
                ax.axis("off")
                continue
            for cycle, history in sorted(per_kind[label].items()):
                points = [(r.get("epoch", i), r[keys[col]]) for i, r in enumerate(history) if keys[col] in r]
                if points:
                    ax.plot(*zip(*points), marker=".", label=f"k={cycle}")
            ax.set_title(f"{label}: {keys[col]}", fontsize=9)
            ax.set_xlabel("epoch")
        axes[row, 0].legend(fontsize=7)
    fig.suptitle(f"{title} seed {seed}: training curves".strip(), fontsize=10)
    fig.tight_layout()
    return fig


def quality_table(runs: dict[str, pd.DataFrame], experiment: str, run_dirs: dict | None = None) -> pd.DataFrame | None:
    """SAE quality columns (common/sae_quality.py) beside acc and L0, mean ± sd over seeds per run,
    experiment (the experiment and its variants, e.g. MNIST's random-target ablation) and cycle. A
    summary without them (written before they existed) falls back on the ``metrics.json`` files of
    its run directory (``run_dirs[name]``) when those have them; otherwise one line says so."""
    from .results import collect
    from .sae_quality import QUALITY_COLUMNS

    columns = ["acc", "acc_spliced", "explained_variance", "recon_mse", "dead_frac", "l0"]
    blocks = []
    for name, frame in runs.items():
        frame = frame[frame["experiment"].astype(str).str.startswith(experiment)]
        source = "summary.csv"
        if not set(QUALITY_COLUMNS) <= set(frame.columns) and run_dirs and name in run_dirs:
            try:
                fallback = collect(run_dirs[name])
            except Exception:   # no metrics.json in the run directory
                fallback = pd.DataFrame()
            if set(QUALITY_COLUMNS) <= set(fallback.columns):
                fallback = fallback[fallback["experiment"].astype(str).str.startswith(experiment)]
                seeds = sorted(map(int, fallback["seed"].unique()))
                frame, source = fallback, f"the metrics.json files of seeds {seeds} (the summary predates these columns)"
        if not set(QUALITY_COLUMNS) <= set(frame.columns) or frame.empty:
            print(f"{name}: no SAE quality columns; rerun its metrics stage (delete metrics.done) to add them")
            continue
        if source != "summary.csv":
            print(f"{name}: from {source}")
        grouped = frame.groupby(["experiment", "cycle"])
        mean, sd, n = grouped[columns].mean(), grouped[columns].std(ddof=1), grouped.size()
        digits = {"explained_variance": ".6f"}   # MNIST's SAEs explain all but ~1e-5 of h1's variance
        cells = pd.DataFrame({c: [f"{v:{digits.get(c, '.4g')}}" for v in mean[c]] for c in columns}, index=mean.index)
        for column in columns:
            with_sd = (n > 1).to_numpy()
            cells.loc[with_sd, column] = [f"{m:{digits.get(column, '.4g')}} ± {s:.2g}" for m, s in
                                          zip(mean.loc[with_sd, column], sd.loc[with_sd, column])]
        cells.insert(0, "seeds", n)
        blocks.append(pd.concat({name: cells}, names=["run"]))
    return pd.concat(blocks) if blocks else None
