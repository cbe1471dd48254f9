"""The MNIST probe's two backends: scikit-learn's LogisticRegression and the same L-BFGS-B fit with
common.probe_kernel. The kernel must compute the objective of probes.logistic_objective, that
objective must be scikit-learn's, and the fits must agree."""
import warnings

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from common import probe_kernel
from common.errors import UserError
from common.probe_kernel import LogisticObjectiveKernel
from common.probes import fit_logistic_regression, fit_probe, logistic_objective, sklearn_probe


def blobs(n=300, d=8, classes=4, seed=0, dtype=np.float64, scale=1.0):
    """A small, well-conditioned problem: Gaussian classes around distinct means, unit features."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    means = rng.normal(0.0, 1.0, (classes, d))
    x = (means[y] + rng.normal(0.0, 1.0, (n, d))) * scale
    return x.astype(dtype), y


def codes_like(n=400, d=40, classes=5, density=0.3, dead=7, seed=0, dtype=np.float32):
    """Non-negative sparse SAE-like codes with a few features that are zero on every row."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    owner = rng.integers(0, classes, d)
    on = rng.random((n, d)) < np.where(owner[None, :] == y[:, None], 0.8, density * 0.5)
    x = on * rng.exponential(1.0, (n, d)) * 2.0
    x[:, rng.choice(d, dead, replace=False)] = 0.0
    return x.astype(dtype), y


def random_coef(classes, d, seed=1, scale=0.5):
    coef = np.random.default_rng(seed).normal(0.0, scale, (classes, d + 1))
    return np.asfortranarray(coef).ravel(order="F")


def test_reference_objective_is_scikit_learns():
    """probes.logistic_objective against scikit-learn's own loss object, and its gradient against
    central differences of its value."""
    linear_loss = pytest.importorskip("sklearn.linear_model._linear_loss")
    loss_module = pytest.importorskip("sklearn._loss.loss")
    x, y = blobs()
    coef = random_coef(4, x.shape[1])
    l2 = 1.0 / len(x)
    loss, grad = logistic_objective(coef, x, y, 4, l2)
    theirs = linear_loss.LinearModelLoss(loss_module.HalfMultinomialLoss(n_classes=4), fit_intercept=True)
    their_loss, their_grad = theirs.loss_gradient(coef, x, y.astype(np.float64), None, l2, 1)
    assert loss == pytest.approx(their_loss, rel=1e-12)
    np.testing.assert_allclose(grad, their_grad, rtol=1e-10, atol=1e-14)
    step = 1e-6
    for i in range(0, len(coef), 5):
        e = np.zeros_like(coef)
        e[i] = step
        up, down = logistic_objective(coef + e, x, y, 4, l2)[0], logistic_objective(coef - e, x, y, 4, l2)[0]
        numeric = (up - down) / (2 * step)
        assert numeric == pytest.approx(grad[i], abs=1e-8)


@pytest.mark.parametrize("dtype, sparse_density, block_bytes", [
    (np.float64, 0.0, 1 << 12),   # dense float64, many row blocks and a shorter last one
    (np.float64, 1.0, 1 << 19),   # forced CSR path
    (np.float32, 0.0, 1 << 12),   # float32 products, float64 sums
])
def test_kernel_computes_the_reference_objective(dtype, sparse_density, block_bytes, monkeypatch):
    monkeypatch.setattr(probe_kernel, "SPARSE_DENSITY", sparse_density)
    x, y = codes_like(dtype=dtype)
    l2 = 1.0 / len(x)
    kernel = LogisticObjectiveKernel(x, y, 5, l2, block_bytes=block_bytes)
    assert kernel.sparse == (sparse_density > 0) and len(kernel.live) == x.shape[1] - 7
    if block_bytes < 1 << 19:
        first, last = kernel.blocks[0], kernel.blocks[-1]
        assert len(kernel.blocks) > 2 and last.stop - last.start != first.stop
    for seed in (1, 2):
        coef = random_coef(5, x.shape[1], seed=seed)
        loss, grad = kernel(coef.copy())
        ref_loss, ref_grad = logistic_objective(coef, x, y, 5, l2)
        tol = 1e-12 if dtype == np.float64 else 1e-6
        assert loss == pytest.approx(ref_loss, rel=tol)
        np.testing.assert_allclose(grad, ref_grad, rtol=0, atol=tol * np.abs(ref_grad).max())


@pytest.mark.parametrize("dtype, sparse_density", [(np.float32, 0.0), (np.float64, 0.0), (np.float64, 1.0)])
def test_kernel_workers_give_the_one_worker_numbers_bit_for_bit(dtype, sparse_density, monkeypatch):
    """Blocks split over threads, summed in block order afterwards: the same value and gradient
    (and so the same fit) as one worker, whatever the split; CSR codes stay on one worker."""
    monkeypatch.setattr(probe_kernel, "SPARSE_DENSITY", sparse_density)
    x, y = codes_like(n=1000, dtype=dtype)
    one = LogisticObjectiveKernel(x, y, 5, 1e-3, block_bytes=1 << 11)
    assert len(one.blocks) == (1 if sparse_density else 16) and one.workers == 1 and one.pool is None
    for workers in (2, 3):
        many = LogisticObjectiveKernel(x, y, 5, 1e-3, block_bytes=1 << 11, workers=workers)
        assert many.workers == (1 if sparse_density else workers)
        for seed in (1, 2, 3):
            coef = random_coef(5, x.shape[1], seed=seed)
            (loss, grad), (many_loss, many_grad) = one(coef.copy()), many(coef.copy())
            assert many_loss == loss and np.array_equal(many_grad, grad)
        many.close()
        assert many.pool is None
    one.close()
    fits = [fit_logistic_regression(x, y, max_iter=40, workers=w) for w in (1, 2)]
    assert np.array_equal(fits[0].coef, fits[1].coef) and np.array_equal(fits[0].intercept, fits[1].intercept)


def test_kernel_is_reusable_and_keeps_dead_features_at_their_penalty():
    x, y = codes_like(dtype=np.float64)
    kernel = LogisticObjectiveKernel(x, y, 5, 0.01)
    coef = random_coef(5, x.shape[1])
    first = kernel(coef)
    second_loss, second_grad = kernel(coef)
    assert first[0] == second_loss and np.array_equal(first[1], second_grad)
    dead = np.flatnonzero(~x.any(axis=0))
    weights = coef.reshape((5, -1), order="F")
    np.testing.assert_array_equal(second_grad.reshape((5, -1), order="F")[:, dead], 0.01 * weights[:, dead])


def sklearn_fit(x, y, max_iter):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return LogisticRegression(max_iter=max_iter).fit(x, y)


def max_coef_difference(a, b) -> float:
    """Largest coefficient or intercept difference; a fitted probe or scikit-learn estimator each."""
    a, b = (np.c_[m.coef_, m.intercept_] if hasattr(m, "coef_") else np.c_[m.coef, m.intercept]
            for m in (a, b))
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("max_iter", [5, 1000])
def test_fit_follows_scikit_learn(max_iter):
    """Same start, objective and L-BFGS-B call: on float64 inputs the coefficients agree to 1e-6
    (in fact to ~1e-12), whether the fit stops after five iterations or converges."""
    x, y = blobs()
    ours, theirs = fit_logistic_regression(x, y, max_iter=max_iter), sklearn_fit(x, y, max_iter)
    assert ours.n_iter == theirs.n_iter_[0] == (5 if max_iter == 5 else ours.n_iter)
    assert max_coef_difference(ours, theirs) <= 1e-6
    assert np.array_equal(ours.predict(x), theirs.predict(x))
    if max_iter == 5:  # stopped early, far from the optimum: the agreement is not that of two converged fits
        assert np.abs(sklearn_fit(x, y, 1000).coef_ - theirs.coef_).max() > 1e-3
    else:
        assert ours.n_iter < 100


@pytest.mark.parametrize("max_iter", [5, 1000])
def test_float32_fit_is_as_close_to_the_float64_fit_as_scikit_learns(max_iter):
    """On float32 codes both compute the products in float32, so neither is exact: scikit-learn's
    float32 fit is ~2e-6 from its own float64 fit here. Ours (float64 softmax and sums) is closer."""
    x, y = blobs()
    exact = sklearn_fit(x, y, max_iter)
    x32 = x.astype(np.float32)
    ours, theirs = fit_logistic_regression(x32, y, max_iter=max_iter), sklearn_fit(x32, y, max_iter)
    assert ours.n_iter == theirs.n_iter_[0] == exact.n_iter_[0]
    theirs_error = max_coef_difference(theirs, exact)
    assert max_coef_difference(ours, exact) <= theirs_error <= 1e-5


def test_fit_reference_and_fast_objectives_give_the_same_fit():
    x, y = codes_like(dtype=np.float64)
    fast = fit_logistic_regression(x, y, max_iter=50)
    reference = fit_logistic_regression(x, y, max_iter=50, objective="reference")
    assert fast.n_iter == reference.n_iter
    assert np.abs(fast.coef - reference.coef).max() <= 1e-9


def test_fast_fit_runs_on_one_thread_whatever_the_callers_thread_settings():
    """The fit is the same at any torch/BLAS thread count (it runs single-threaded: a pool only slows
    its cache-sized blocks and splits the float32 products' rounding), and the caller's torch
    thread count is given back."""
    from threadpoolctl import threadpool_info, threadpool_limits

    x, y = codes_like(n=6000, d=96, classes=10)
    before = torch.get_num_threads()
    seen = []
    original = probe_kernel.LogisticObjectiveKernel.__call__

    def spy(self, coef):
        seen.append((torch.get_num_threads(), max(i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas")))
        return original(self, coef)

    try:
        torch.set_num_threads(2)
        probe_kernel.LogisticObjectiveKernel.__call__ = spy
        wide = fit_logistic_regression(x, y, max_iter=60)
        assert torch.get_num_threads() == 2
        probe_kernel.LogisticObjectiveKernel.__call__ = original
        torch.set_num_threads(1)
        with threadpool_limits(1):
            narrow = fit_logistic_regression(x, y, max_iter=60)
    finally:
        probe_kernel.LogisticObjectiveKernel.__call__ = original
        torch.set_num_threads(before)
    assert set(seen) == {(1, 1)}
    assert np.array_equal(wide.coef, narrow.coef) and np.array_equal(wide.intercept, narrow.intercept)


def test_fast_probe_on_codes_matches_sklearn_and_leaves_dead_features_at_zero():
    x, y = codes_like(n=600)
    test_x, test_y = codes_like(n=300, seed=5)
    train_x = torch.from_numpy(x)  # the pipeline passes torch tensors
    fast = fit_probe(train_x, torch.from_numpy(y), max_iter=200, backend="fast")
    ours_acc = sklearn_probe(train_x, torch.from_numpy(y), test_x, test_y, max_iter=200, backend="fast")
    theirs_acc = sklearn_probe(train_x, torch.from_numpy(y), test_x, test_y, max_iter=200)
    assert abs(ours_acc - theirs_acc) <= 1.0 / 3  # at most one of 300 test codes differs
    dead = ~x.any(axis=0)
    assert dead.sum() == 7 and np.all(fast.coef[:, dead] == 0.0)


def test_fast_probe_keeps_label_values_and_two_classes_go_to_sklearn():
    x, y = blobs(classes=3)
    labels = np.array([7, 3, 11])[y]
    probe = fit_probe(x, labels, max_iter=100, backend="fast")
    assert set(probe.predict(x)) <= {3, 7, 11} and probe.model is None
    binary = fit_probe(x[y < 2], labels[y < 2], max_iter=100, backend="fast")
    assert binary.model is not None  # scikit-learn's binomial fit


@pytest.mark.parametrize("kwargs, message", [
    ({"backend": "numba"}, "probe backend"),
    ({"max_iter": 0}, "max_iter"),
    ({"max_iter": 2.5}, "max_iter"),
])
def test_probe_rejects_bad_settings(kwargs, message):
    x, y = blobs()
    with pytest.raises(UserError, match=message):
        sklearn_probe(x, y, x, y, **kwargs)


def test_probe_rejects_bad_inputs():
    x, y = blobs()
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(UserError, match="NaN"):
        sklearn_probe(bad, y, x, y, backend="fast")
    with pytest.raises(UserError, match="same width"):
        sklearn_probe(x, y, x[:, :3], y, backend="fast")
    with pytest.raises(UserError, match="two classes"):
        sklearn_probe(x, np.zeros_like(y), x, y, backend="fast")
