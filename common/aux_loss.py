"""The SAE-ception auxiliary loss: cosine distance between live activations and fixed targets.

``cosine``     the method as the paper states it: mean over the batch of 1 - cos(x_i, t_i).
``broadcast``  what the authors' MNIST code computed (authors-code §1.3): targets of shape (B, 1, d)
               against activations (B, d) make ``CosineSimilarity(dim=1)`` broadcast to (B, B, d)
               and take the cosine along the *batch* axis. Element (a, k) is
               sign(t_ak) * sum_j x_jk / (sqrt(B) * ||x_.k||), so only the sign pattern of each
               target matters. Kept as a named option so the faithful preset reproduces it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import require

AUX_LOSSES = ("cosine", "broadcast")


def cosine_distance(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-example 1 - cos(x_i, t_i), averaged over the batch."""
    require(x.shape == targets.shape, f"activations {tuple(x.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (1.0 - F.cosine_similarity(x, targets.to(x.dtype), dim=1)).mean()


def broadcast_cosine_distance(x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The authors' MNIST loss, bug included: cosine along the batch axis after broadcasting."""
    require(x.shape == targets.shape, f"activations {tuple(x.shape)} and targets {tuple(targets.shape)} differ in shape")
    return (1.0 - F.cosine_similarity(x, targets.to(x.dtype).unsqueeze(1), dim=1)).mean()


def aux_loss(x: torch.Tensor, targets: torch.Tensor, kind: str = "cosine") -> torch.Tensor:
    if kind == "cosine":
        return cosine_distance(x, targets)
    if kind == "broadcast":
        return broadcast_cosine_distance(x, targets)
    raise ValueError(f"unknown aux loss '{kind}'; choose one of {AUX_LOSSES}")
