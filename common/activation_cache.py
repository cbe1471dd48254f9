"""A chunked on-disk activation cache that streams with memory bounded independently of its size.

Layout of a cache directory::

    writer.json                 settings of the writer (so a resumed extraction can check them)
    chunk_00000.npy             (rows, dim) activations, float16 by default
    chunk_00000.rows.npy        (rows, 2) int64: dataset index and label of every row
    ...
    manifest.json               written LAST: dim, count, dtype, chunk sizes and file sizes,
                                and the fingerprint of the dataset the rows came from

Every file is written atomically, and a chunk counts as finished only once its ``rows`` file
exists, so an interrupted extraction leaves finished chunks a resumed one can continue from.
Without ``manifest.json`` a cache is never read as complete.

:class:`ActivationCache` implements the :class:`~common.activations.ActivationSource` protocol:
it memory-maps one chunk at a time and, when shuffling, visits chunks in a random order and
shuffles rows within a window of a few chunks. Memory therefore depends on ``chunk_rows * window``,
never on the number of rows (ImageNet's 1.26M x 1536 cache streams in ~100 MB).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .activations import Batch
from .errors import UserError, require
from .io import read_json, save_npy, write_json
from .targets import dataset_fingerprint

FORMAT = 1
DTYPES = ("float16", "float32")
MANIFEST = "manifest.json"
WRITER = "writer.json"


def _chunk_paths(directory: Path, i: int) -> tuple[Path, Path]:
    return directory / f"chunk_{i:05d}.npy", directory / f"chunk_{i:05d}.rows.npy"


def cache_complete(directory: str | os.PathLike) -> bool:
    """True when ``directory`` holds a finished cache whose chunk files all have their recorded sizes."""
    directory = Path(directory)
    try:
        manifest = read_json(directory / MANIFEST)
        for i, (x_bytes, rows_bytes) in enumerate(manifest["chunk_bytes"]):
            x_path, rows_path = _chunk_paths(directory, i)
            if not (x_path.is_file() and x_path.stat().st_size == x_bytes
                    and rows_path.is_file() and rows_path.stat().st_size == rows_bytes):
                return False
    except (UserError, KeyError, TypeError, ValueError):
        return False
    return True


def _to_numpy(a, dtype=None) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        a = a.numpy()
    a = np.asarray(a)
    return a if dtype is None else a.astype(dtype, copy=False)


class CacheWriter:
    """Append batches of (activations, labels, dataset indices); ``finish()`` writes the manifest.

    With ``resume=True`` an unfinished cache written with the same settings is continued: its
    finished chunks are kept and :attr:`rows_done` says how many rows (in write order) they hold,
    so the caller skips that many rows of its (deterministic) input. Anything else in the
    directory is cleared and the cache starts from scratch.
    """

    def __init__(self, directory: str | os.PathLike, dim: int, *, chunk_rows: int = 8192,
                 dtype: str = "float16", resume: bool = True, settings: dict | None = None):
        require(dim > 0, f"activation width must be positive, got {dim}")
        require(chunk_rows > 0, f"chunk_rows must be positive, got {chunk_rows}")
        require(dtype in DTYPES, f"cache dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
        self.directory = Path(directory)
        self.dim, self.chunk_rows, self.dtype = int(dim), int(chunk_rows), dtype
        self.settings = {"format": FORMAT, "dim": self.dim, "chunk_rows": self.chunk_rows, "dtype": dtype,
                         **(settings or {})}
        self.directory.mkdir(parents=True, exist_ok=True)
        self._x: list[np.ndarray] = []
        self._rows: list[np.ndarray] = []
        self._buffered = 0
        self._chunk_sizes: list[int] = []
        self._chunk_bytes: list[list[int]] = []
        self._all_rows: list[np.ndarray] = []  # (index, label) of every written row: 16 bytes a row
        self.rows_done = 0
        for stale in self.directory.glob(".*.tmp"):   # a write cut short by a kill (atomic_path's temp)
            stale.unlink(missing_ok=True)
        if resume and self._can_resume():
            self._adopt_finished_chunks()
        else:
            self._clear()
            write_json(self.directory / WRITER, self.settings)

    # -- resume --------------------------------------------------------------------------------
    def _can_resume(self) -> bool:
        path = self.directory / WRITER
        if (self.directory / MANIFEST).exists() or not path.is_file():
            return False
        try:
            return read_json(path) == self.settings
        except UserError:
            return False

    def _adopt_finished_chunks(self) -> None:
        i = 0
        while True:
            x_path, rows_path = _chunk_paths(self.directory, i)
            if not (x_path.is_file() and rows_path.is_file()):
                break
            try:
                rows = np.load(rows_path)
                x = np.load(x_path, mmap_mode="r")
                ok = (x.shape == (self.chunk_rows, self.dim) and rows.shape == (self.chunk_rows, 2)
                      and x.dtype == np.dtype(self.dtype))
                del x
            except (ValueError, OSError, EOFError):
                ok = False
            if not ok:  # a short (final) or damaged chunk is written again
                break
            self._chunk_sizes.append(self.chunk_rows)
            self._chunk_bytes.append([x_path.stat().st_size, rows_path.stat().st_size])
            self._all_rows.append(rows)
            i += 1
        self._remove_chunks(from_index=i)
        self.rows_done = i * self.chunk_rows

    def _remove_chunks(self, from_index: int = 0) -> None:
        for path in self.directory.glob("chunk_*.npy"):
            try:
                index = int(path.name.split(".")[0].split("_")[1])
            except (IndexError, ValueError):
                continue
            if index >= from_index:
                path.unlink()

    def _clear(self) -> None:
        for name in (MANIFEST, WRITER):
            (self.directory / name).unlink(missing_ok=True)
        self._remove_chunks()

    # -- writing -------------------------------------------------------------------------------
    def append(self, x, labels, indices) -> None:
        x = _to_numpy(x)
        labels = _to_numpy(labels, np.int64).reshape(-1)
        indices = _to_numpy(indices, np.int64).reshape(-1)
        require(x.ndim == 2 and x.shape[1] == self.dim,
                f"activations must have shape (n, {self.dim}), got {tuple(x.shape)}")
        require(len(labels) == len(x) == len(indices),
                f"{len(x)} activations, {len(labels)} labels and {len(indices)} indices do not match")
        self._x.append(x)
        self._rows.append(np.stack([indices, labels], axis=1))
        self._buffered += len(x)
        while self._buffered >= self.chunk_rows:
            self._flush(self.chunk_rows)

    def _flush(self, n: int) -> None:
        x, rows = np.concatenate(self._x), np.concatenate(self._rows)
        with np.errstate(over="ignore"):
            chunk_x, chunk_rows = x[:n].astype(self.dtype), rows[:n]
        if not np.isfinite(chunk_x).all():
            bad = "overflow float16 (use dtype float32)" if np.isfinite(x[:n]).all() else "are not finite"
            raise UserError(f"activations written to {self.directory} {bad}")
        self._x, self._rows = ([x[n:]], [rows[n:]]) if n < len(x) else ([], [])
        self._buffered = len(x) - n
        i = len(self._chunk_sizes)
        x_path, rows_path = _chunk_paths(self.directory, i)
        save_npy(x_path, np.ascontiguousarray(chunk_x))
        save_npy(rows_path, np.ascontiguousarray(chunk_rows))  # last: marks the chunk finished
        self._chunk_sizes.append(n)
        self._chunk_bytes.append([x_path.stat().st_size, rows_path.stat().st_size])
        self._all_rows.append(chunk_rows)

    @property
    def count(self) -> int:
        return sum(self._chunk_sizes) + self._buffered

    def finish(self, fingerprint: dict | None = None, **meta) -> "ActivationCache":
        """Flush the last partial chunk and write the manifest; returns a reader of the cache.

        ``fingerprint`` identifies the dataset (see :func:`common.targets.dataset_fingerprint`);
        by default it is computed from the written labels ordered by dataset index.
        """
        if self._buffered:
            self._flush(self._buffered)
        rows = np.concatenate(self._all_rows) if self._all_rows else np.zeros((0, 2), np.int64)
        require(len(rows) > 0, f"no activations were written to {self.directory}")
        require(len(np.unique(rows[:, 0])) == len(rows),
                f"activation cache {self.directory} got the same dataset index twice")
        if fingerprint is None:
            fingerprint = dataset_fingerprint(rows[np.argsort(rows[:, 0], kind="stable"), 1])
        write_json(self.directory / MANIFEST, {
            **self.settings, "count": int(len(rows)), "chunk_sizes": self._chunk_sizes,
            "chunk_bytes": self._chunk_bytes, "fingerprint": fingerprint, "meta": meta})
        (self.directory / WRITER).unlink(missing_ok=True)
        return ActivationCache(self.directory)


class ActivationCache:
    """Read a finished cache as an :class:`~common.activations.ActivationSource`.

    ``window`` is the number of chunks shuffled together; peak memory is about
    ``window * chunk_rows * dim`` elements of the cache dtype (plus a float32 batch).
    """

    def __init__(self, directory: str | os.PathLike, window: int = 4, _mask: np.ndarray | None = None):
        self.directory = Path(directory)
        require((self.directory / MANIFEST).is_file(),
                f"activation cache {self.directory} is missing or unfinished (no {MANIFEST}); "
                f"rerun the extraction stage that writes it")
        require(cache_complete(self.directory),
                f"activation cache {self.directory} is corrupt (chunk files missing or of the wrong size); "
                f"delete the folder and rerun the extraction stage")
        require(window > 0, f"shuffle window must be positive, got {window}")
        manifest = read_json(self.directory / MANIFEST)
        require(manifest.get("format") == FORMAT, f"activation cache {self.directory} has an unknown format")
        self.manifest = manifest
        self.dim = int(manifest["dim"])
        self.dtype = manifest["dtype"]
        self.fingerprint = manifest["fingerprint"]
        self.meta = manifest.get("meta", {})
        self.window = window
        self.chunk_sizes = [int(s) for s in manifest["chunk_sizes"]]
        self._starts = np.concatenate([[0], np.cumsum(self.chunk_sizes)]).astype(np.int64)
        try:
            rows = np.concatenate([np.load(_chunk_paths(self.directory, i)[1])
                                   for i in range(len(self.chunk_sizes))])
        except (ValueError, OSError, EOFError) as err:
            raise UserError(f"activation cache {self.directory} is corrupt ({err}); delete it and rerun") from None
        require(rows.shape == (manifest["count"], 2), f"activation cache {self.directory} is corrupt (row count)")
        self._all_indices = torch.from_numpy(rows[:, 0].copy())
        self._all_labels = torch.from_numpy(rows[:, 1].copy())
        self._mask = _mask
        if _mask is None:
            self.indices, self.labels = self._all_indices, self._all_labels
        else:
            keep = torch.from_numpy(_mask)
            self.indices, self.labels = self._all_indices[keep], self._all_labels[keep]

    def __len__(self) -> int:
        return int(self.indices.numel())

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_sizes)

    def subset(self, rows) -> "ActivationCache":
        """This source restricted to some of its rows (positions 0..len-1 or a boolean mask); order is kept."""
        n, total = len(self), int(self._all_indices.numel())
        rows = _to_numpy(rows)
        if rows.dtype == bool:
            require(rows.shape == (n,), f"subset mask has {rows.size} entries for a source of {n} rows")
            rows = np.flatnonzero(rows)
        rows = rows.astype(np.int64).reshape(-1)
        require(rows.size == 0 or (rows.min() >= 0 and rows.max() < n), f"subset rows must lie in 0..{n - 1}")
        current = np.arange(total) if self._mask is None else np.flatnonzero(self._mask)
        mask = np.zeros(total, dtype=bool)
        mask[current[rows]] = True
        return ActivationCache(self.directory, self.window, _mask=mask)

    def require_dataset(self, labels, what: str = "this dataset") -> None:
        """Fail in one line when the cache was extracted from another dataset than ``labels``."""
        expected = dataset_fingerprint(labels)
        if self.fingerprint != expected:
            raise UserError(f"activation cache {self.directory} belongs to another dataset "
                            f"({self.fingerprint.get('n')} examples) than {what} ({expected['n']} examples); "
                            f"delete it and rerun the extraction")

    def _read_chunk(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Rows of chunk ``i`` (selected by the subset mask) as (activations, cache positions)."""
        start, stop = self._starts[i], self._starts[i + 1]
        positions = np.arange(start, stop)
        mapped = np.load(_chunk_paths(self.directory, i)[0], mmap_mode="r")
        if self._mask is None:
            x = np.array(mapped)
        else:
            local = np.flatnonzero(self._mask[start:stop])
            x, positions = mapped[local], positions[local]
        del mapped  # unmap now: at most one chunk is mapped at a time
        return x, positions

    def iter_batches(self, batch_size: int, shuffle: bool = False, seed: int = 0) -> Iterator[Batch]:
        require(batch_size > 0, f"batch size must be positive, got {batch_size}")
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(self.n_chunks, generator=gen).tolist() if shuffle else list(range(self.n_chunks))
        window = self.window if shuffle else 1
        carry_x = np.zeros((0, self.dim), dtype=self.dtype)
        carry_pos = np.zeros(0, dtype=np.int64)
        for w in range(0, len(order), window):
            parts = [self._read_chunk(i) for i in order[w:w + window]]
            x = np.concatenate([carry_x] + [p[0] for p in parts])
            pos = np.concatenate([carry_pos] + [p[1] for p in parts])
            del parts
            if shuffle and len(x):
                perm = torch.randperm(len(x), generator=gen).numpy()
                x, pos = x[perm], pos[perm]
            full = len(x) // batch_size * batch_size
            for s in range(0, full, batch_size):
                yield self._batch(x[s:s + batch_size], pos[s:s + batch_size])
            carry_x, carry_pos = x[full:], pos[full:]
        if len(carry_x):
            yield self._batch(carry_x, carry_pos)

    def _batch(self, x: np.ndarray, positions: np.ndarray) -> Batch:
        pos = torch.from_numpy(positions)
        return Batch(torch.from_numpy(x).float(), self._all_labels[pos], self._all_indices[pos])

    def read_all(self) -> torch.Tensor:
        """All rows as one float32 tensor, in cache order (only for caches that fit in memory)."""
        return torch.cat([b.x for b in self.iter_batches(65536)]) if len(self) else torch.empty(0, self.dim)


class CacheDataset(torch.utils.data.Dataset):
    """A finished cache as a map-style dataset of ``(x float32, label, dataset index)`` items.

    For consumers built on ``DataLoader`` (seeded or distributed samplers), e.g. fine-tuning a
    classifier head on cached features. Rows are read through per-chunk memory maps opened lazily
    in each worker, so nothing but the rows asked for is read into process memory.
    """

    def __init__(self, cache: ActivationCache):
        self.directory = cache.directory
        self.dim = cache.dim
        self._starts = cache._starts
        self._positions = (np.arange(len(cache._all_indices)) if cache._mask is None
                           else np.flatnonzero(cache._mask))
        self.labels = cache.labels
        self.indices = cache.indices
        self._maps: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self._positions)

    def __getitem__(self, i: int):
        pos = int(self._positions[i])
        chunk = int(np.searchsorted(self._starts, pos, side="right")) - 1
        mapped = self._maps.get(chunk)
        if mapped is None:
            mapped = self._maps[chunk] = np.load(_chunk_paths(self.directory, chunk)[0], mmap_mode="r")
        x = torch.from_numpy(np.array(mapped[pos - self._starts[chunk]], dtype=np.float32))
        return x, int(self.labels[i]), int(self.indices[i])

    def __getstate__(self) -> dict:  # DataLoader workers open their own maps
        return {**self.__dict__, "_maps": {}}
