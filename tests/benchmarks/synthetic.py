"""Synthetic data that looks like SAE codes, for the benchmarks.

Real SAE codes are ReLU outputs: non-negative, very sparse (L0 of about 50-90 out of thousands of
features on ImageNet) and class-structured (each class switches on its own set of features, one of
them strongly, so that the argmax feature often names the class: the paper reports ARI ~0.7 and
silhouettes ~0.35-0.5 on ImageNet). The generator reproduces that shape so that the sparse paths of
``common.metrics`` are timed on data of the kind they will meet, and so that the silhouettes are
not trivial (classes overlap through shared and noise features).
"""
from __future__ import annotations

import torch


def sae_like_codes(n: int, d: int = 6144, n_classes: int = 1000, l0: int = 70, seed: int = 0,
                   zero_rows: float = 0.001) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codes float32 (n, d), labels int64 (n,)) with about ``l0`` nonzero codes per row.

    Each class owns ``l0`` features (drawn at random, so classes share some); an example switches
    each of its class's features on with probability 0.8, at the class's magnitude times a jitter,
    the class's first feature three times stronger; a quarter of ``l0`` more nonzero codes are
    small noise on random features; a fraction ``zero_rows`` of examples are all-zero codes.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (n,), generator=g)
    feats = torch.rand(n_classes, d, generator=g).argsort(dim=1)[:, :l0]           # (C, l0) class features
    magnitude = torch.empty(n_classes, l0).log_normal_(0.0, 0.5, generator=g)
    magnitude[:, 0] *= 3.0
    on = torch.rand(n, l0, generator=g) < 0.8
    values = magnitude[labels] * (0.6 + 0.8 * torch.rand(n, l0, generator=g)) * on
    n_noise = max(1, l0 // 4)
    noise_idx = torch.randint(0, d, (n, n_noise), generator=g)
    noise_val = 0.2 * torch.empty(n, n_noise).exponential_(generator=g)
    codes = torch.zeros(n, d)
    codes.scatter_(1, noise_idx, noise_val)
    codes.scatter_(1, feats[labels], values)                                          # class values win ties
    codes[torch.rand(n, generator=g) < zero_rows] = 0.0
    return codes, labels
