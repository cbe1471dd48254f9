"""Targets stored aligned by dataset index, with a fingerprint of the dataset they belong to.

Row i of a target file is the target of example i of the training split, whatever order the
loader visits examples in, so pairing is a lookup by index (the authors' MNIST code paired by
position and got it wrong, authors-code §1.5). The fingerprint (length + hash of the labels in index order)
makes loading targets against another dataset or split fail with one line.

:func:`save_targets` writes a table held in memory; :class:`TargetWriter` writes the same file
block by block (ImageNet: 1.26M x 1536) through a memory map, so the table never has to fit in RAM.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np
import torch

from . import preflight
from .errors import UserError, require
from .io import atomic_path, read_json, write_json


def dataset_fingerprint(labels, content=None) -> dict:
    """Length and label hash; ``content`` (e.g. the input array, or a list of file names) adds a hash
    of the inputs, because a stratified split of another dataset with the same class counts can
    have exactly the same label sequence."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64).reshape(-1)
    fingerprint = {"n": int(labels.size), "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    if content is not None:
        if isinstance(content, torch.Tensor):
            content = content.detach().cpu().numpy()
        raw = np.ascontiguousarray(content).tobytes() if isinstance(content, np.ndarray) else repr(content).encode()
        fingerprint["content_sha256"] = hashlib.sha256(raw).hexdigest()
    return fingerprint


def _meta_path(path: Path) -> Path:
    return path.with_suffix(".json")


def save_targets(path: str | os.PathLike, targets: torch.Tensor | np.ndarray, labels, content=None, **meta) -> None:
    """Write (n, d) targets whose row i belongs to dataset index i, plus the dataset fingerprint."""
    path = Path(path)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.float32)
    fingerprint = dataset_fingerprint(labels, content)
    require(targets.ndim == 2 and targets.shape[0] == fingerprint["n"],
            f"{targets.shape[0] if targets.ndim else 0} targets for a dataset of {fingerprint['n']} examples")
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.save(handle, targets)
    write_json(_meta_path(path), {**meta, "fingerprint": fingerprint, "shape": list(targets.shape),
                                  "file_bytes": path.stat().st_size})


class TargetWriter:
    """Stream targets into a file by dataset index; ``finish()`` renames it into place.

    ``with TargetWriter(path, labels, dim) as w: w.write(indices, rows) ...; w.finish()`` —
    every row must be written exactly once before ``finish``; leaving the block without finishing
    (an error, an interruption) deletes the temporary file, so no half-written table is left.
    The file format is that of :func:`save_targets`, read by :class:`TargetTable`; ``content`` adds
    the inputs' hash to the fingerprint, as in :func:`dataset_fingerprint`.
    """

    def __init__(self, path: str | os.PathLike, labels, dim: int, dtype: str = "float32", content=None):
        require(dim > 0, f"target width must be positive, got {dim}")
        require(dtype in ("float32", "float16"), f"target dtype must be float32 or float16, got '{dtype}'")
        self.path = Path(path)
        self.fingerprint = dataset_fingerprint(labels, content)
        self.n, self.dim = self.fingerprint["n"], int(dim)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
        os.close(fd)
        self._tmp = Path(tmp)
        self._array = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=dtype, shape=(self.n, self.dim))
        self._written = np.zeros(self.n, dtype=bool)

    def write(self, indices, rows) -> None:
        idx = np.asarray(indices.cpu() if isinstance(indices, torch.Tensor) else indices, dtype=np.int64).reshape(-1)
        rows = rows.detach().float().cpu().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        require(rows.shape == (len(idx), self.dim), f"targets must have shape ({len(idx)}, {self.dim}), got {rows.shape}")
        require(len(idx) == 0 or (idx.min() >= 0 and idx.max() < self.n),
                f"target indices must lie in 0..{self.n - 1}")
        require(not self._written[idx].any() and len(np.unique(idx)) == len(idx),
                "a target row was written twice")
        self._array[idx] = rows
        self._written[idx] = True

    def unwritten(self) -> np.ndarray:
        """Dataset indices whose rows have not been written yet."""
        return np.flatnonzero(~self._written)

    def finish(self, **meta) -> None:
        missing = int((~self._written).sum())
        require(missing == 0, f"{missing} of {self.n} target rows were never written")
        self._array.flush()
        del self._array
        os.replace(self._tmp, self.path)
        write_json(_meta_path(self.path), {**meta, "fingerprint": self.fingerprint, "shape": [self.n, self.dim],
                                           "file_bytes": self.path.stat().st_size})

    def __enter__(self) -> "TargetWriter":
        return self

    def __exit__(self, *exc) -> None:
        if self._tmp.exists():
            if hasattr(self, "_array"):
                del self._array
            self._tmp.unlink()


class TargetTable:
    """Read-only targets looked up by dataset index (memory-mapped, so ImageNet-sized files are fine)."""

    def __init__(self, path: str | os.PathLike, labels, device: str | torch.device = "cpu", content=None):
        path = Path(path)
        require(path.is_file() and _meta_path(path).is_file(),
                f"targets {path} not found; run the sharpening stage of the previous cycle first")
        meta = read_json(_meta_path(path))
        require(meta.get("file_bytes") == path.stat().st_size, f"targets {path} are corrupt; delete them and rerun")
        expected = dataset_fingerprint(labels, content)
        saved = meta.get("fingerprint") or {}
        if saved != expected:
            differs = [k for k in ("n", "labels_sha256", "content_sha256") if saved.get(k) != expected.get(k)]
            raise UserError(f"targets {path} belong to another dataset than this one (they differ in "
                            f"{', '.join(differs)}: {saved.get('n')} vs {expected['n']} examples); regenerate them "
                            f"with the sharpening stage on this dataset")
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
        return torch.from_numpy(np.array(self.array)).to(self.device)  # a writable copy


def write_targets(path: str | os.PathLike, batches, labels, dim: int, strategy: str, *, sae=None, top_idx=None,
                  k: int | None = None, random_seed: int = 0, device: str | torch.device = "cpu", dtype: str = "float32",
                  desc: str = "targets", total: int | None = None, content=None, **meta) -> None:
    """The one streaming target builder: for every batch (``.x`` activations, ``.labels``, ``.indices``)
    of a source, the rows of :func:`common.sharpening.target_rows` written at their dataset indices,
    then the table renamed into place (``meta`` goes into its JSON sidecar). ``random`` rows come from
    one ``torch.Generator`` seeded with ``random_seed``, in the order the batches arrive (for a width
    that is a multiple of 16, the rows of :func:`common.sharpening.random_targets`). ``content`` adds
    the inputs' hash to the fingerprint (:func:`dataset_fingerprint`).

    A source need not be in dataset order: row i of the table is whatever the batches say index i
    gets, so a pairing (MNIST's authors-code pairing of label i with the activations of another
    example) is a source whose row i holds those activations."""
    from tqdm.auto import tqdm

    from .sharpening import target_rows

    generator = torch.Generator().manual_seed(random_seed)
    rows = None
    with TargetWriter(path, labels, dim, dtype=dtype, content=content) as writer:
        for batch in tqdm(preflight.steps(batches, desc, total=total), desc=desc, leave=False, total=total):
            rows = target_rows(strategy, batch.x.to(device), batch.labels, sae=sae, top_idx=top_idx, k=k,
                               generator=generator)
            writer.write(batch.indices, rows)
        preflight.fill_targets(writer, rows)  # a preflight's budget stopped early: the other rows repeat these
        writer.finish(strategy=strategy, **meta)
