"""Interpretability and clustering metrics, exactly as SPEC §5 defines them.

Public names (outside checks call these): :func:`csi`, :func:`uncertainty_coefficient`,
:func:`clustering_metrics`, :func:`l0`, :func:`reconstruction_csi`, plus the exact clustering
scores :func:`silhouette`, :func:`davies_bouldin`, :func:`calinski_harabasz` and
:func:`adjusted_rand`, which equal scikit-learn's on the same inputs but run in torch (CPU or
GPU), in float64, in row chunks so memory stays bounded. Every function returns plain floats and
has no Python loop over features, classes or examples.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .errors import require

_EPS = 1e-12


# ----------------------------------------------------------------------------- input checks
def _matrix(X, dtype=torch.float64, device=None) -> torch.Tensor:
    X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else X
    require(X.ndim == 2, f"features must be a 2-d array (examples, features), got shape {tuple(X.shape)}")
    require(X.shape[0] > 0 and X.shape[1] > 0, f"features must not be empty, got shape {tuple(X.shape)}")
    X = X.to(device=device or X.device, dtype=dtype)
    require(bool(torch.isfinite(X).all()), "features contain NaN or infinite values")
    return X


def _labels(y, n: int, device=None) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    require(y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1), f"labels must be 1-d, got shape {tuple(y.shape)}")
    y = y.reshape(-1)
    require(y.numel() == n, f"{y.numel()} labels for {n} examples")
    return y.to(device=device).long()


def _encode(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels -> (codes 0..K-1, counts per code)."""
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    return inverse, counts


def _class_sums(X: torch.Tensor, codes: torch.Tensor, n_classes: int, chunk: int = 8192) -> torch.Tensor:
    sums = torch.zeros(n_classes, X.shape[1], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[0], chunk):
        sums.index_add_(0, codes[start:start + chunk], X[start:start + chunk].to(torch.float64))
    return sums


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
    X_np = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
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
def reconstruction_csi(sae, codes, y, k: int = 25) -> dict[str, float]:
    """Table 5: CSI of the full SAE reconstruction and of the sharpened one (top-k per class
    chosen on these same codes and labels, as the authors computed it on the test set)."""
    from .sharpening import class_means, sharpen, top_features

    device = next(sae.parameters()).device
    codes = _matrix(codes, dtype=torch.float32).to(device)
    labels = _labels(y, codes.shape[0], device)
    codes_ids, counts = _encode(labels)
    require(counts.numel() >= 2, "reconstruction CSI needs examples of at least two classes")
    top = top_features(class_means(codes, codes_ids, counts.numel()), k).to(device)
    full = sae.decode(codes)
    sharp = sae.decode(sharpen(codes, codes_ids, top, "top"))
    return {"csi_recon": csi(full, labels), "csi_recon_sharpened": csi(sharp, labels)}


# ----------------------------------------------------------------------------- clustering
def _valid_clusters(n_labels: int, n: int) -> bool:
    """scikit-learn's scores are defined for 2 <= clusters <= n - 1; otherwise we report NaN."""
    return 2 <= n_labels <= n - 1


def _segment_sums(D: torch.Tensor, order: torch.Tensor, bounds: torch.Tensor) -> torch.Tensor:
    """Sums of D's columns per cluster: columns reordered so clusters are contiguous, then a cumsum."""
    cs = torch.cumsum(D[:, order], dim=1)
    cs = torch.nn.functional.pad(cs, (1, 0))
    return cs[:, bounds[1:]] - cs[:, bounds[:-1]]


def _silhouettes(X: torch.Tensor, labelings: list[torch.Tensor], chunk: int) -> list[float]:
    """Mean silhouette for several labelings of the same points, with one pass over the distances."""
    n = X.shape[0]
    sq = (X * X).sum(dim=1)
    plans = []
    for labels in labelings:
        codes, counts = _encode(labels)
        order = torch.argsort(codes, stable=True)
        bounds = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
        plans.append((codes, counts, order, bounds, torch.zeros(n, dtype=torch.float64, device=X.device)))
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        D = (sq[start:stop, None] + sq[None, :] - 2.0 * (X[start:stop] @ X.T)).clamp_min_(0)
        D[torch.arange(stop - start), torch.arange(start, stop)] = 0.0  # as sklearn: self-distance is exactly 0
        D = D.sqrt_()
        for codes, counts, order, bounds, out in plans:
            sums = _segment_sums(D, order, bounds)                      # (rows, K)
            own = codes[start:stop]
            rows = torch.arange(stop - start, device=X.device)
            own_size = counts[own].double()
            intra = sums[rows, own] / (own_size - 1)                    # 0/0 -> nan for singletons
            mean_other = sums / counts.double().unsqueeze(0)
            mean_other[rows, own] = math.inf
            inter = mean_other.min(dim=1).values
            sil = (inter - intra) / torch.maximum(intra, inter)
            out[start:stop] = torch.nan_to_num(sil, nan=0.0, posinf=0.0, neginf=0.0)
    return [float(out.mean()) if _valid_clusters(int(counts.numel()), n) else math.nan
            for codes, counts, order, bounds, out in plans]


def _chunk_rows(n: int, budget_bytes: int = 512 * 2**20) -> int:
    return max(1, min(n, budget_bytes // (8 * 3 * max(n, 1))))


def silhouette(X, labels, chunk: int | None = None) -> float:
    """Mean silhouette coefficient (Euclidean), equal to ``sklearn.metrics.silhouette_score``."""
    X = _matrix(X)
    labels = _labels(labels, X.shape[0], X.device)
    return _silhouettes(X, [labels], chunk or _chunk_rows(X.shape[0]))[0]


def _centroids(X: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    return _class_sums(X, codes, counts.numel()) / counts.double().unsqueeze(1)


def davies_bouldin(X, labels) -> float:
    """Davies-Bouldin index, equal to ``sklearn.metrics.davies_bouldin_score``."""
    X = _matrix(X)
    codes, counts = _encode(_labels(labels, X.shape[0], X.device))
    K = counts.numel()
    if not _valid_clusters(K, X.shape[0]):
        return math.nan
    centroids = _centroids(X, codes, counts)
    dist_to_own = torch.cat([(X[s:s + 8192] - centroids[codes[s:s + 8192]]).norm(dim=1)
                             for s in range(0, X.shape[0], 8192)])
    intra = torch.zeros(K, dtype=torch.float64, device=X.device).index_add_(0, codes, dist_to_own) / counts.double()
    csq = (centroids * centroids).sum(dim=1)
    between = (csq[:, None] + csq[None, :] - 2.0 * centroids @ centroids.T).clamp_min_(0)
    between.fill_diagonal_(0.0)
    between = between.sqrt_()
    if torch.allclose(intra, torch.zeros_like(intra)) or torch.allclose(between, torch.zeros_like(between)):
        return 0.0
    between[between == 0] = math.inf
    combined = (intra[:, None] + intra[None, :]) / between
    return float(combined.max(dim=1).values.mean())


def calinski_harabasz(X, labels) -> float:
    """Calinski-Harabasz index, equal to ``sklearn.metrics.calinski_harabasz_score``."""
    X = _matrix(X)
    n = X.shape[0]
    codes, counts = _encode(_labels(labels, n, X.device))
    K = counts.numel()
    if not _valid_clusters(K, n):
        return math.nan
    centroids = _centroids(X, codes, counts)
    extra = float((counts.double() * ((centroids - X.mean(dim=0)) ** 2).sum(dim=1)).sum())
    intra = float(sum(((X[s:s + 8192] - centroids[codes[s:s + 8192]]) ** 2).sum() for s in range(0, n, 8192)))
    return 1.0 if intra == 0.0 else extra * (n - K) / (intra * (K - 1.0))


def adjusted_rand(labels_true, labels_pred) -> float:
    """Adjusted Rand index, equal to ``sklearn.metrics.adjusted_rand_score`` (pair-counting form)."""
    t = _labels(labels_true, len(labels_true)).cpu()
    p = _labels(labels_pred, t.numel()).cpu()
    n = t.numel()
    t_codes, _ = _encode(t)
    p_codes, _ = _encode(p)
    pairs, cell = torch.unique(t_codes * (int(p_codes.max()) + 1) + p_codes, return_counts=True)
    cell = cell.to(torch.int64)
    row = torch.bincount(t_codes).to(torch.int64)
    col = torch.bincount(p_codes).to(torch.int64)
    sum_sq = int((cell * cell).sum())
    cont_dot_col = int((cell * col[pairs % (int(p_codes.max()) + 1)]).sum())
    cont_dot_row = int((cell * row[pairs // (int(p_codes.max()) + 1)]).sum())
    tp = sum_sq - n
    fp = cont_dot_col - sum_sq
    fn = cont_dot_row - sum_sq
    tn = n * n - fp - fn - sum_sq
    if fn == 0 and fp == 0:
        return 1.0
    return 2.0 * (tp * tn - fn * fp) / ((tp + fn) * (fn + tn) + (tp + fp) * (fp + tn))


def clustering_metrics(codes, y, device: str | torch.device | None = None) -> dict[str, float]:
    """SPEC §5 clustering of SAE codes: "unsupervised" clusters are the argmax feature of each code
    (an all-zero code maps to feature 0); ARI and Sil-U use them, Sil-S, DBI and CHI use the true
    labels. Full set, no subsampling. Keys: ari, sil_u, sil_s, dbi, chi."""
    X = _matrix(codes, device=device)
    y = _labels(y, X.shape[0], X.device)
    clusters = X.argmax(dim=1)
    sil_u, sil_s = _silhouettes(X, [clusters, y], _chunk_rows(X.shape[0]))
    return {"ari": adjusted_rand(y, clusters), "sil_u": sil_u, "sil_s": sil_s,
            "dbi": davies_bouldin(X, y), "chi": calinski_harabasz(X, y)}
