"""Feature sharpening: per-class top-K SAE features and the targets decoded from them.

For each class c, K_c is the set of K features with the highest mean code over that class's
training examples. An example of class c keeps only its K_c coordinates ("top") or loses exactly
them ("mask", the authors' ablated complement); decoding the result, decoder bias included, gives
the sharpened target f'. Everything is batched: no Python loop over examples, features or classes.
"""
from __future__ import annotations

import torch

from .errors import require
from .sae import SparseAutoencoder

MODES = ("top", "mask")          # the per-class choices of :func:`sharpen`
#: every target strategy an experiment can select (``sharpen.mode``): per-class top-k kept ("top") or
#: removed ("mask"), each example's own top-k ("per_example", label-free), seeded unit Gaussian rows
#: ("random", the authors' Table 10 ablation; no SAE involved)
STRATEGIES = MODES + ("per_example", "random")
NEEDS_CLASS_FEATURES = MODES    # the strategies that need per-class top features (class means first)
SAE_STRATEGIES = MODES + ("per_example",)   # the strategies that decode the cycle's SAE (all but "random")


def _check_labels(labels: torch.Tensor, n: int, n_classes: int | None = None) -> torch.Tensor:
    labels = torch.as_tensor(labels).long().reshape(-1)
    require(labels.numel() == n, f"{labels.numel()} labels for {n} examples")
    if n_classes is not None and n:
        require(int(labels.min()) >= 0 and int(labels.max()) < n_classes,
                f"labels must lie in 0..{n_classes - 1}, found {int(labels.min())}..{int(labels.max())}")
    return labels


class ClassMeans:
    """Streaming per-class sums and counts, so class means of a dataset-sized cache need O(C*d) memory."""

    def __init__(self, n_classes: int, dim: int):
        require(n_classes > 0 and dim > 0, f"need n_classes > 0 and dim > 0, got {n_classes}, {dim}")
        self.sums = torch.zeros(n_classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(n_classes, dtype=torch.long)

    def update(self, codes: torch.Tensor, labels: torch.Tensor) -> None:
        require(codes.ndim == 2 and codes.shape[1] == self.sums.shape[1],
                f"codes must have shape (n, {self.sums.shape[1]}), got {tuple(codes.shape)}")
        labels = _check_labels(labels, codes.shape[0], self.sums.shape[0]).cpu()
        self.sums.index_add_(0, labels, codes.detach().cpu().double())
        self.counts += torch.bincount(labels, minlength=self.sums.shape[0])

    def means(self) -> torch.Tensor:
        """(C, d) means; a class with no examples has mean 0 (its top-K is then arbitrary but fixed)."""
        return self.sums / self.counts.clamp_min(1).unsqueeze(1)


def class_means(codes: torch.Tensor, labels: torch.Tensor, n_classes: int) -> torch.Tensor:
    acc = ClassMeans(n_classes, codes.shape[1])
    acc.update(codes, labels)
    return acc.means()


def top_features(means: torch.Tensor, k: int) -> torch.Tensor:
    """(C, k) indices of each class's k largest mean codes, largest first (ties: lower index first)."""
    require(means.ndim == 2, f"class means must be (classes, features), got {tuple(means.shape)}")
    require(0 < k <= means.shape[1], f"k={k} must be in 1..{means.shape[1]} (the SAE's dictionary size)")
    return torch.argsort(means, dim=1, descending=True, stable=True)[:, :k]


def class_feature_mask(top_idx: torch.Tensor, d_sae: int) -> torch.Tensor:
    """(C, d_sae) boolean mask of each class's kept features."""
    mask = torch.zeros(top_idx.shape[0], d_sae, dtype=torch.bool, device=top_idx.device)
    return mask.scatter_(1, top_idx, True)


def sharpen(codes: torch.Tensor, labels: torch.Tensor, top_idx: torch.Tensor, mode: str = "top") -> torch.Tensor:
    """Keep ("top") or remove ("mask") each example's class features from its code."""
    require(mode in MODES, f"unknown sharpening mode '{mode}'; choose one of {', '.join(MODES)}")
    require(codes.ndim == 2, f"codes must be (n, d_sae), got {tuple(codes.shape)}")
    labels = _check_labels(labels, codes.shape[0], top_idx.shape[0]).to(codes.device)
    keep = class_feature_mask(top_idx.to(codes.device), codes.shape[1])[labels]
    if mode == "mask":
        keep = ~keep
    return codes * keep


def per_example_topk(codes: torch.Tensor, k: int) -> torch.Tensor:
    """Keep each example's own k largest codes (a label-free sharpening)."""
    require(0 < k <= codes.shape[1], f"k={k} must be in 1..{codes.shape[1]}")
    values, idx = codes.topk(k, dim=1)
    return torch.zeros_like(codes).scatter_(1, idx, values)


def random_unit_rows(n: int, dim: int, generator: torch.Generator) -> torch.Tensor:
    """(n, dim) i.i.d. Gaussian rows from ``generator``, each normalised to unit length (the
    ``random`` strategy). For a width that is a multiple of 16, drawing a table in blocks of rows
    gives the numbers of drawing it at once (torch makes normals in blocks of 16), so a streamed
    table equals :func:`random_targets` (tests/test_sharpening.py checks width 16)."""
    rows = torch.randn(n, dim, generator=generator)
    return rows / rows.norm(dim=1, keepdim=True)


def random_targets(n: int, dim: int, seed: int = 42) -> torch.Tensor:
    """(n, dim) unit Gaussian rows from a generator seeded with ``seed``.

    The same numbers as the authors' ablation drew (``torch.manual_seed(seed)``, then ``randn``):
    a fresh generator and the global one start alike, so seed 42 gives their targets.
    """
    require(n > 0 and dim > 0, f"need n > 0 and dim > 0, got {n}, {dim}")
    return random_unit_rows(n, dim, torch.Generator().manual_seed(seed))


@torch.no_grad()
def target_rows(strategy: str, x: torch.Tensor, labels: torch.Tensor, *, sae: SparseAutoencoder | None = None,
                top_idx: torch.Tensor | None = None, k: int | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """The targets of one batch of activations ``x`` under ``strategy`` (:data:`STRATEGIES`), fp32:
    decode(sharpen(encode(x))) with the decoder bias, or unit Gaussian rows drawn from ``generator``."""
    require(strategy in STRATEGIES, f"unknown sharpening strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if strategy == "random":
        return random_unit_rows(x.shape[0], x.shape[1], generator)
    require(sae is not None, f"the '{strategy}' strategy needs an SAE")
    z = sae.encode(x.float())
    if strategy == "per_example":
        require(k is not None, "the per_example strategy needs k")
        z = per_example_topk(z, k)
    else:
        require(top_idx is not None, f"the '{strategy}' strategy needs each class's top features")
        z = sharpen(z, labels.to(z.device), top_idx, strategy)
    return sae.decode(z).float()


@torch.no_grad()
def sharpened_targets(sae: SparseAutoencoder, codes: torch.Tensor, labels: torch.Tensor, top_idx: torch.Tensor,
                      mode: str = "top", batch_size: int = 8192) -> torch.Tensor:
    """Decode the sharpened codes in batches (fp32, decoder bias included)."""
    require(codes.shape[1] == sae.cfg.d_sae, f"codes have width {codes.shape[1]}, the SAE has {sae.cfg.d_sae} features")
    labels = _check_labels(labels, codes.shape[0], top_idx.shape[0])
    device = next(sae.parameters()).device
    out = torch.empty(codes.shape[0], sae.cfg.d_in)
    for start in range(0, codes.shape[0], batch_size):
        stop = start + batch_size
        z = sharpen(codes[start:stop].to(device).float(), labels[start:stop], top_idx, mode)
        out[start:stop] = sae.decode(z).float().cpu()
    return out
