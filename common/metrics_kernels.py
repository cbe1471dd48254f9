"""Speed kernels behind :mod:`common.metrics` (the definitions live there, with their formulas).

Nothing here defines a score: these functions compute, exactly and fast, the quantities the
definitions in :mod:`common.metrics` combine (distances between points, class means, distances
to them, pairwise centroid distances), and check and encode the inputs. The results equal
scikit-learn's to rounding (~1e-15 relative; see tests/test_metrics_fast_paths.py).
"""
from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, NamedTuple

import numpy as np
import torch

from .errors import require
from .threads import blas_one_thread

# ----------------------------------------------------------------------------- input checks
def _matrix(X, dtype=torch.float64, device=None) -> torch.Tensor:
    X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else X
    require(X.ndim == 2, f"features must be a 2-d array (examples, features), got shape {tuple(X.shape)}")
    require(X.shape[0] > 0 and X.shape[1] > 0, f"features must not be empty, got shape {tuple(X.shape)}")
    X = X.to(device=device or X.device, dtype=dtype)
    require(bool(torch.isfinite(X).all()), "features contain NaN or infinite values")
    return X


def _labels(y, n: int | None, device=None) -> torch.Tensor:
    y = torch.as_tensor(np.asarray(y) if not isinstance(y, torch.Tensor) else y)
    require(y.ndim == 1 or (y.ndim == 2 and y.shape[1] == 1), f"labels must be 1-d, got shape {tuple(y.shape)}")
    y = y.reshape(-1)
    require(n is None or y.numel() == n, f"{y.numel()} labels for {n} examples")
    return y.to(device=device).long()


def _encode(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels -> (codes 0..K-1 in sorted label order, counts per code)."""
    if y.numel() and not y.is_floating_point():
        lo, hi = int(y.min()), int(y.max())
        if hi - lo <= 4 * y.numel() + 1024:        # compact integer labels: counting, no sort
            shifted = y - lo
            counts = torch.bincount(shifted, minlength=hi - lo + 1)
            present = counts > 0
            return (torch.cumsum(present, 0) - 1)[shifted], counts[present]
    _, inverse, counts = torch.unique(y, return_inverse=True, return_counts=True)
    return inverse, counts


def _class_sums(X: torch.Tensor, codes: torch.Tensor, n_classes: int, chunk: int = 8192) -> torch.Tensor:
    sums = torch.zeros(n_classes, X.shape[1], dtype=torch.float64, device=X.device)
    for start in range(0, X.shape[0], chunk):
        sums.index_add_(0, codes[start:start + chunk], X[start:start + chunk].to(torch.float64))
    return sums


# ----------------------------------------------------------------------------- clustering
# How the exact clustering scores stay fast (tests/benchmarks/ times them against scikit-learn):
# - the points are prepared once (:class:`_Points`), in float64: on the CPU, when at most
#   ``_SPARSE_MAX_DENSITY`` of the entries are nonzero (SAE codes: L0 ~ 50-90 of thousands), as a
#   sparse CSR matrix; otherwise (dense data, or a GPU, where the fp64 GEMM is fastest) densely;
# - squared distances are scikit-learn's |x_k|^2 + |x_i|^2 - 2 x_k.x_i in float64 (see
#   :class:`_DistanceStrips` for the CPU products: scipy's sparse x sparse product for very sparse
#   codes; for denser ones (MNIST's ~13%) a float64 GEMM per class run of a block of points over
#   the features well filled in that run, plus one sparse product (scipy's CSR kernel) for the
#   block's other nonzeros; numpy's BLAS on the whole rows when the dense copy would not fit).
#   No float32 products: float32 distances move Sil-U by
#   ~1e-7 relative on MNIST-shaped codes, past the 1e-9 the tests hold. On the CPU each distance is
#   computed once and counted for both
#   of its points (:func:`_silhouette_totals_cpu`), both silhouettes of :func:`clustering_metrics`
#   share one pass, and the points are sorted by every labeling at once so that a block's points
#   come in runs of one cluster (per-cluster sums of a strip: a scatter of rows and a segment sum);
# - CPU strips are shared out to one single-threaded worker per core, with buffers reused across
#   strips (no page faults);
# - a dense CPU input is turned into CSR by a nonzero scan shared out the same way (numpy's
#   flatnonzero on a packed bool mask of the raw bits is several times faster than torch.nonzero);
#   given the labels (Davies-Bouldin, Calinski-Harabasz), the scan stores each entry's class key
#   class * d + column, which is all the centroid scores need;
# - bookkeeping on small tensors runs on one CPU thread (:func:`_one_thread`): OpenMP's fork/join
#   costs more than such ops do, and a hundred times more when the cores are shared with other
#   processes; passes over at least ``_PARALLEL_MIN_ENTRIES`` stored entries (class sums, distances
#   to centroids) and the centroid Gram matrix of Davies-Bouldin (symmetric: its mirrored blocks are
#   computed once) use every thread;
# - Davies-Bouldin and Calinski-Harabasz allocate as few (classes x features) matrices as they can:
#   at 1000 x 6144 each is 49 MB of fresh pages, which cost as much as the arithmetic on them.
# The results equal scikit-learn's to rounding (~1e-15 relative; see tests/test_metrics_fast_paths.py).
_SPARSE_MAX_DENSITY = 0.25
_BLOCK_BYTES = 64 * 2**20
_GPU_BLOCK_BYTES = 2**30
_NNZ_SCAN_ELEMENTS = 2**22
_GATHER_CHUNK = 2**18


_outer = threading.local()   # the caller's intra-op thread count while inside _one_thread


@contextmanager
def _one_thread():
    """Run the block on one intra-op thread; yields the caller's count (for :func:`_threads` and
    worker pools), also from nested blocks."""
    before = torch.get_num_threads()
    outer = getattr(_outer, "threads", None)
    _outer.threads = outer or before
    torch.set_num_threads(1)
    try:
        yield _outer.threads
    finally:
        torch.set_num_threads(before)
        _outer.threads = outer


def _workers() -> int:
    """Cores the caller allows us: its intra-op thread count (outside _one_thread: the current one)."""
    return getattr(_outer, "threads", None) or torch.get_num_threads()


@contextmanager
def _threads(count: int):
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


_PARALLEL_MIN_ENTRIES = 2**21


def _threads_worth(P: "_Points", threads: int) -> int:
    """The threads for passes over the stored entries: one below ``_PARALLEL_MIN_ENTRIES`` entries,
    where OpenMP's fork/join costs more than the pass (much more on cores shared with others)."""
    entries = P.val.numel() if P.sparse else P.n * P.d
    return threads if entries >= _PARALLEL_MIN_ENTRIES or P.device.type != "cpu" else 1


def _valid_clusters(n_labels: int, n: int) -> bool:
    """scikit-learn's scores are defined for 2 <= clusters <= n - 1; otherwise we report NaN."""
    return 2 <= n_labels <= n - 1


class _Points:
    """Rows x_1..x_n in float64, held densely (``dense``) or as CSR arrays (``crow``, ``col``, ``val``).

    A scan that knew the rows' classes stores each entry's class key (class * d + column, for
    ``keyed_codes``) instead of its column; the columns are then derived only if something asks."""

    def __init__(self, n: int, d: int, device: torch.device, dense: torch.Tensor | None = None,
                 crow: torch.Tensor | None = None, col: torch.Tensor | None = None, val: torch.Tensor | None = None,
                 row: torch.Tensor | None = None, sq: torch.Tensor | None = None,
                 keys: torch.Tensor | None = None, keyed_codes: torch.Tensor | None = None,
                 source: torch.Tensor | None = None):
        self.n, self.d, self.device = n, d, device
        self.source = source               # the dense CPU rows these were scanned from (same order)
        self.dense, self.crow, self.val = dense, crow, val
        self._col, self._row, self._sq = col, row, sq
        self.keys, self.keyed_codes = keys, keyed_codes
        if dense is None:
            self.row_len = crow[1:] - crow[:-1]

    @property
    def col(self) -> torch.Tensor:
        if self._col is None:
            self._col = self.keys - torch.repeat_interleave(self.keyed_codes * self.d, self.row_len,
                                                            output_size=self.val.numel())
        return self._col

    @property
    def sq(self) -> torch.Tensor:
        """|x_i|^2 of every row."""
        if self._sq is None:
            self._sq = ((self.dense * self.dense).sum(dim=1) if not self.sparse
                        else torch.segment_reduce(self.val * self.val, "sum", lengths=self.row_len))
        return self._sq

    def sq_total(self) -> float:
        """sum_i |x_i|^2 (sparse: in cache-sized pieces, without a copy of the values; torch.dot on
        the CPU was off by ~1e-10 relative here, torch.sum's blocked sums are not)."""
        if not self.sparse:
            return float(self.sq.sum())
        return math.fsum(float(piece.square().sum()) for piece in self.val.split(2**16))

    @property
    def row(self) -> torch.Tensor:
        """Sparse: the row of every stored entry (made when first needed: the centroid scores do not)."""
        if self._row is None:
            self._row = torch.repeat_interleave(torch.arange(self.n, device=self.device), self.row_len,
                                                output_size=self.val.numel())
        return self._row

    @property
    def sparse(self) -> bool:
        return self.dense is None

    def permuted(self, order: torch.Tensor) -> _Points:
        """The same points in the order ``order`` (row i of the result is row order[i])."""
        if not self.sparse:
            return _Points(self.n, self.d, self.device, dense=self.dense.index_select(0, order), sq=self.sq[order])
        nnz = self.val.numel()
        lengths = self.row_len[order]
        crow = torch.nn.functional.pad(torch.cumsum(lengths, 0), (1, 0))
        row = torch.repeat_interleave(torch.arange(self.n, device=self.device), lengths, output_size=nnz)
        take = torch.arange(nnz, device=self.device) + (self.crow[:-1][order] - crow[:-1])[row]
        return _Points(self.n, self.d, self.device, crow=crow, col=self.col[take], val=self.val[take], row=row,
                       sq=self.sq[order])

    def argmax(self) -> torch.Tensor:
        """``torch.argmax`` of every row (first index of the largest entry; an all-zero row gives 0)."""
        if not self.sparse:
            return self.dense.argmax(dim=1)
        if self.source is not None and self.source.dtype in (torch.float32, torch.float64):
            # numpy's argmax of the rows scanned: the same first largest index, ~10x torch's here
            return torch.from_numpy(self.source.numpy().argmax(axis=1))
        n, dev = self.n, self.device
        top = torch.full((n,), -math.inf, dtype=torch.float64, device=dev).scatter_reduce_(
            0, self.row, self.val, "amax")
        big = torch.full((n,), self.d, dtype=torch.long, device=dev)
        first_top = big.clone().scatter_reduce_(0, self.row, torch.where(self.val == top[self.row], self.col, self.d), "amin")
        # the first column a row does not store (an implicit zero): columns are sorted within rows
        pos = torch.arange(self.col.numel(), device=dev) - self.crow[:-1][self.row]
        gap = torch.where(self.col != pos, pos, self.d)
        first_zero = torch.minimum(big.clone().scatter_reduce_(0, self.row, gap, "amin"), self.row_len)
        zero_wins = (top < 0) & (self.row_len < self.d) | (self.row_len == 0)
        return torch.where(zero_wins, first_zero.clamp_max(self.d - 1), first_top)

    def augmented(self) -> torch.Tensor:
        """Left side of the distance product: sparse, [X, |x|^2, 1] (n, d + 2) CSR; dense, X itself (the
        two norm terms are added after the product, in scikit-learn's order, instead of copying X)."""
        n, d, dev = self.n, self.d, self.device
        if not self.sparse:
            return self.dense
        crow = self.crow + 2 * torch.arange(n + 1, device=dev)
        m = int(crow[-1])
        col = torch.empty(m, dtype=torch.long, device=dev)
        val = torch.empty(m, dtype=torch.float64, device=dev)
        keep = torch.arange(self.col.numel(), device=dev) + 2 * self.row
        col[keep], val[keep] = self.col, self.val
        col[crow[1:] - 2], val[crow[1:] - 2] = d, self.sq
        col[crow[1:] - 1], val[crow[1:] - 1] = d + 1, 1.0
        return _csr(crow, col, val, (n, d + 2))

    def block_rhs(self, start: int, stop: int, out: torch.Tensor) -> torch.Tensor:
        """Right side of the distance product for points start..stop-1, written into ``out``: sparse,
        [-2 X[start:stop]^T; 1; |x|^2[start:stop]] (d + 2, m); dense, -2 X[start:stop]^T (d, m)."""
        m, d = stop - start, self.d
        if not self.sparse:
            return torch.mul(self.dense[start:stop].T, -2.0, out=out[:d * m].view(d, m))
        rhs = out[:(d + 2) * m].view(d + 2, m).zero_()
        lo, hi = int(self.crow[start]), int(self.crow[stop])
        rhs[self.col[lo:hi], self.row[lo:hi] - start] = -2.0 * self.val[lo:hi]
        rhs[d] = 1.0
        rhs[d + 1] = self.sq[start:stop]
        return rhs

    def class_keys(self, codes: torch.Tensor) -> torch.Tensor | None:
        """Sparse: flat index class * d + feature of every stored entry (shared by the two methods below)."""
        if not self.sparse:
            return None
        if self.keys is not None and codes is self.keyed_codes:
            return self.keys
        return torch.repeat_interleave(codes, self.row_len, output_size=self.val.numel()).mul_(self.d).add_(self.col)

    def class_sums(self, codes: torch.Tensor, n_classes: int, keys: torch.Tensor | None = None) -> torch.Tensor:
        if self.sparse:
            keys = self.class_keys(codes) if keys is None else keys
            # numpy's bincount (float64 sums in entry order) is faster than torch's and than index_add_
            sums = np.bincount(keys.numpy(), weights=self.val.numpy(), minlength=n_classes * self.d)
            return torch.from_numpy(sums).view(n_classes, self.d).to(torch.float64)   # (no entries: int64)
        return torch.sparse.mm(_one_hot(codes, n_classes), self.dense)

    def sq_dist_to(self, centres: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor,
                   keys: torch.Tensor | None = None, csq: torch.Tensor | None = None) -> torch.Tensor:
        """|x_i - centres[codes[i]]|^2 for every row, in float64.

        Sparse rows: |c|^2 + sum over the row's nonzeros of x_j (x_j - 2 c_j) (= (x_j - c_j)^2 - c_j^2),
        exact up to rounding of order 1e-16 |c|^2 (as accurate as scikit-learn's own |x|^2 + |c|^2 - 2 x.c);
        a row alone in its cluster is its centre, distance 0 exactly.
        """
        if not self.sparse:
            return torch.cat([((self.dense[s:s + 4096] - centres[codes[s:s + 4096]]) ** 2).sum(dim=1)
                              for s in range(0, self.n, 4096)])
        keys = self.class_keys(codes) if keys is None else keys
        csq = torch.einsum("kd,kd->k", centres, centres) if csq is None else csq
        flat, d2 = centres.reshape(-1), torch.empty(self.n, dtype=torch.float64, device=self.device)
        # rows in chunks of ~_GATHER_CHUNK entries, one worker per core: the gathers from the (K, d)
        # table miss the cache, and two cores overlap their misses; each chunk's terms stay in cache
        size = _GATHER_CHUNK
        ends = torch.searchsorted(self.crow, torch.arange(1, self.val.numel() // size + 1) * size).tolist()
        bounds = list(zip([0] + ends, ends + [self.n]))

        def chunk(rows: tuple[int, int]) -> None:
            lo, hi = int(self.crow[rows[0]]), int(self.crow[rows[1]])
            if lo == hi:                      # only empty rows (segment_reduce rejects no entries)
                d2[rows[0]:rows[1]] = 0.0
                return
            val = self.val[lo:hi]
            terms = flat.index_select(0, keys[lo:hi]).mul_(-2.0).add_(val).mul_(val)
            d2[rows[0]:rows[1]] = torch.segment_reduce(terms, "sum", lengths=self.row_len[rows[0]:rows[1]])

        with _one_thread() as threads:
            if self.device.type == "cpu" and threads > 1 and len(bounds) > 1:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(chunk, bounds))
            else:
                for rows in bounds:
                    chunk(rows)
        d2.add_(csq.index_select(0, codes)).clamp_min_(0)
        return d2.masked_fill_(counts[codes] == 1, 0.0)


def _csr(crow: torch.Tensor, col: torch.Tensor, val: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """A torch CSR matrix from arrays that are valid by construction (no checks, no beta warning)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(crow, col, val, shape, check_invariants=False)


def _one_hot(codes: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(n_classes, n) sparse CSR matrix with a 1 at (codes[i], i)."""
    counts = torch.bincount(codes, minlength=n_classes)
    crow = torch.nn.functional.pad(torch.cumsum(counts, 0), (1, 0))
    cols = torch.argsort(codes, stable=True)
    return _csr(crow, cols, torch.ones(codes.numel(), dtype=torch.float64, device=codes.device),
                (n_classes, codes.numel()))


def _sparse_input(X) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int]] | None:
    """(crow, col, val, shape) of a torch sparse tensor or a scipy.sparse matrix; None if X is neither."""
    if isinstance(X, torch.Tensor) and X.layout in (torch.sparse_coo, torch.sparse_csr):
        require(X.ndim == 2, f"features must be a 2-d array (examples, features), got shape {tuple(X.shape)}")
        X = X.to_sparse_csr() if X.layout == torch.sparse_coo else X
        return X.crow_indices(), X.col_indices(), X.values(), tuple(X.shape)
    if hasattr(X, "tocsr") and hasattr(X, "nnz"):  # scipy.sparse
        X = X.tocsr()
        X.sum_duplicates()
        X.sort_indices()
        return (torch.from_numpy(X.indptr.astype(np.int64)), torch.from_numpy(X.indices.astype(np.int64)),
                torch.from_numpy(np.asarray(X.data)), tuple(X.shape))
    return None


def _points(X, device=None, codes: torch.Tensor | None = None) -> _Points:
    """Check the features and hold them in the layout that is fastest where they will be used.

    ``codes`` (CPU, one class code per row): the rows' classes, so that a scan of dense CPU features
    can store each entry's class key (see :class:`_Points`) while the block is in cache."""
    if isinstance(X, _Points):
        return X
    sparse = _sparse_input(X)
    if sparse is None:
        X = torch.as_tensor(X) if not isinstance(X, torch.Tensor) else X
        require(X.ndim == 2, f"features must be a 2-d array (examples, features), got shape {tuple(X.shape)}")
    n, d = sparse[3] if sparse is not None else tuple(X.shape)
    require(n > 0 and d > 0, f"features must not be empty, got shape {(n, d)}")
    require(codes is None or codes.numel() == n, f"{0 if codes is None else codes.numel()} labels for {n} examples")
    device = torch.device(device) if device is not None else (X.device if sparse is None else torch.device("cpu"))
    scanned = device.type == "cpu" and sparse is None
    keyed = scanned and codes is not None
    # the scanned rows are kept for argmax only when they are the caller's (no copy held on to)
    source = X.detach() if scanned and X.device.type == "cpu" else None
    if scanned:
        X = X.detach().cpu()
        sparse = _scan_sparse(X, _SPARSE_MAX_DENSITY, _workers(), codes if keyed else None)   # checks finiteness
    if sparse is None or device.type != "cpu":
        X = _matrix(X if sparse is None else _csr(*sparse[:4]).to_dense(), device=device)
        return _Points(n, d, device, dense=X)
    if keyed:
        return _Points(n, d, device, crow=sparse.crow, val=sparse.values, keys=sparse.col, keyed_codes=codes,
                       source=source)
    if not scanned:
        require(bool(torch.isfinite(sparse[2]).all()), "features contain NaN or infinite values")
    crow, col, val = sparse[0].long(), sparse[1].long(), sparse[2].to(torch.float64)
    row = None
    if not scanned and bool((val == 0).any()):      # stored zeros: drop them (argmax assumes none)
        nz = val != 0
        row = torch.repeat_interleave(torch.arange(n), crow[1:] - crow[:-1], output_size=val.numel())[nz]
        crow = torch.nn.functional.pad(torch.cumsum(torch.bincount(row, minlength=n), 0), (1, 0))
        col, val = col[nz], val[nz]
    return _Points(n, d, device, crow=crow, col=col, val=val, row=row, source=source)


def _flatnonzero(values: torch.Tensor) -> torch.Tensor:
    """Flat indices of the nonzero entries of a CPU tensor: numpy's != and flatnonzero on the bool
    mask are several times faster than torch.nonzero (and than numpy's on the values themselves).
    Large masks are packed eight entries to a byte first: flatnonzero then visits an eighth of the
    bytes and unpacks only the nonzero ones (-40% on SAE-code blocks, ~2% of words nonzero)."""
    if values.dtype == torch.bfloat16:               # numpy has no bfloat16; float32 keeps every value
        values = values.float()
    mask = values.numpy() != 0
    if mask.size < 2**16:
        return torch.from_numpy(np.flatnonzero(mask))
    packed = np.packbits(mask)                            # first entry in the high bit, as unpackbits reads
    groups = np.flatnonzero(packed.view(np.bool_))
    hits = np.flatnonzero(np.unpackbits(packed[groups]).view(np.bool_))
    return torch.from_numpy((groups[hits >> 3] << 3) + (hits & 7))


def _all_finite(values: torch.Tensor) -> bool:
    """No NaN or infinity (min and max propagate NaN; ten times faster than isfinite(...).all())."""
    if values.numel() == 0:
        return True
    low, high = torch.aminmax(values)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _scan_block(X: torch.Tensor, start: int, stop: int, wide: bool, codes: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """(entries per row, columns, values, all finite) of the nonzeros of rows start..stop-1 of a
    contiguous X, in row-major order; with ``codes``, class keys (code * d + column) instead of the
    columns and float64 values."""
    d = X.shape[1]
    flat = X[start:stop].reshape(-1)
    if wide:  # pairs of float32 as one int64: half the words to test, then the floats of those words
        bits = flat.view(torch.int64)
        words = _flatnonzero(bits)
        pairs = bits.index_select(0, words).view(X.dtype)
        where = _flatnonzero(pairs)                            # float compare: drops -0.0
        idx = 2 * words.index_select(0, where >> 1) + (where & 1)
        values = pairs.index_select(0, where)
    else:
        bits = flat.view({8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[X.element_size()]) \
            if X.is_floating_point() else flat
        idx = _flatnonzero(bits)
        values = flat.index_select(0, idx)
        if X.is_floating_point():
            keep = _flatnonzero(values)
            idx, values = idx.index_select(0, keep), values.index_select(0, keep)
    rows = torch.div(idx, d, rounding_mode="floor")
    finite = not values.is_floating_point() or _all_finite(values)
    cols = idx.sub_(rows * d)
    if codes is not None:
        cols.add_(codes[start:stop].index_select(0, rows).mul_(d))
        values = values.to(torch.float64)
    return torch.bincount(rows, minlength=stop - start), cols, values, finite


class _Scan(NamedTuple):
    crow: torch.Tensor
    col: torch.Tensor                   # with codes: class keys code * d + column
    values: torch.Tensor                # with codes: float64
    shape: tuple[int, int]


def _scan_sparse(X: torch.Tensor, max_density: float, workers: int = 1, codes: torch.Tensor | None = None
                 ) -> _Scan | None:
    """CSR arrays of a dense matrix when at most ``max_density`` of its entries are nonzero, else None.
    With ``codes`` (one class code per row), each entry's class key code * d + column takes the
    place of its column and the values are float64 (see :class:`_Points`).

    Scans blocks of rows (one single-threaded worker per core) and gives up as soon as the budget
    of nonzeros is exceeded, so a dense matrix costs little more than one look at its first
    blocks. The scan tests raw bits (an integer view, several times faster than comparing
    floats); -0.0 is dropped afterwards. NaN or infinite values stop with a clear error.
    """
    n, d = X.shape
    X = X.contiguous()
    budget = max_density * n * d
    step = max(1, _NNZ_SCAN_ELEMENTS // d)
    wide = X.element_size() == 4 and d % 2 == 0 and X.is_floating_point()
    parts, total = [], 0
    pool = ThreadPoolExecutor(max(1, workers))
    try:
        for part in pool.map(lambda start: _scan_block(X, start, min(start + step, n), wide, codes),
                             range(0, n, step)):
            require(part[3], "features contain NaN or infinite values")
            total += part[1].numel()
            if total > budget:
                return None
            parts.append(part)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    row_len, cols, values = (torch.cat([part[j] for part in parts]) for j in range(3))
    return _Scan(torch.nn.functional.pad(torch.cumsum(row_len, 0), (1, 0)), cols, values, (n, d))


def _block_rows(n: int, budget_bytes: int | None = None, cap: int | None = None) -> int:
    """Rows per block so that one (n x block) float64 distance block takes about ``budget_bytes``."""
    rows = max(1, min(n, (budget_bytes or _BLOCK_BYTES) // (8 * max(n, 1))))
    return min(rows, cap) if cap else rows


_chunk_rows = _block_rows  # older name


def _silhouettes(X, labelings: list[torch.Tensor], chunk: int | None = None) -> list[float]:
    """Mean silhouette for several labelings of the same points, with one pass over the distances.

    Per point i: a(i) = the mean distance to the other points of its cluster, b(i) = the smallest
    mean distance to the points of another cluster, s(i) = (b - a) / max(a, b), 0 for a point alone
    in its cluster (scikit-learn's convention). Squared distances are scikit-learn's
    |x_k|^2 + |x_i|^2 - 2 x_k.x_i in float64, clamped at 0, the self-distance exactly 0.

    CPU (:func:`_silhouette_totals_cpu`): each distance is computed once and counted for both of
    its points (the matrix is symmetric), when the (clusters x points) sums fit in
    ``_SYMMETRIC_MAX_BYTES`` (``_SYMMETRIC_OTHER_MAX_BYTES`` outside the dense-copy mode);
    otherwise (and on a GPU) one block of points at a time against all.
    """
    with _one_thread() as threads:
        P = _points(X)
        del X                               # a dense copy made below must not coexist with the caller's
        n, dev = P.n, P.device
        encoded = [_encode(labels.to(dev)) for labels in labelings]
        key = torch.zeros(n, dtype=torch.long, device=dev)     # rows sorted by the labelings, first to last
        for codes, counts in encoded:
            key = key * counts.numel() + codes
        order = torch.argsort(key, stable=True) if n > 1 and bool((key[1:] < key[:-1]).any()) else None
        if order is not None:
            P = P.permuted(order)
        plans = [(codes if order is None else codes[order], counts) for codes, counts in encoded]
        if dev.type == "cpu":
            totals = _silhouette_totals_cpu(P, plans, chunk, threads)
        else:
            totals = _silhouette_totals_blocks(P, plans, chunk)
    return [total / n if _valid_clusters(int(counts.numel()), n) else math.nan
            for total, (codes, counts) in zip(totals, plans)]


def _silhouette_sum(S: torch.Tensor, codes: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """sum_i s(i) from S[c, i] = sum of |x_i - x_k| over the points k of cluster c (S is overwritten)."""
    cols = torch.arange(S.shape[1], device=S.device)
    size = counts.double()
    intra = S[codes, cols] / (size[codes] - 1)                 # 0/0 -> nan for a point alone in its cluster
    mean_other = S.div_(size[:, None])
    mean_other[codes, cols] = math.inf
    inter = mean_other.min(dim=0).values
    sil = (inter - intra) / torch.maximum(intra, inter)
    return torch.nan_to_num(sil, nan=0.0, posinf=0.0, neginf=0.0).sum()


def _silhouette_totals_blocks(P: _Points, plans: list, chunk: int | None) -> list[float]:
    """GPU: blocks of ~1 GiB of distances, one after another, each block's points against all."""
    n, dev = P.n, P.device
    lhs = P.augmented()
    step = chunk or _block_rows(n, _GPU_BLOCK_BYTES)
    totals = [0.0] * len(plans)
    for start in range(0, n, step):
        stop = min(start + step, n)
        m = stop - start
        D = torch.mm(lhs, P.block_rhs(start, stop, torch.empty((P.d + 2) * m, dtype=torch.float64, device=dev)))
        if not P.sparse:
            D.add_(P.sq[:, None]).add_(P.sq[None, start:stop])
        D.clamp_min_(0)
        cols = torch.arange(m, device=dev)
        D[start + cols, cols] = 0.0
        D.sqrt_()
        for j, (codes, counts) in enumerate(plans):
            S = torch.zeros(counts.numel(), m, dtype=torch.float64, device=dev).index_add_(0, codes, D)
            totals[j] += float(_silhouette_sum(S, codes[start:stop], counts))
    return totals


# Squared distances on the CPU, |x_k|^2 + |x_i|^2 - 2 x_k.x_i for a block of points i against the
# rows k >= first: points whose dense copy fits, see _DistanceStrips; larger dense points, numpy's
# BLAS (OpenBLAS in the numpy wheels; torch's MKL float64 GEMM ran at half its speed on an AMD
# CPU), the norms added after the product; sparse points at
# most _SPGEMM_MAX_DENSITY nonzero, scipy's sparse x sparse product (about density^2 of the dense
# product's multiply-adds), the norms added after it; sparse points above that, scipy's sparse x
# dense product of [x_k, |x_k|^2, 1] with [-2 x_i; 1; |x_i|^2], norms included.
_SPGEMM_MAX_DENSITY = 0.04
_DENSE_COPY_MAX_BYTES = 2**30         # the [x, |x|^2, 1] copy (50k x 1024 points: 0.4 GB)
_SYMMETRIC_MAX_BYTES = 2**31          # (clusters x points) float64 sums of every labeling, all workers together
_SYMMETRIC_OTHER_MAX_BYTES = 2**29    # the same in the other modes (sparse products; dense rows too large to
                                      # copy): there each piece's sums over a block cost (clusters x rows),
                                      # which at many clusters outgrows the product the symmetric pass halves
_TILE_BYTES = 2**20                   # distances per piece of a block's rows: dense products (in L2)
_SPARSE_TILE_BYTES = 2**23            # rows per piece of scipy's sparse products: ~8 MB of distances
_SPLIT_DENSE_FILL = 1 / 8             # a feature filled in more of a segment's points joins its GEMM
_SEGMENT_MIN_POINTS = 32              # a block's run of one class with fewer points joins the next
_SPARSE_COST = 6                      # time of a multiply-add of the sparse product, in GEMM ones
                                      # (scipy's kernel ~3.7e9/s, OpenBLAS's float64 GEMM ~2e10/s a core)
_RUN_SUM_MAX_RUNS = 32                # more runs along a piece's rows: transposed, then a scatter


class _DistanceStrips:
    """Squared distances of a block of points to pieces of the other points, written where the
    product allows into a buffer the caller keeps (fresh pages cost page faults).

    Dense copy (when it fits in ``_DENSE_COPY_MAX_BYTES``): the points are held as column pieces
    [x_k; |x_k|^2; 1] of ``step`` points each. A block's points, sorted by class, fall into runs
    of one class (``_segments``); a run's distances to a piece are one GEMM of [-2 x_i, 1, |x_i|^2]
    restricted to the features that fill more than ``_SPLIT_DENSE_FILL`` of the run's points (its
    class's features), and one sparse product adds the block's other nonzeros: at 10-14% nonzero
    and 10 classes, a quarter of the full GEMM's work, with float64 sums. Pieces are (m, rows)
    here, (rows, m) in the other modes (``block_axis``).
    """

    def __init__(self, P: _Points, step: int = 256, workers: int = 1, groups: torch.Tensor | None = None):
        """``groups``: a class code per point (the points sorted by it), for the dense-copy mode's
        split products; without them a block's points are one group."""
        import scipy.sparse

        self.P, self.step, self.groups = P, step, groups
        self._local = threading.local()
        self.spgemm = P.sparse and P.val.numel() <= _SPGEMM_MAX_DENSITY * P.n * P.d
        # above that density dense BLAS products beat scipy's sparse x dense one, if the copy is small
        self.sparse = self.spgemm or (P.sparse and P.n * P.d * 8 > _DENSE_COPY_MAX_BYTES)
        self.augmented = None
        n, d = P.n, P.d
        if self.dense_copy(P):
            if P.sparse:
                P.row                                             # made once, before the workers
            with ThreadPoolExecutor(max(1, workers)) as pool:   # (numpy's scatter runs without the GIL)
                self.augmented = list(pool.map(lambda s: self._piece(s, min(s + step, n)), range(0, n, step)))
        elif not P.sparse:
            self.dense = P.dense.numpy()
        elif not self.sparse:
            self.dense = _csr(P.crow, P.col, P.val, (n, d)).to_dense().numpy()
        elif self.spgemm:
            self.csr = scipy.sparse.csr_matrix((P.val.numpy(), P.col.numpy(), P.crow.numpy()), shape=(n, d))
        else:
            aug = P.augmented()
            self.csr = scipy.sparse.csr_matrix((aug.values().numpy(), aug.col_indices().numpy(),
                                                aug.crow_indices().numpy()), shape=tuple(aug.shape))
        self.block_axis = 0 if self.augmented is not None else 1
        # rows per piece in the other modes: a cache-sized (rows, m) piece for the dense products
        # (every pass after the product stays in cache), larger for scipy's sparse ones
        self.piece_rows = step if self.augmented is not None else max(
            1, (_SPARSE_TILE_BYTES if self.sparse else _TILE_BYTES) // (8 * step))

    @staticmethod
    def dense_copy(P: _Points) -> bool:
        """Whether the points are held as dense column pieces (see the class)."""
        spgemm = P.sparse and P.val.numel() <= _SPGEMM_MAX_DENSITY * P.n * P.d
        sparse = spgemm or (P.sparse and P.n * P.d * 8 > _DENSE_COPY_MAX_BYTES)
        return not sparse and P.n * (P.d + 2) * 8 <= _DENSE_COPY_MAX_BYTES

    def _piece(self, s: int, e: int) -> np.ndarray:
        """[x_k; |x_k|^2; 1] for the points k = s..e-1, (d + 2, e - s)."""
        P, d = self.P, self.P.d
        piece = np.zeros((d + 2, e - s))
        if P.sparse:
            lo, hi = int(P.crow[s]), int(P.crow[e])
            piece[P.col[lo:hi].numpy(), P.row[lo:hi].numpy() - s] = P.val[lo:hi].numpy()
        else:
            piece[:d] = P.dense[s:e].numpy().T
        piece[d] = P.sq[s:e].numpy()
        piece[d + 1] = 1.0
        return piece

    def _rows(self, first: int, last: int):
        import scipy.sparse

        A = self.csr
        lo, hi = A.indptr[first], A.indptr[last]
        return scipy.sparse.csr_matrix((A.data[lo:hi], A.indices[lo:hi], A.indptr[first:last + 1] - lo),
                                       shape=(last - first, A.shape[1]), copy=False)

    def block(self, start: int, stop: int) -> Callable[[int, int, np.ndarray], torch.Tensor]:
        """For the points start..stop-1: a function (first, last, out) giving their squared distances
        to the points first..last-1 (a piece: (m, rows) in the dense-copy mode, else (rows, m)); the
        block's side of the product is made once."""
        P, m, d = self.P, stop - start, self.P.d
        if self.augmented is not None:
            return self._split_block(start, stop)
        if not self.sparse or self.spgemm:
            rhs = self.csr[start:stop].T.tocsc() if self.sparse else -2.0 * self.dense[start:stop].T

            def strip(first: int, last: int, out: np.ndarray) -> torch.Tensor:
                G = out[:(last - first) * m].reshape(last - first, m)
                if self.sparse:
                    G.fill(0.0)
                    (self._rows(first, last) @ rhs).toarray(out=G)
                    D = torch.from_numpy(G).mul_(-2.0)
                else:
                    D = torch.from_numpy(np.matmul(self.dense[first:last], rhs, out=G))
                return D.add_(P.sq[first:last, None]).add_(P.sq[None, start:stop])
            return strip
        rhs = P.block_rhs(start, stop, torch.empty((d + 2) * m, dtype=torch.float64)).numpy()
        return lambda first, last, out: torch.from_numpy(np.asarray(self._rows(first, last) @ rhs))

    def _split_block_whole(self, start: int, stop: int) -> Callable[[int, int, np.ndarray], torch.Tensor]:
        """The block against the pieces by one GEMM over every feature."""
        d, m, step = self.P.d, stop - start, self.step
        own = self.augmented[start // step]
        lhs = np.empty((m, d + 2))
        np.multiply(own[:d].T, -2.0, out=lhs[:, :d])
        lhs[:, d] = 1.0
        lhs[:, d + 1] = own[d]

        def strip(first: int, last: int, out: np.ndarray) -> torch.Tensor:
            G = out[:m * (last - first)].reshape(m, last - first)
            return torch.from_numpy(np.matmul(lhs, self.augmented[first // step], out=G))
        return strip

    def _block_entries(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(feature, point - start, value) of the nonzeros of points start..stop-1, point by point
        and by feature within a point (sparse points: slices of the CSR arrays, O(nonzeros))."""
        P = self.P
        if P.sparse:
            lo, hi = int(P.crow[start]), int(P.crow[stop])
            return P.col[lo:hi].numpy(), (P.row[lo:hi] - start).numpy(), P.val[lo:hi].numpy()
        X = P.dense[start:stop].numpy()
        points, features = np.nonzero(X)
        return features, points, X[points, features]

    def _gathered(self, rows: int, cols: int) -> torch.Tensor:
        """This thread's (rows, cols) buffer for some rows of a piece (kept: fresh pages cost page faults)."""
        buf = getattr(self._local, "gathered", None)
        if buf is None or buf.numel() < rows * cols:
            buf = self._local.gathered = torch.empty(max(rows * cols, (self.P.d + 2) * self.step), dtype=torch.float64)
        return buf[:rows * cols].view(rows, cols)

    def _segments(self, start: int, stop: int) -> list[int]:
        """Offsets 0 = a_0 < a_1 < ... = m of the runs of one group (class) among points
        start..stop-1, runs of fewer than ``_SEGMENT_MIN_POINTS`` joined to the next one."""
        m = stop - start
        if self.groups is None:
            return [0, m]
        g = self.groups[start:stop]
        cuts = [0]
        for c in (torch.nonzero(g[1:] != g[:-1]).flatten() + 1).tolist() + [m]:
            if c - cuts[-1] >= _SEGMENT_MIN_POINTS:
                cuts.append(c)
        if cuts[-1] != m:                                          # a short last run joins the one before
            cuts[-1:] = [m] if len(cuts) > 1 else [0, m]
        return cuts

    def _split_block(self, start: int, stop: int) -> Callable[[int, int, np.ndarray], torch.Tensor]:
        d, m, step = self.P.d, stop - start, self.step
        own = self.augmented[start // step]                       # (d + 2, m)
        features, points, values = self._block_entries(start, stop)
        # per segment (a run of one class): a GEMM over the features that fill its points
        cuts = self._segments(start, stop)
        at = np.searchsorted(points, cuts)                         # entries of each segment
        is_dense = np.zeros((len(cuts) - 1, d), dtype=bool)
        gemms, cost = [], 0
        for j, (a, b) in enumerate(zip(cuts[:-1], cuts[1:])):
            filled = np.bincount(features[at[j]:at[j + 1]], minlength=d)
            dense = np.flatnonzero(filled > _SPLIT_DENSE_FILL * (b - a))
            is_dense[j, dense] = True
            gemms.append((a, b, dense))
            cost += (b - a) * (dense.size + 2)
        segment = np.repeat(np.arange(len(cuts) - 1), np.diff(at))
        rare = ~is_dense[segment, features]                         # the block's other nonzeros
        n_rare = int(np.count_nonzero(rare))
        # the sparse product costs ~_SPARSE_COST GEMM multiply-adds per nonzero: with many scattered
        # nonzeros (points of many classes in one block) the whole GEMM is faster
        if (cost + _SPARSE_COST * n_rare) / m >= 0.8 * (d + 2):
            return self._split_block_whole(start, stop)
        parts = []
        for a, b, dense in gemms:
            lhs = np.empty((b - a, dense.size + 2))
            np.multiply(own[dense, a:b].T, -2.0, out=lhs[:, :dense.size])
            lhs[:, dense.size] = 1.0                               # times |x_k|^2
            lhs[:, dense.size + 1] = own[d, a:b]                   # |x_i|^2, times 1
            parts.append((a, b, lhs, None if dense.size == d else torch.from_numpy(np.r_[dense, d, d + 1])))
        # (m, d) sparse matrix of -2 x_i on the rare features
        product = _SparseProduct(points[rare], features[rare], -2.0 * values[rare], (m, d)) if n_rare else None

        def strip(first: int, last: int, out: np.ndarray) -> torch.Tensor:
            piece = self.augmented[first // step]
            G = out[:m * (last - first)].reshape(m, last - first)
            for a, b, lhs, take in parts:
                # the piece's rows of the segment's features, gathered into a kept buffer (torch's
                # index_select: it runs without the GIL, numpy's take with out= is buffered)
                rhs = piece if take is None else torch.index_select(
                    torch.from_numpy(piece), 0, take, out=self._gathered(take.numel(), last - first)).numpy()
                np.matmul(lhs, rhs, out=G[a:b])
            if product is not None:
                product.add_to(G, piece[:d])
            return torch.from_numpy(G)
        return strip


class _SparseProduct:
    """A sparse (rows, cols) matrix A, from its entries in row-major order, whose product with a
    dense C-ordered B (cols, k) is added in place to a dense C-ordered (rows, k) array: scipy's CSR
    kernel (an axpy of a row of B per nonzero; ~1.5x torch's sparse addmm here), or torch's addmm_
    if scipy's kernel is not there."""

    def __init__(self, rows: np.ndarray, cols: np.ndarray, values: np.ndarray, shape: tuple[int, int]):
        self.shape = shape
        self.indptr = np.zeros(shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(rows, minlength=shape[0]), out=self.indptr[1:])
        self.indices, self.data = cols.astype(np.int64), values
        self._kernel = _scipy_csr_matvecs()
        self._torch = None if self._kernel is not None else _csr(
            torch.from_numpy(self.indptr), torch.from_numpy(self.indices), torch.from_numpy(self.data), shape)

    def add_to(self, out: np.ndarray, B: np.ndarray) -> None:
        assert out.flags.c_contiguous and B.flags.c_contiguous     # (a reshaped copy would take the sums)
        if self._torch is not None:
            torch.from_numpy(out).addmm_(self._torch, torch.from_numpy(B))
            return
        self._kernel(self.shape[0], self.shape[1], B.shape[1], self.indptr, self.indices, self.data,
                     B.reshape(-1), out.reshape(-1))


def _scipy_csr_matvecs():
    """scipy's Y += A X for CSR A and dense X, Y (private but long-standing); None if it is gone."""
    try:
        from scipy.sparse._sparsetools import csr_matvecs
    except ImportError:                                          # pragma: no cover
        return None
    return csr_matvecs


def _silhouette_totals_cpu(P: _Points, plans: list, chunk: int | None, threads: int) -> list[float]:
    """sum_i s(i) per labeling, blocks of points shared out to one single-threaded worker per core
    (no synchronisation between them); the BLAS runs on one thread inside each worker.

    Symmetric (when the sums fit): block start..stop meets the points k >= start, each distance
    counted for both of its points: the other points' cluster sums go to the block's points, the
    block's cluster sums to the points after it. One-sided otherwise: each block against every
    point, its silhouettes complete at once. The other points come in cache-sized pieces, so that
    every pass after the product runs in cache."""
    n = P.n
    clusters = sum(int(counts.numel()) for _, counts in plans)
    workers = max(1, threads)
    dense_copy = _DistanceStrips.dense_copy(P)
    symmetric = workers * clusters * n * 8 <= (_SYMMETRIC_MAX_BYTES if dense_copy else _SYMMETRIC_OTHER_MAX_BYTES)
    # blocks of 512 points for the dense-copy GEMMs (their pieces are cache-sized whatever n), else
    # 256 (symmetric) or as many as keep a block's distances to every point near _BLOCK_BYTES
    step = min(n, chunk or (512 if dense_copy else 256 if symmetric else _block_rows(n, cap=512)))
    strips = _DistanceStrips(P, step, workers, plans[0][0])
    rows, block_axis = strips.piece_rows, strips.block_axis
    starts = list(range(0, n, step))
    workers = min(workers, len(starts))
    # blocks dealt out back and forth (0 1 1 0 0 1 ...): symmetric blocks shrink along the way
    mine = [[s for i, s in enumerate(starts) if (i % workers if i // workers % 2 == 0 else workers - 1 - i % workers) == w]
            for w in range(workers)]
    # the points are sorted by their clusters under every labeling at once: each labeling is
    # constant on the runs between these positions, so sums along contiguous memory are segment sums
    new_run = torch.zeros(n, dtype=torch.bool)
    new_run[0] = True
    for codes, _ in plans:
        new_run[1:] |= codes[1:] != codes[:-1]
    run_starts = torch.nonzero(new_run).flatten().numpy()
    local = threading.local()

    def pieces(start: int, stop: int, first: int):
        """(lo, hi, |x_i - x_k|) for i in start..stop-1 and the points k = lo..hi-1 from ``first`` on."""
        if not hasattr(local, "buf"):
            local.buf = np.empty(rows * step, dtype=np.float64)
        strip = strips.block(start, stop)
        for lo in range(first, n, rows):
            hi = min(lo + rows, n)
            D = strip(lo, hi, local.buf).numpy()
            np.maximum(D, 0.0, out=D)
            a, b = max(lo, start), min(hi, stop)       # pairs of a point with itself: distance 0
            if a < b:
                own = (slice(a - start, b - start), slice(a - lo, b - lo))
                np.fill_diagonal(D[own if block_axis == 0 else own[::-1]], 0.0)
            yield lo, hi, torch.from_numpy(np.sqrt(D, out=D))     # numpy's sqrt: faster than torch's here

    def add_sums(D: torch.Tensor, axis: int, a: int, b: int, outs: list[torch.Tensor]) -> None:
        """outs[j] (clusters, other axis) += the sums of D over the points a..b-1 that lie along
        ``axis``, per cluster of labeling j."""
        if axis == 0:
            for out, (codes, _) in zip(outs, plans):
                out.index_add_(0, codes[a:b], D)
            return
        runs = np.r_[a, run_starts[np.searchsorted(run_starts, a, "right"):np.searchsorted(run_starts, b)]]
        if runs.size <= _RUN_SUM_MAX_RUNS:
            run_sums = torch.from_numpy(np.add.reduceat(D.numpy(), runs - a, axis=1)).T
            for out, (codes, _) in zip(outs, plans):
                out.index_add_(0, codes[torch.from_numpy(runs)], run_sums)
        else:
            DT = D.T.contiguous()
            for out, (codes, _) in zip(outs, plans):
                out.index_add_(0, codes[a:b], DT)

    def zeros(width: int, reuse: bool = False) -> list[torch.Tensor]:
        """Zeroed (clusters, width) sums per labeling; ``reuse``: in buffers the worker keeps (fresh
        pages of a new allocation would cost page faults on every piece)."""
        if not reuse:
            return [torch.zeros(counts.numel(), width, dtype=torch.float64) for _, counts in plans]
        if not hasattr(local, "sums"):
            local.sums = [torch.empty(counts.numel() * max(rows, step), dtype=torch.float64) for _, counts in plans]
        return [buf[:counts.numel() * width].view(counts.numel(), width).zero_()
                for buf, (_, counts) in zip(local.sums, plans)]

    def symmetric_worker(w: int) -> list[torch.Tensor]:
        torch.set_num_threads(1)       # this thread's own OpenMP count starts at the default
        sums = zeros(n)                                        # (clusters, points) per labeling
        for start in mine[w]:
            stop = min(start + step, n)
            own = zeros(stop - start)
            # the block's runs: rows (m, pieces) of the dense-copy mode are summed per run first
            first_of_run = new_run[start:stop].clone()
            first_of_run[0] = True
            run_index = torch.cumsum(first_of_run, 0) - 1
            run_codes = [codes[start:stop][first_of_run] for codes, _ in plans]
            for lo, hi, D in pieces(start, stop, start):
                add_sums(D, 1 - block_axis, lo, hi, own)       # the piece's clusters, for the block's points
                below = max(lo, stop)
                if below >= hi:
                    continue
                if block_axis == 0:                            # the block's clusters, for the points after it
                    run_sums = torch.zeros(int(run_index[-1]) + 1, hi - below, dtype=torch.float64)
                    run_sums.index_add_(0, run_index, D[:, below - lo:])
                    for S, codes in zip(sums, run_codes):      # (runs, rows): small next to (clusters, rows)
                        S[:, below:hi].index_add_(0, codes, run_sums)
                else:
                    theirs = zeros(hi - below, reuse=True)
                    add_sums(D[below - lo:], block_axis, start, stop, theirs)
                    for S, part in zip(sums, theirs):
                        S[:, below:hi] += part
            for S, part in zip(sums, own):
                S[:, start:stop] += part
        return sums

    def one_sided_worker(w: int) -> list[float]:
        torch.set_num_threads(1)
        totals = [0.0] * len(plans)
        for start in mine[w]:
            stop = min(start + step, n)
            own = zeros(stop - start)
            for lo, hi, D in pieces(start, stop, 0):
                add_sums(D, 1 - block_axis, lo, hi, own)
            for j, (S, (codes, counts)) in enumerate(zip(own, plans)):
                totals[j] += float(_silhouette_sum(S, codes[start:stop], counts))
        return totals

    with blas_one_thread():
        with ThreadPoolExecutor(workers) as pool:
            parts = list(pool.map(symmetric_worker if symmetric else one_sided_worker, range(workers)))
    if not symmetric:
        return [sum(part[j] for part in parts) for j in range(len(plans))]     # in worker order
    totals = []
    for j, (codes, counts) in enumerate(plans):
        S = parts[0][j]
        for part in parts[1:]:
            S.add_(part[j])
        totals.append(float(_silhouette_sum(S, codes, counts)))
    return totals


class _CentroidStats(NamedTuple):
    centroids: torch.Tensor     # (K, d) class means, float64
    csq: torch.Tensor           # (K,) their squared norms
    sq_dist: torch.Tensor       # (n,) squared distance of every point to its class mean
    used: torch.Tensor          # (d,) bool: features where some centroid is nonzero


def _centroids(P: _Points, codes: torch.Tensor, counts: torch.Tensor
               ) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """(class keys of the stored entries, class means (K, d), their squared norms), with one (K, d)
    matrix allocated (at K = 1000, d = 6144 each is 49 MB, and fresh pages cost as much as the work)."""
    keys = P.class_keys(codes)
    centroids = P.class_sums(codes, counts.numel(), keys).div_(counts.double().unsqueeze(1))
    return keys, centroids, torch.einsum("kd,kd->k", centroids, centroids)


def _centroid_stats(P: _Points, codes: torch.Tensor, counts: torch.Tensor) -> _CentroidStats:
    """Class means and the distances of the points to them."""
    keys, centroids, csq = _centroids(P, codes, counts)
    used = centroids.ne(0).any(dim=0)
    return _CentroidStats(centroids, csq, P.sq_dist_to(centroids, codes, counts, keys, csq), used)


def _grouped(P: _Points, codes: torch.Tensor, *more: torch.Tensor) -> tuple:
    """The points and their codes reordered so that each code's points are contiguous; with more
    labelings, sorted by all of them at once (by ``codes``, then by the next, ...), as
    :func:`_silhouettes` wants them (it then needs no copy of its own)."""
    key = codes
    for labels in more:
        labels, counts = _encode(labels)
        key = key * counts.numel() + labels
    if P.n > 1 and bool((key[1:] < key[:-1]).any()):
        order = torch.argsort(key, stable=True)
        return (P.permuted(order), codes[order], *(labels[order] for labels in more))
    return (P, codes, *more)


# Davies-Bouldin compares every pair of centroids. On a CPU the float64 Gram matrix of K = 1000
# centroids of d = 6144 features is most of the score's time; a float32 Gram matrix takes half as
# long and, with a rigorous bound on its error, says which pairs can hold a row's largest ratio:
# only those are recomputed in float64, so the score is the float64 one (see _worst_ratios).
_FLOAT32_GRAM_MIN_WORK = 2**26      # K * K * d below this: the float64 Gram matrix directly
_FLOAT32_GRAM_MAX_CANDIDATES = 8    # per centroid, on average; more (near-ties): float64 throughout


def _gram(A: torch.Tensor) -> torch.Tensor:
    """A @ A.T on the CPU with each off-diagonal block of rows computed once and mirrored: the
    product is symmetric, and four row blocks take 10/16 of the multiply-adds."""
    K = A.shape[0]
    if K < 512 or A.device.type != "cpu":
        return A @ A.T
    out = torch.empty(K, K, dtype=A.dtype)
    edges = [K * i // 4 for i in range(5)]
    blocks = [slice(edges[i], edges[i + 1]) for i in range(4)]
    for a, rows in enumerate(blocks):
        for cols in blocks[a:]:
            torch.mm(A[rows], A[cols].T, out=out[rows, cols])
            if cols != rows:
                out[cols, rows] = out[rows, cols].T
    return out


def _worst_ratios_float64(centroids: torch.Tensor, csq: torch.Tensor, intra: torch.Tensor,
                          threads: int) -> torch.Tensor | None:
    """max_j (s_i + s_j) / |c_i - c_j| for every i (a zero distance counts as infinite, as in
    scikit-learn); None when every centroid distance is ~0 (scikit-learn's score is then 0)."""
    with _threads(threads):
        gram = _gram(centroids)
    between = (csq[:, None] + csq[None, :] - 2.0 * gram).clamp_min_(0)
    between.fill_diagonal_(0.0)
    between = between.sqrt_()
    if torch.allclose(between, torch.zeros_like(between)):
        return None
    between[between == 0] = math.inf
    return ((intra[:, None] + intra[None, :]) / between).max(dim=1).values


def _worst_ratios(centroids: torch.Tensor, csq: torch.Tensor, intra: torch.Tensor,
                  threads: int) -> torch.Tensor | None:
    """:func:`_worst_ratios_float64`, from a float32 Gram matrix where that is faster and provably
    gives the same maxima.

    With the centroids scaled to norms <= 1 (ratios do not change), the float32 Gram matrix of
    their float32 roundings is within gamma |c_i| |c_j| <= gamma (|c_i|^2 + |c_j|^2) / 2 of the
    exact one, gamma = 1.01 (d + 2) u (u = 2^-24: rounding each input, then any order of d - 1
    additions), so each squared distance, evaluated in float32 as |c_i|^2 + |c_j|^2 - 2 g_ij, lies
    within a margin of a few gamma (|c_i|^2 + |c_j|^2) of the exact one. That bounds each squared
    ratio (s_i + s_j)^2 / d_ij^2 from both sides; a pair whose upper bound is below its row's
    largest lower bound cannot be the row's maximum, and the remaining candidates (about one
    per row) are recomputed in float64. (Their distances come from the differences, which is
    at least as accurate as scikit-learn's |c_i|^2 + |c_j|^2 - 2 c_i.c_j; the two differ beyond
    rounding only for centroids that coincide, where scikit-learn's ratio is rounding noise.)
    """
    K, d = centroids.shape
    top = float(csq.max()) ** 0.5
    fast = (centroids.device.type == "cpu" and K * K * d >= _FLOAT32_GRAM_MIN_WORK and 1e-30 < top < 1e30
            and torch.get_float32_matmul_precision() == "highest")
    if not fast:
        return _worst_ratios_float64(centroids, csq, intra, threads)
    scale = 2.0 ** -math.ceil(math.log2(top))      # a power of two: scaling is exact, norms <= 1
    with _threads(threads):
        unit = centroids.float().mul_(scale)
        gram = _gram(unit)
        u = 2.0 ** -24
        margin_coeff = 1.05 * (1.01 * (d + 2) * u + 16 * u)
        csq32 = csq.float().mul_(scale * scale)
        both = csq32[:, None] + csq32[None, :]
        approx = both.sub_(gram, alpha=2.0)                            # in place: gram is not needed again
        # + 1e-30: float32 underflow of tiny entries (at most d * 2^-149 absolute)
        margin = torch.mul(csq32[:, None] + csq32[None, :], margin_coeff).add_(1e-30)
        lo = approx - margin
        hi = approx.add_(margin)
        pair = intra.float().mul_(scale)
        pair_sq = (pair[:, None] + pair[None, :]).square_()
        maybe_zero = lo <= 0                # a distance that may be 0 may give ratio 0 (0 counts as infinite)
        lower_sq = torch.div(pair_sq, hi).nan_to_num_(nan=0.0, posinf=0.0).clamp_min_(0).masked_fill_(maybe_zero, 0.0)
        upper_sq = pair_sq.div_(lo).masked_fill_(maybe_zero, math.inf)
        lower_sq.fill_diagonal_(0.0)
        upper_sq.fill_diagonal_(0.0)
        candidates = upper_sq.mul_(1.0 + 1e-5) >= lower_sq.max(dim=1, keepdim=True).values
        candidates.fill_diagonal_(False)
        if not float(lo.max()) > 1e-16 * scale * scale:   # every distance could be <= 1e-8, scikit-learn's
            return _worst_ratios_float64(centroids, csq, intra, threads)
        rows, cols = torch.nonzero(candidates, as_tuple=True)
        if rows.numel() > _FLOAT32_GRAM_MAX_CANDIDATES * K:
            return _worst_ratios_float64(centroids, csq, intra, threads)
        # |c_i - c_j| of the candidates from the differences (exactly 0 for coinciding centroids,
        # where the Gram form leaves rounding noise), in chunks of cache-sized (step, d) slices
        step = max(1, 2**18 // d)
        dist = torch.cat([(centroids.index_select(0, rows[s:s + step]) - centroids.index_select(0, cols[s:s + step]))
                          .square_().sum(dim=1) for s in range(0, rows.numel(), step)]).sqrt_()
    ratio = torch.where(dist > 0, (intra[rows] + intra[cols]) / dist, 0.0)
    return torch.zeros(K, dtype=torch.float64, device=centroids.device).scatter_reduce_(
        0, rows, ratio, "amax", include_self=True)


def _davies_bouldin(stats: _CentroidStats, codes: torch.Tensor, counts: torch.Tensor, threads: int) -> float:
    K = counts.numel()
    intra = torch.zeros(K, dtype=torch.float64, device=codes.device).index_add_(0, codes, stats.sq_dist.sqrt())
    intra /= counts.double()
    if torch.allclose(intra, torch.zeros_like(intra)):
        return 0.0
    centroids = stats.centroids
    if int(stats.used.sum()) < 0.9 * stats.used.numel():   # unused features add nothing to the distances
        centroids = centroids[:, stats.used]
    worst = _worst_ratios(centroids, stats.csq, intra, threads)
    return 0.0 if worst is None else float(worst.mean())


def _labelled_score(X, labels, score: Callable[[_Points, torch.Tensor, torch.Tensor, int], float]) -> float:
    """``score(points, label codes, class counts, threads)`` on one intra-op thread (``threads``:
    the caller's count, for the passes that use every core); NaN where scikit-learn's score is
    undefined (fewer than 2 or more than n - 1 classes)."""
    with _one_thread() as threads:
        codes, counts = _encode(_labels(labels, None, "cpu"))
        P = _points(X, codes=codes)        # a scan of dense features stores class keys with the entries
        if not _valid_clusters(counts.numel(), P.n):
            return math.nan
        return score(P, codes.to(P.device), counts.to(P.device), _threads_worth(P, threads))
