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
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

SPARSE_DENSITY = 0.05  # below this share of nonzeros among the kept features, CSR products are faster
BLOCK_BYTES = 1 << 19  # codes per row block (bytes): the block, its logits and residual stay in cache


def _squared_norm(a: np.ndarray) -> float:
    flat = np.ravel(a, order="K")  # memory order, as scikit-learn sums it
    return float(np.dot(flat, flat))


class _Block:
    """Rows [start, stop) and the buffers their softmax works in (shared by blocks of one length)."""

    def __init__(self, start: int, stop: int, y: np.ndarray, buffers: dict):
        self.start, self.stop = start, stop
        length = stop - start
        # flat positions of (true class, row) in the block's class-major logits
        self.true_positions = y[start:stop] * length + np.arange(length)
        self.logits, self.row_max, self.row_sum = buffers[length]
        self.logits_torch, self.row_sum_torch = torch.from_numpy(self.logits), torch.from_numpy(self.row_sum)


class LogisticObjectiveKernel:
    """``kernel(coef) -> (loss, gradient)``: the L2-penalised mean multinomial log-loss of
    ``common.probes.logistic_objective`` for fixed dense codes ``x`` (rows x features), class indices
    ``y`` (0..n_classes-1) and penalty ``l2_strength``; ``coef`` is the flat float64 vector in
    scikit-learn's layout, ``(n_classes, n_features + 1)`` raveled in Fortran order (intercept
    last)."""

    def __init__(self, x, y: np.ndarray, n_classes: int, l2_strength: float, block_bytes: int = BLOCK_BYTES):
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
        buffers = {}
        for length in {min(step, n_rows), n_rows % step or step}:
            logits = np.empty((k, length))  # float64, class-major; becomes the residual P - Y in place
            buffers[length] = (logits, np.empty(length), np.empty(length))
        self.blocks = [_Block(start, min(n_rows, start + step), y, buffers)
                       for start in range(0, n_rows, step)]
        self.weights = np.empty((k, width), dtype=self.dtype)         # kept weights and the intercept
        self.grad_sum = np.empty((k, width))                          # float64 sum over blocks
        if not self.sparse:
            self.products = np.empty((min(step, n_rows), k), dtype=self.dtype)   # rows x classes
            self.residual = np.empty((k, min(step, n_rows)), dtype=self.dtype)
            self.grad_block = np.empty((k, width), dtype=self.dtype)
        self.grad = np.empty((k, n_features + 1), order="F")

    def __call__(self, coef: np.ndarray) -> tuple[float, np.ndarray]:
        k, n = self.n_classes, self.n_rows
        full = coef.reshape((k, self.n_features + 1), order="F")
        weights = full[:, :-1]
        self.weights[:, :-1] = weights[:, self.live]  # rounded to the codes' precision, as scikit-learn does
        self.weights[:, -1] = full[:, -1]
        self.grad_sum[:] = 0.0
        log_loss_sum = 0.0
        for block in self.blocks:
            self._logits_into(block)
            log_loss_sum += _residual_in_place(block)
            self._add_residual_product(block)
        grad = self.grad
        np.multiply(weights, self.l2_strength, out=grad[:, :-1])
        self.grad_sum /= n
        grad[:, self.live] += self.grad_sum[:, :-1]
        grad[:, -1] = self.grad_sum[:, -1]
        loss = log_loss_sum / n + 0.5 * self.l2_strength * _squared_norm(weights)
        return loss, grad.ravel(order="F")

    def _logits_into(self, block: _Block) -> None:
        """block.logits (classes x block rows, float64) = weights @ x[block].T, intercept included."""
        if self.sparse:
            np.copyto(block.logits, (self.x @ self.weights.T).T)
            return
        products = self.products[:block.stop - block.start]
        np.matmul(self.x[block.start:block.stop], self.weights.T, out=products)  # the faster BLAS shape
        np.copyto(block.logits, products.T)

    def _add_residual_product(self, block: _Block) -> None:
        """grad_sum += residual @ x[block] (float64 sum across blocks)."""
        if self.sparse:
            self.grad_sum += (self.x_t @ block.logits.T).T
            return
        residual = self.residual[:, :block.stop - block.start]
        np.copyto(residual, block.logits, casting="same_kind")
        np.matmul(residual, self.x[block.start:block.stop], out=self.grad_block)
        self.grad_sum += self.grad_block


def _residual_in_place(block: _Block) -> float:
    """Turns the block's logits into softmax probabilities minus the one-hot labels; returns the
    block's summed log-loss, sum_i logsumexp(z_i) - z_i,y_i (float64 throughout)."""
    logits = block.logits
    np.max(logits, axis=0, out=block.row_max)
    logits -= block.row_max  # shift each row by its largest logit
    true_shifted = float(logits.ravel().take(block.true_positions).sum())
    block.logits_torch.exp_()  # torch's exp and log are vectorised for float64 where numpy's may not be
    np.sum(logits, axis=0, out=block.row_sum)
    np.reciprocal(block.row_sum, out=block.row_max)
    logits *= block.row_max
    logits.ravel()[block.true_positions] -= 1.0
    block.row_sum_torch.log_()
    return float(block.row_sum.sum()) - true_shifted
