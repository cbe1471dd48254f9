"""Interpretability and clustering metrics, as the authors computed them (authors-code §5).

Notation: X (n x d) holds one feature vector per test example (SAE codes, dense activations or
reconstructions, depending on the table), y its class. Every function returns plain floats.

- CSI, the class selectivity index, per feature j: a = max(0, X[:, j]); m_c = mean of a over class c;
  mu_max = max_c m_c; mu_other = the mean of the *other class means*;
  CSI_j = (mu_max - mu_other) / (mu_max + mu_other + 1e-12); reported: the mean over all features.
- U, the uncertainty coefficient, per feature j: b = 1[X[:, j] > 75th percentile of X[:, j]];
  U_j = MI(b; y) / (H(b) + 1e-12) with MI in nats and H(b) in bits (the authors' units; the
  corrected form uses bits for both); reported: the mean over all features.
- Clustering of SAE codes: the "unsupervised" cluster of a code is its argmax feature; ARI and
  Sil-U use those clusters, Sil-S, DBI and CHI the true labels; Euclidean, the full test set.
- L0: the mean number of codes per example above a threshold.
- Table 5: CSI of the SAE's reconstructions, full and per-class top-k sharpened.

The clustering scores equal scikit-learn's (``silhouette_score``, ``davies_bouldin_score``,
``calinski_harabasz_score``, ``adjusted_rand_score``) to rounding; the work behind them (float64,
sparse-aware, in blocks, on the CPU or a GPU) lives in :mod:`common.metrics_kernels`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from . import metrics_kernels as kernels
from .errors import require
from .metrics_kernels import _class_sums, _encode, _labels, _matrix

_EPS = 1e-12


# ----------------------------------------------------------------------------- monosemanticity
def csi(X, y) -> float:
    """Class Selectivity Index, mean over all features (dead ones score 0).

    Per feature: rectify, take each class's mean, mu_max = the largest class mean and
    mu_other = the mean of the *other class means*; CSI = (mu_max - mu_other) / (mu_max + mu_other + 1e-12).
    """
    X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else X
    X = _matrix(X, dtype=X.dtype if X.is_floating_point() else torch.float64)
    codes, counts = _encode(_labels(y, X.shape[0], X.device))
    n_classes = counts.numel()
    require(n_classes >= 2, "CSI needs examples of at least two classes")
    means = _class_sums(X.clamp_min(0), codes, n_classes) / counts.unsqueeze(1).double()
    mu_max = means.max(dim=0).values
    mu_other = (means.sum(dim=0) - mu_max) / (n_classes - 1)
    return float(((mu_max - mu_other) / (mu_max + mu_other + _EPS)).mean())


def uncertainty_coefficient(X, y, faithful: bool = True) -> float:
    """Mean over features of MI(feature fires, class) / H(feature fires).

    "Fires" is X > the feature's 75th percentile (strict, linear interpolation), so for sparse
    features it means "nonzero". ``faithful=True`` is the authors' formula: MI in nats over the
    binary entropy in bits (ln 2 times the unit-consistent value). ``faithful=False`` uses bits for
    both. Features that never fire score 0.
    """
    if isinstance(X, torch.Tensor):
        X = X.detach().cpu()
        X_np = (X.float() if X.dtype == torch.bfloat16 else X).numpy()   # numpy has no bfloat16
    else:
        X_np = np.asarray(X)
    require(X_np.ndim == 2 and X_np.size > 0, f"features must be a non-empty 2-d array, got shape {X_np.shape}")
    require(bool(np.isfinite(X_np).all()), "features contain NaN or infinite values")
    n = X_np.shape[0]
    codes, counts = _encode(_labels(y, n))
    threshold = np.percentile(X_np, 75, axis=0)  # in the input's own dtype, as the authors' np.percentile
    fires = torch.from_numpy(X_np > threshold)
    n_classes = counts.numel()
    fire_counts = _class_sums(fires, codes, n_classes)              # (C, d) examples that fire, per class
    class_counts = counts.double().unsqueeze(1)                      # (C, 1)
    quiet_counts = class_counts - fire_counts
    total_fire = fire_counts.sum(dim=0)                               # (d,)
    total_quiet = n - total_fire

    def mi_term(joint: torch.Tensor, marginal: torch.Tensor) -> torch.Tensor:
        ratio = joint * n / (marginal.unsqueeze(0) * class_counts)
        return torch.where(joint > 0, joint / n * torch.log(ratio.clamp_min(1e-300)), torch.zeros_like(joint))

    mi_nats = (mi_term(fire_counts, total_fire) + mi_term(quiet_counts, total_quiet)).sum(dim=0).clamp_min(0)
    p = total_fire / n
    h_bits = -(p * torch.log2(p + _EPS) + (1 - p) * torch.log2(1 - p + _EPS))
    mi = mi_nats if faithful else mi_nats / math.log(2)
    return float((mi / (h_bits + _EPS)).mean())


def l0(codes, threshold: float = 0.0) -> float:
    """Mean number of codes per example above ``threshold`` (MNIST used 1e-5, the others nonzero)."""
    codes = _matrix(codes, dtype=torch.float32)
    return float((codes > threshold).sum(dim=1).double().mean())


@torch.no_grad()
def reconstruction_csi(sae, codes, y, k: int = 25, top: torch.Tensor | None = None) -> dict[str, float]:
    """Table 5: CSI of the full SAE reconstruction and of the sharpened one. The per-class top-k
    features are chosen on these same codes and labels (as the authors did, on the test set) unless
    ``top`` (classes x k feature indices, e.g. chosen on the training codes) is given."""
    from .sharpening import class_means, sharpen, top_features

    device = next(sae.parameters()).device
    codes = _matrix(codes, dtype=torch.float32).to(device)
    labels = _labels(y, codes.shape[0], device)
    codes_ids, counts = _encode(labels)
    require(counts.numel() >= 2, "reconstruction CSI needs examples of at least two classes")
    if top is None:
        top = top_features(class_means(codes, codes_ids, counts.numel()), k)
    else:  # rows of ``top`` are class ids 0..C-1; map them onto this label encoding
        require(top.ndim == 2, f"top features must be (classes, k), got {tuple(top.shape)}")
        classes = torch.unique(labels)
        require(int(classes.max()) < top.shape[0], f"labels reach {int(classes.max())}, top features cover "
                                                   f"{top.shape[0]} classes")
        top = top[classes.long().cpu()]
    top = top.to(device)
    full = sae.decode(codes)
    sharp = sae.decode(sharpen(codes, codes_ids, top, "top"))
    return {"csi_recon": csi(full, labels), "csi_recon_sharpened": csi(sharp, labels)}


# ----------------------------------------------------------------------------- clustering
def silhouette(X, labels, chunk: int | None = None) -> float:
    """Mean silhouette coefficient (Euclidean), equal to ``sklearn.metrics.silhouette_score``.

    For each point i of cluster C(i): a(i) = sum_{k in C(i), k != i} |x_i - x_k| / (|C(i)| - 1),
    b(i) = min_{C != C(i)} sum_{k in C} |x_i - x_k| / |C|, s(i) = (b(i) - a(i)) / max(a(i), b(i)),
    s(i) = 0 for a point alone in its cluster; the score is the mean of s(i) over all points (NaN
    unless 2 <= clusters <= n - 1). ``X`` may be dense (array or tensor) or sparse (torch sparse or
    scipy.sparse); ``chunk`` is the number of points per block of distances.
    """
    with kernels._one_thread():
        points = [kernels._points(X)]
        labels = _labels(labels, points[0].n, points[0].device)
    return kernels._silhouettes(points.pop(), [labels], chunk)[0]   # handed over: no second reference


def davies_bouldin(X, labels) -> float:
    """Davies-Bouldin index, equal to ``sklearn.metrics.davies_bouldin_score``.

    With class means c_i and s_i = the mean distance of class i's points to c_i:
    DBI = (1/K) sum_i max_{j != i} (s_i + s_j) / |c_i - c_j| (a zero centroid distance counts as
    infinitely far; 0 if every s_i is 0 or every centroid distance is ~0).
    """
    def score(P, codes: torch.Tensor, counts: torch.Tensor, threads: int) -> float:
        with kernels._threads(threads):    # per-entry passes over millions of nonzeros: every core
            stats = kernels._centroid_stats(P, codes, counts)
        return kernels._davies_bouldin(stats, codes, counts, threads)
    return kernels._labelled_score(X, labels, score)


def _calinski_harabasz(centroids: torch.Tensor, counts: torch.Tensor, n: int, within: float) -> float:
    """CHI = [B / (K - 1)] / [W / (n - K)] with B = sum_k n_k |c_k - mean|^2 (between classes) and
    W = sum_i |x_i - c_{y_i}|^2 (within classes); 1 when W = 0, as scikit-learn."""
    K = counts.numel()
    weights = counts.double()
    mean = weights @ centroids / n
    step = max(1, 2**16 // centroids.shape[1])     # classes per chunk: no (K, d) temporary
    between = sum(float(weights[s:s + step] @ (centroids[s:s + step] - mean).square_().sum(dim=1))
                  for s in range(0, K, step))
    return 1.0 if within == 0.0 else between * (n - K) / (within * (K - 1.0))


def calinski_harabasz(X, labels) -> float:
    """Calinski-Harabasz index, equal to ``sklearn.metrics.calinski_harabasz_score`` (see
    :func:`_calinski_harabasz` for the formula)."""
    def score(P, codes: torch.Tensor, counts: torch.Tensor, threads: int) -> float:
        with kernels._threads(threads):
            keys, centroids, csq = kernels._centroids(P, codes, counts)
            # W = sum |x|^2 - sum_k n_k |c_k|^2: no per-point work; when that difference cancels
            # more than 3 digits (tight clusters), point by point instead
            total = P.sq_total()
            within = total - float(counts.double() @ csq)
            if not within > 1e-3 * total:
                within = float(P.sq_dist_to(centroids, codes, counts, keys, csq).sum())
            return _calinski_harabasz(centroids, counts, P.n, within)
    return kernels._labelled_score(X, labels, score)


def adjusted_rand(labels_true, labels_pred) -> float:
    """Adjusted Rand index, equal to ``sklearn.metrics.adjusted_rand_score``.

    From the contingency table n_ij (pairs of examples: same class i, same cluster j), with
    S = sum_ij n_ij^2, R = sum_i a_i^2 and C = sum_j b_j^2 over its margins, the pair counts are
    tp = S - n, fp = C - S, fn = R - S, tn = n^2 - fp - fn - S, and
    ARI = 2 (tp tn - fn fp) / ((tp + fn)(fn + tn) + (tp + fp)(fp + tn)) (1 if fn = fp = 0).
    """
    with kernels._one_thread():
        return _adjusted_rand(labels_true, labels_pred)


def _adjusted_rand(labels_true, labels_pred) -> float:
    t = _labels(labels_true, len(labels_true)).cpu()
    p = _labels(labels_pred, t.numel()).cpu()
    n = t.numel()
    t_codes, t_counts = _encode(t)
    p_codes, p_counts = _encode(p)
    key = t_codes * p_counts.numel() + p_codes          # one cell of the contingency table per pair (i, j)
    if t_counts.numel() * p_counts.numel() <= 4 * n + 2**20:
        cell = torch.bincount(key, minlength=t_counts.numel() * p_counts.numel())
    else:
        cell = torch.unique(key, return_counts=True)[1]
    sum_sq = int((cell.long() ** 2).sum())
    sum_rows = int((t_counts.long() ** 2).sum())
    sum_cols = int((p_counts.long() ** 2).sum())
    tp = sum_sq - n
    fp = sum_cols - sum_sq
    fn = sum_rows - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def clustering_metrics(codes, y, device: str | torch.device | None = None) -> dict[str, float]:
    """authors-code §5 clustering of SAE codes. Keys: ari, sil_u, sil_s, dbi, chi.

    The "unsupervised" cluster of a code is its argmax feature (an all-zero code maps to feature
    0; not k-means). ARI = adjusted_rand(y, clusters), Sil-U = silhouette(codes, clusters),
    Sil-S = silhouette(codes, y), DBI = davies_bouldin(codes, y), CHI = calinski_harabasz(codes, y),
    on the full set, no subsampling. The codes are prepared once (sparse on the CPU when they are
    sparse, on ``device`` otherwise) and both silhouettes share one pass over the distances.
    """
    with kernels._one_thread() as threads:
        P = kernels._points(codes, device)
        classes, counts = _encode(_labels(y, P.n, P.device))
        # sorted by class, then by cluster, once for every score below
        P, classes, clusters = kernels._grouped(P, classes, P.argmax())
        ari = _adjusted_rand(classes, clusters)
        dbi = chi = math.nan
        if kernels._valid_clusters(counts.numel(), P.n):
            threads = kernels._threads_worth(P, threads)
            with kernels._threads(threads):
                stats = kernels._centroid_stats(P, classes, counts)
            dbi = kernels._davies_bouldin(stats, classes, counts, threads)
            chi = _calinski_harabasz(stats.centroids, counts, P.n, float(stats.sq_dist.sum()))
    sil_s, sil_u = kernels._silhouettes(P, [classes, clusters])
    return {"ari": ari, "sil_u": sil_u, "sil_s": sil_s, "dbi": dbi, "chi": chi}
