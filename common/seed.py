"""Seeding, as the authors' ``set_seed``: Python, NumPy and torch at once."""
from __future__ import annotations

import random

import numpy as np
import torch


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """``auto`` takes CUDA when present; anything else is passed to torch as it is."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from .errors import require

    device = torch.device(requested)
    require(device.type != "cuda" or torch.cuda.is_available(),
            f"device '{requested}' was asked for but CUDA is not available; use --device cpu")
    return device
