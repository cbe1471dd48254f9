"""Dataset rows that carry their index: what lets targets be looked up by index, never by order."""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

from .errors import UserError


class IndexedSubset(Dataset):
    """Rows ``rows`` of a torchvision-style dataset (``base[i] -> (image, label)``, ``base.targets``) as
    ``(transform(image), label, position in this subset)``."""

    def __init__(self, base, rows: torch.Tensor, transform):
        self.base, self.rows, self.transform = base, torch.as_tensor(rows).long(), transform
        self.labels = torch.as_tensor(base.targets, dtype=torch.long)[self.rows]

    def __len__(self) -> int:
        return int(self.rows.numel())

    def __getitem__(self, i: int):
        row = int(self.rows[i])
        try:
            image, label = self.base[row]
        except OSError as err:  # a truncated or unreadable image file
            where = self.base.samples[row][0] if hasattr(self.base, "samples") else f"example {row}"
            raise UserError(f"cannot read image {where} ({err}); replace or remove it") from None
        return self.transform(image), int(label), i
