"""Targets stored aligned by dataset index, with a fingerprint of the dataset they belong to.

Row i of a target file is the target of example i of the training split, whatever order the
loader visits examples in, so pairing is a lookup by index (the authors' MNIST code paired by
position and got it wrong, SPEC §1.5). The fingerprint (length + hash of the labels in index order)
makes loading targets against another dataset or split fail with one line.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch

from .errors import UserError, require
from .io import atomic_path, read_json, write_json


def dataset_fingerprint(labels) -> dict:
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    return {"n": int(labels.size), "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_targets(path: str | os.PathLike, targets: torch.Tensor | np.ndarray, labels, **meta) -> None:
    """Write (n, d) targets whose row i belongs to dataset index i, plus the dataset fingerprint."""
    path = Path(path)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.float32)
    fingerprint = dataset_fingerprint(labels)
    require(targets.ndim == 2 and targets.shape[0] == fingerprint["n"],
            f"{targets.shape[0] if targets.ndim else 0} targets for a dataset of {fingerprint['n']} examples")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, targets)
    write_json(_meta_path(path), {**meta, "fingerprint": fingerprint, "shape": list(targets.shape),
                                  "file_bytes": path.stat().st_size})


class TargetTable:
    """Read-only targets looked up by dataset index (memory-mapped, so ImageNet-sized files are fine)."""

    def __init__(self, path: str | os.PathLike, labels, device: str | torch.device = "cpu"):
        path = Path(path)
        require(path.is_file() and _meta_path(path).is_file(),
                f"targets {path} not found; run the sharpening stage of the previous cycle first")
        meta = read_json(_meta_path(path))
        require(meta.get("file_bytes") == path.stat().st_size, f"targets {path} are corrupt; delete them and rerun")
        expected = dataset_fingerprint(labels)
        if meta.get("fingerprint") != expected:
            raise UserError(f"targets {path} belong to another dataset ({meta['fingerprint']['n']} examples, labels "
                            f"{meta['fingerprint']['labels_sha256'][:12]}) than this one ({expected['n']} examples, "
                            f"labels {expected['labels_sha256'][:12]})")
        try:
            self.array = np.load(path, mmap_mode="r")
        except ValueError as err:
            raise UserError(f"targets {path} are corrupt ({err})") from None
        self.meta = meta
        self.device = device
        self.dim = int(self.array.shape[1])

    def __len__(self) -> int:
        return int(self.array.shape[0])

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        rows = np.asarray(indices.cpu(), dtype=np.int64)
        return torch.from_numpy(np.ascontiguousarray(self.array[rows])).to(self.device)

    def all(self) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.array)).to(self.device)
