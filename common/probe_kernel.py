"""Fast evaluation of the multinomial logistic objective that :func:`common.probes.logistic_objective`
defines (value and gradient, in scikit-learn's parameter layout), for the L-BFGS-B fit of the probe.

The same numbers, computed in less time:

- Features that are zero on every training row (dead SAE latents: 171 of 256 on the seed-42 MNIST
  codes) are left out of the products. Their gradient is the penalty term alone, so from the zero
  start their coefficients stay exactly 0, as they do in scikit-learn's fit.
- The intercept rides along as a column of ones, so each product also adds it (forward) and sums
  the residuals (backward).
- Dense codes: the two products run in the codes' own precision (float32 codes: float32 products,
  weights rounded to float32 first, as scikit-learn computes them); softmax, loss and all sums over
  rows are float64, and the gradient is accumulated in float64 across row blocks. Very sparse codes
  (below ``SPARSE_DENSITY`` nonzero among the kept features) go through a float64 CSR matrix.
- Rows are processed in blocks of about ``BLOCK_BYTES`` of codes, each block's logits class-major
  (classes x rows: the softmax over ~10 classes is a few vectorised passes over contiguous rows),
  so that the softmax and the gradient product find the block still in cache. Every buffer is
  allocated once, in the constructor.
- ``workers=N`` splits the blocks of a dense problem into N contiguous runs, one per thread (each
  single-threaded, with buffers of its own; numpy and torch let go of the GIL inside the products
  and passes). Every block's log-loss and gradient product is kept and the blocks are summed in
  their order afterwards, so the value and gradient are bit for bit those of one worker.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import scipy.sparse as sp
import torch

SPARSE_DENSITY = 0.05  # below this share of nonzeros among the kept features, CSR products are faster
BLOCK_BYTES = 1 << 19  # codes per row block (bytes): the block, its logits and residual stay in cache


def _squared_norm(a: np.ndarray) -> float:
    flat = np.ravel(a, order="K")  # memory order, as scikit-learn sums it
    return float(np.dot(flat, flat))


class _Block:
    """Rows [start, stop) of the codes."""

    def __init__(self, start: int, stop: int, y: np.ndarray):
        self.start, self.stop = start, stop
        # flat positions of (true class, row) in the block's class-major logits
        self.true_positions = y[start:stop] * (stop - start) + np.arange(stop - start)


class _Workspace:
    """The buffers one worker's blocks are computed in: per block length, the class-major float64
    logits (which become the residual P - Y in place) and two per-row vectors; for dense codes, the
    products in the codes' precision."""

    def __init__(self, lengths: set[int], n_classes: int, width: int, dtype: np.dtype, dense: bool):
        self.softmax = {}
        for length in lengths:
            logits, row_max, row_sum = np.empty((n_classes, length)), np.empty(length), np.empty(length)
            self.softmax[length] = (logits, row_max, row_sum, torch.from_numpy(logits), torch.from_numpy(row_sum))
        if dense:
            longest = max(lengths)
            self.products = np.empty((longest, n_classes), dtype=dtype)   # rows x classes
            self.residual = np.empty((n_classes, longest), dtype=dtype)


class LogisticObjectiveKernel:
    """``kernel(coef) -> (loss, gradient)``: the L2-penalised mean multinomial log-loss of
    ``common.probes.logistic_objective`` for fixed dense codes ``x`` (rows x features), class indices
    ``y`` (0..n_classes-1) and penalty ``l2_strength``; ``coef`` is the flat float64 vector in
    scikit-learn's layout, ``(n_classes, n_features + 1)`` raveled in Fortran order (intercept
    last). ``workers``: threads over the row blocks of dense codes (same numbers; :meth:`close`
    ends them)."""

    def __init__(self, x, y: np.ndarray, n_classes: int, l2_strength: float, block_bytes: int = BLOCK_BYTES,
                 workers: int = 1):
        x = np.asarray(x)
        n_rows, n_features = x.shape
        self.n_rows, self.n_features, self.n_classes = n_rows, n_features, n_classes
        self.l2_strength = float(l2_strength)
        y = np.asarray(y, dtype=np.intp)
        nonzero_per_column = np.count_nonzero(x, axis=0)
        self.live = np.flatnonzero(nonzero_per_column)
        width = len(self.live) + 1  # kept features and the intercept's column of ones
        self.sparse = bool(nonzero_per_column.sum() < SPARSE_DENSITY * n_rows * max(1, len(self.live)))
        if self.sparse:
            self.dtype = np.dtype(np.float64)
            self.x = sp.hstack([sp.csr_matrix(x[:, self.live]), sp.csr_matrix(np.ones((n_rows, 1)))],
                               format="csr", dtype=np.float64)
            self.x_t = self.x.T.tocsr()  # (features + 1) x rows, for the gradient product
            step = n_rows
        else:
            self.dtype = np.dtype(np.float32 if x.dtype == np.float32 else np.float64)
            self.x = np.empty((n_rows, width), dtype=self.dtype)
            self.x[:, :-1] = x[:, self.live]
            self.x[:, -1] = 1.0
            step = int(max(64, block_bytes // (width * self.dtype.itemsize)))
        k = n_classes
        self.blocks = [_Block(start, min(n_rows, start + step), y) for start in range(0, n_rows, step)]
        lengths = {b.stop - b.start for b in self.blocks}
        self.workers = max(1, min(int(workers), 1 if self.sparse else len(self.blocks)))
        # worker w computes the blocks runs[w] (contiguous), each into its own slot of the two
        # per-block outputs; __call__ sums the slots in block order
        bounds = np.linspace(0, len(self.blocks), self.workers + 1).round().astype(int)
        self.runs = [range(bounds[w], bounds[w + 1]) for w in range(self.workers)]
        self.spaces = [_Workspace(lengths, k, width, self.dtype, not self.sparse) for _ in range(self.workers)]
        self.block_losses = np.empty(len(self.blocks))                        # float64 log-loss sums
        self.block_grads = np.empty((len(self.blocks), k, width), dtype=self.dtype)   # residual @ x[block]
        self.pool = ThreadPoolExecutor(self.workers - 1, initializer=torch.set_num_threads, initargs=(1,)) \
            if self.workers > 1 else None
        self.weights = np.empty((k, width), dtype=self.dtype)         # kept weights and the intercept
        self.grad_sum = np.empty((k, width))                          # float64 sum over blocks
        self.grad = np.empty((k, n_features + 1), order="F")

    def __call__(self, coef: np.ndarray) -> tuple[float, np.ndarray]:
        k, n = self.n_classes, self.n_rows
        full = coef.reshape((k, self.n_features + 1), order="F")
        weights = full[:, :-1]
        self.weights[:, :-1] = weights[:, self.live]  # rounded to the codes' precision, as scikit-learn does
        self.weights[:, -1] = full[:, -1]
        others = [self.pool.submit(self._run, w) for w in range(1, self.workers)] if self.pool else []
        self._run(0)
        for other in others:
            other.result()
        self.grad_sum[:] = 0.0
        log_loss_sum = 0.0
        for i in range(len(self.blocks)):  # in block order, as one worker adds them
            log_loss_sum += float(self.block_losses[i])
            self.grad_sum += self.block_grads[i]
        grad = self.grad
        np.multiply(weights, self.l2_strength, out=grad[:, :-1])
        self.grad_sum /= n
        grad[:, self.live] += self.grad_sum[:, :-1]
        grad[:, -1] = self.grad_sum[:, -1]
        loss = log_loss_sum / n + 0.5 * self.l2_strength * _squared_norm(weights)
        return loss, grad.ravel(order="F")

    def close(self) -> None:
        """Ends the worker threads (a kernel with one worker has none)."""
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def _run(self, worker: int) -> None:
        space = self.spaces[worker]
        for i in self.runs[worker]:
            block = self.blocks[i]
            logits, row_max, row_sum, logits_torch, row_sum_torch = space.softmax[block.stop - block.start]
            self._logits_into(block, space, logits)
            self.block_losses[i] = _residual_in_place(block, logits, row_max, row_sum, logits_torch, row_sum_torch)
            self._residual_product(block, space, logits, self.block_grads[i])

    def _logits_into(self, block: _Block, space: _Workspace, logits: np.ndarray) -> None:
        """logits (classes x block rows, float64) = weights @ x[block].T, intercept included."""
        if self.sparse:
            np.copyto(logits, (self.x @ self.weights.T).T)
            return
        products = space.products[:block.stop - block.start]
        np.matmul(self.x[block.start:block.stop], self.weights.T, out=products)  # the faster BLAS shape
        np.copyto(logits, products.T)

    def _residual_product(self, block: _Block, space: _Workspace, residual64: np.ndarray, out: np.ndarray) -> None:
        """out = residual @ x[block], in the codes' precision (float64 for CSR)."""
        if self.sparse:
            np.copyto(out, (self.x_t @ residual64.T).T)
            return
        residual = space.residual[:, :block.stop - block.start]
        np.copyto(residual, residual64, casting="same_kind")
        np.matmul(residual, self.x[block.start:block.stop], out=out)


def _residual_in_place(block: _Block, logits: np.ndarray, row_max: np.ndarray, row_sum: np.ndarray,
                       logits_torch: torch.Tensor, row_sum_torch: torch.Tensor) -> float:
    """Turns the block's logits into softmax probabilities minus the one-hot labels; returns the
    block's summed log-loss, sum_i logsumexp(z_i) - z_i,y_i (float64 throughout). The torch tensors
    share the memory of ``logits`` and ``row_sum``."""
    np.max(logits, axis=0, out=row_max)
    logits -= row_max  # shift each row by its largest logit
    true_shifted = float(logits.ravel().take(block.true_positions).sum())
    logits_torch.exp_()  # torch's exp and log are vectorised for float64 where numpy's may not be
    np.sum(logits, axis=0, out=row_sum)
    np.reciprocal(row_sum, out=row_max)
    logits *= row_max
    logits.ravel()[block.true_positions] -= 1.0
    row_sum_torch.log_()
    return float(row_sum.sum()) - true_shifted
