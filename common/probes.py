"""Linear probes on SAE codes: multinomial logistic regression (MNIST; scikit-learn's, or the same fit
with a faster objective kernel) and a torch linear layer (CIFAR-10, ImageNet). Both return test
accuracy in percent."""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import preflight
from .activations import as_source
from .errors import require
from .threads import single_threaded


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


PROBE_BACKENDS = ("sklearn", "fast")


def sklearn_probe(train_x, train_y, test_x, test_y, max_iter: int = 1000, backend: str = "sklearn",
                  workers: int = 1) -> float:
    """L2 logistic regression with scikit-learn defaults otherwise (lbfgs, C=1), features unscaled,
    as the authors ran it; returns the test accuracy in percent. ``backend`` is ``"sklearn"``
    (scikit-learn's ``LogisticRegression``, the authors' code) or ``"fast"`` (the same fit with a
    faster objective kernel, :func:`fit_logistic_regression`, on ``workers`` threads); see :func:`fit_probe`."""
    train_x, test_x, train_y, test_y = map(_numpy, (train_x, test_x, train_y, test_y))
    require(train_x.ndim == 2 and test_x.ndim == 2 and train_x.shape[1] == test_x.shape[1],
            f"probe inputs must be 2-d with the same width, got {train_x.shape} and {test_x.shape}")
    require(len(test_x) == len(test_y), "probe test features and labels differ in length")
    probe = fit_probe(train_x, train_y, max_iter=max_iter, backend=backend, workers=workers)
    return 100.0 * float((probe.predict(test_x) == test_y).mean())


def fit_probe(train_x, train_y, max_iter: int = 1000, backend: str = "sklearn", workers: int = 1) -> "LogisticProbe":
    """The MNIST probe's fit. ``"sklearn"``: ``LogisticRegression(max_iter=max_iter)`` (convergence
    warnings silenced: they are expected on raw codes). ``"fast"``: the same objective from the same
    start under the same scipy L-BFGS-B call, evaluated by ``common.probe_kernel``; its iterates
    follow scikit-learn's to rounding (tests/test_probes.py, tests/benchmarks/bench_probe.py);
    ``workers`` threads share its row blocks and give the same fit, bit for bit. Two-class problems, which scikit-learn fits in a binomial form, always go to scikit-learn."""
    require(backend in PROBE_BACKENDS,
            f"probe backend must be one of {', '.join(PROBE_BACKENDS)}, got {backend!r}")
    require(isinstance(max_iter, (int, np.integer)) and not isinstance(max_iter, bool) and max_iter >= 1,
            f"probe max_iter must be a positive integer, got {max_iter!r}")
    require(isinstance(workers, (int, np.integer)) and not isinstance(workers, bool) and workers >= 1,
            f"probe workers must be a positive integer, got {workers!r}")
    train_x, train_y = _numpy(train_x), _numpy(train_y)
    require(train_x.ndim == 2 and len(train_x) == len(train_y),
            f"probe training features must be 2-d with one label per row, "
            f"got {train_x.shape} and {len(train_y)} labels")
    require(bool(np.isfinite(train_x).all()), "probe training features contain NaN or infinite values")
    n_classes = len(np.unique(train_y))
    require(n_classes >= 2, "a probe needs at least two classes in its training data")
    if backend == "fast" and n_classes > 2:
        return fit_logistic_regression(train_x, train_y, max_iter=max_iter, workers=workers)
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(max_iter=max_iter)  # the authors' n_jobs=-1 has no effect on lbfgs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        model.fit(train_x, train_y)
    return LogisticProbe(classes=model.classes_, coef=model.coef_, intercept=model.intercept_,
                         n_iter=int(np.max(model.n_iter_)), model=model)


def logistic_objective(coef: np.ndarray, x: np.ndarray, y: np.ndarray, n_classes: int,
                       l2_strength: float) -> tuple[float, np.ndarray]:
    """The objective scikit-learn's lbfgs minimises for multinomial ``LogisticRegression``, and its
    gradient, in plain float64 numpy (the definition; ``common.probe_kernel`` computes the same faster):

        mean_i [ logsumexp_c(z_ic) - z_i,y_i ]  +  l2_strength / 2 * ||W||^2,   z = x W^T + b,

    with ``l2_strength = 1 / (C * n_rows)`` (scikit-learn scales C * sum(loss) + ||W||^2 / 2 by
    1 / n_rows; the intercept b is not penalised). ``coef`` is flat, ``(n_classes, n_features + 1)``
    raveled in Fortran order with the intercept last, which is scikit-learn's layout."""
    full = coef.reshape((n_classes, -1), order="F")
    weights, intercept = full[:, :-1], full[:, -1]
    logits = np.asarray(x, dtype=np.float64) @ weights.T + intercept
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(len(y))
    loss = float(np.mean(log_norm - shifted[rows, y])) + 0.5 * l2_strength * float(np.sum(weights ** 2))
    residual = np.exp(shifted - log_norm[:, None])  # softmax probabilities ...
    residual[rows, y] -= 1.0                         # ... minus the one-hot labels
    residual /= len(y)
    grad = np.empty_like(full, order="F")
    grad[:, :-1] = residual.T @ np.asarray(x, dtype=np.float64) + l2_strength * weights
    grad[:, -1] = residual.sum(axis=0)
    return loss, grad.ravel(order="F")


@dataclass
class LogisticProbe:
    """A fitted logistic regression: ``coef`` (classes x features), ``intercept``, the L-BFGS
    iterations it took; ``model`` is scikit-learn's estimator when scikit-learn fitted it (its own
    ``predict`` is then used)."""
    classes: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    n_iter: int
    model: object = None

    def predict(self, x) -> np.ndarray:
        if self.model is not None:
            return self.model.predict(x)
        scores = np.asarray(x, dtype=np.float64) @ self.coef.T + self.intercept
        return self.classes[np.argmax(scores, axis=1)]


def fit_logistic_regression(x, y, *, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-4,
                            objective: str = "fast", workers: int = 1) -> LogisticProbe:
    """Multinomial L2 logistic regression (three or more classes) fitted as scikit-learn's
    ``LogisticRegression(C=C, max_iter=max_iter, tol=tol)`` (lbfgs, intercept) fits it: zero start,
    the objective of :func:`logistic_objective`, and scipy's L-BFGS-B with scikit-learn's options (at most
    ``max_iter`` iterations, up to 50 line-search steps, gtol ``tol``, ftol 64 machine epsilons).
    ``objective="fast"`` evaluates it with ``common.probe_kernel`` (its row blocks on ``workers``
    threads: the same numbers); ``"reference"`` with :func:`logistic_objective`."""
    from scipy import optimize

    from .probe_kernel import LogisticObjectiveKernel

    require(objective in ("fast", "reference"), f"objective must be fast or reference, got {objective!r}")
    require(max_iter >= 1 and C > 0 and tol > 0, "max_iter must be >= 1, C and tol positive")
    x = _numpy(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    classes, y_index = np.unique(_numpy(y), return_inverse=True)
    require(len(classes) >= 3, f"the multinomial probe needs at least three classes, got {len(classes)}")
    n_rows, n_features = x.shape
    l2_strength = 1.0 / (C * n_rows)
    if objective == "fast":
        func, args = LogisticObjectiveKernel(x, y_index, len(classes), l2_strength, workers=workers), ()
    else:
        func, args = logistic_objective, (x, y_index, len(classes), l2_strength)
    start = np.zeros((len(classes), n_features + 1), order="F").ravel(order="F")
    # Each product on one thread: the kernel's blocks are cache-sized, so a BLAS pool only adds
    # fork/join (the seed-42 MNIST fit at 2 threads: 5 min instead of 15 s), and the float32
    # products round alike on any machine (2 BLAS threads split them otherwise: the 1000 iterations
    # ended elsewhere). The kernel's own workers split whole blocks instead.
    try:
        with single_threaded():
            result = optimize.minimize(func, start, method="L-BFGS-B", jac=True, args=args,
                                       options={"maxiter": max_iter, "maxls": 50, "gtol": tol,
                                                "ftol": 64 * np.finfo(float).eps})
    finally:
        if objective == "fast":
            func.close()
    full = result.x.reshape((len(classes), n_features + 1), order="F")
    return LogisticProbe(classes=classes, coef=np.ascontiguousarray(full[:, :-1]),
                         intercept=full[:, -1].copy(), n_iter=min(int(result.nit), max_iter))


def torch_probe(train, test, n_classes: int, *, epochs: int, lr: float = 1e-3, batch_size: int = 64,
                subset_fraction: float = 1.0, seed: int = 0, device: str | torch.device = "cpu",
                desc: str = "probe") -> float:
    """nn.Linear on codes, Adam + cross-entropy, shuffled batches; trains on a seeded random subset
    of ``train`` when ``subset_fraction`` < 1. ``train``/``test`` are activation sources with labels."""
    require(epochs > 0 and lr > 0 and batch_size > 0, "probe epochs, lr and batch size must be positive")
    require(0 < subset_fraction <= 1, f"probe subset fraction must be in (0, 1], got {subset_fraction}")
    train, test = as_source(train), as_source(test)
    require(train.dim == test.dim, f"train codes have width {train.dim}, test codes {test.dim}")
    probe = nn.Linear(train.dim, n_classes).to(device)
    optimizer = torch.optim.Adam(probe.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    keep = None
    if subset_fraction < 1:
        n_keep = max(1, math.floor(len(train) * subset_fraction))
        chosen = train.indices[torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:n_keep]]
        keep = torch.zeros(int(train.indices.max()) + 1, dtype=torch.bool)
        keep[chosen] = True  # membership by dataset index, so streaming sources can filter batch by batch
    steps = math.ceil(len(train) / batch_size)
    for epoch in preflight.epochs(range(epochs)):
        batches = preflight.steps(train.iter_batches(batch_size, shuffle=True, seed=seed + epoch), f"{desc} train",
                                  total=steps)
        for batch in tqdm(batches, total=steps,
                          desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            require(batch.labels is not None, "probe training data has no labels")
            x, y = batch.x, batch.labels
            if keep is not None:
                rows = keep[batch.indices]
                x, y = x[rows], y[rows]
                if x.shape[0] == 0:
                    continue
            loss = loss_fn(probe(x.to(device)), y.to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    correct = total = 0
    with torch.no_grad():
        for batch in preflight.steps(test.iter_batches(4 * batch_size), f"{desc} test",
                                     total=math.ceil(len(test) / (4 * batch_size))):
            correct += int((probe(batch.x.to(device)).argmax(1).cpu() == batch.labels).sum())
            total += batch.x.shape[0]
    require(total > 0, "no test codes to score the probe on")
    return 100.0 * correct / total
