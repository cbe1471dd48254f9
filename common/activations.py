"""Activation sources: anything SAE training, class means, targets and probes can stream from.

A source knows its length and width and yields :class:`Batch` es of (x, labels, dataset indices).
:class:`ArraySource` wraps in-memory tensors or NumPy arrays (including ``np.memmap``); the on-disk
chunked cache in :mod:`common.activation_cache` implements the same interface, so every consumer
works unchanged from RAM or from a dataset-sized cache on disk. :class:`EncodedSource` turns a
source into SAE codes batch by batch; :class:`ModelActivationSource` recomputes a model's hooked
activations on every pass (SAE data drawn from new augmented views each epoch).
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import TYPE_CHECKING, Iterator, NamedTuple, Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .errors import require
from .hooks import ActivationCapture

if TYPE_CHECKING:
    from .sae import SparseAutoencoder


class Batch(NamedTuple):
    x: torch.Tensor
    labels: torch.Tensor | None
    indices: torch.Tensor


class ActivationSource(Protocol):
    dim: int
    indices: torch.Tensor  # dataset index of every row, in source order

    def __len__(self) -> int: ...

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]: ...


def _as_tensor(array) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array
    return torch.from_numpy(np.ascontiguousarray(array))


class ArraySource:
    """In-memory (or memory-mapped) activations; rows are copied to float32 one batch at a time."""

    def __init__(self, x, labels=None, indices=None):
        require(getattr(x, "ndim", 0) == 2, f"activations must be a 2-d array (n, d), got shape {tuple(getattr(x, 'shape', ()))}")
        n = x.shape[0]
        require(labels is None or len(labels) == n, f"{len(labels) if labels is not None else 0} labels for {n} activations")
        require(indices is None or len(indices) == n, f"{len(indices) if indices is not None else 0} indices for {n} activations")
        self.x = x
        self.labels = None if labels is None else _as_tensor(labels).long()
        self.indices = torch.arange(n) if indices is None else _as_tensor(indices).long()
        self.dim = int(x.shape[1])

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        require(batch_size > 0, f"batch size must be positive, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                rows = slice(start, start + batch_size)
                idx_rows = torch.arange(start, min(start + batch_size, n))
            else:
                idx_rows = order[start:start + batch_size]
                rows = idx_rows.numpy() if not isinstance(self.x, torch.Tensor) else idx_rows
            x = _as_tensor(self.x[rows]).float()
            labels = None if self.labels is None else self.labels[idx_rows]
            yield Batch(x, labels, self.indices[idx_rows])


def as_source(data, labels=None, indices=None) -> ActivationSource:
    return data if hasattr(data, "iter_batches") else ArraySource(data, labels, indices)


class IterableSource:
    """Activations produced on the fly (e.g. recomputed from augmented images every epoch).

    ``make_batches(shuffle, seed)`` returns a fresh iterator of ``x`` tensors or ``(x, labels, indices)``
    tuples; ``batch_size`` is decided by that iterator. ``indices`` defaults to 0..n-1.
    """

    def __init__(self, make_batches, dim: int, length: int, indices=None):
        require(dim > 0 and length > 0, f"an iterable source needs dim > 0 and length > 0, got {dim}, {length}")
        self.make_batches, self.dim, self.length = make_batches, int(dim), int(length)
        self.indices = torch.arange(length) if indices is None else _as_tensor(indices).long()

    def __len__(self) -> int:
        return self.length

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        start = 0
        for item in self.make_batches(shuffle, seed):
            x, labels, indices = (item, None, None) if isinstance(item, torch.Tensor) else (tuple(item) + (None, None))[:3]
            require(x.ndim == 2 and x.shape[1] == self.dim, f"batch of shape {tuple(x.shape)}, expected (n, {self.dim})")
            if indices is None:
                indices = torch.arange(start, start + x.shape[0])
            start += x.shape[0]
            yield Batch(x.float(), labels, indices)


class EncodedSource:
    """SAE codes of another source, encoded one batch at a time on ``device`` (never all at once)."""

    def __init__(self, source, sae: SparseAutoencoder, device: torch.device):
        self.source, self.sae, self.device = source, sae, device
        self.dim = sae.cfg.d_sae
        self.indices = source.indices
        self.labels = getattr(source, "labels", None)

    def __len__(self) -> int:
        return len(self.source)

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        for batch in self.source.iter_batches(batch_size, shuffle, seed):
            with torch.no_grad():
                codes = self.sae.encode(batch.x.to(self.device, non_blocking=True))
            yield Batch(codes, batch.labels, batch.indices)


class ModelActivationSource:
    """Hooked activations recomputed by the model on every pass over a dataset.

    With an augmenting dataset every epoch sees new augmented views: how the authors trained the
    CIFAR SAE (authors-code §2.5). The batch size of the pass is the SAE batch size.
    """

    def __init__(self, model: nn.Module, dataset: Dataset, hook: tuple[str, str], *, dim: int, labels: torch.Tensor,
                 device: torch.device, autocast: torch.dtype | None = None, num_workers: int = 0):
        self.model, self.dataset, self.hook = model.to(device).eval(), dataset, hook
        self.dim, self.labels, self.device, self.autocast = dim, labels, device, autocast
        self.indices = torch.arange(len(dataset))
        self.num_workers = num_workers

    def __len__(self) -> int:
        return len(self.dataset)

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        loader = DataLoader(self.dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                            generator=torch.Generator().manual_seed(seed), pin_memory=self.device.type == "cuda")
        ctx = (lambda: torch.autocast(self.device.type, dtype=self.autocast)) if self.autocast else nullcontext
        with ActivationCapture(self.model, *self.hook, detach=True) as capture:
            for inputs, labels, indices in loader:
                with torch.no_grad(), ctx():  # grad mode only around the forward: the consumer trains
                    self.model(inputs.to(self.device, non_blocking=True))
                yield Batch(capture.pop().float(), torch.as_tensor(labels).long(), torch.as_tensor(indices).long())
