"""The fast paths of common.metrics' clustering scores against scikit-learn.

The scores hold points either as a sparse CSR matrix (CPU, sparse codes) or densely (dense data,
GPU); both layouts, every input kind (numpy, torch dense, torch sparse, scipy.sparse) and the
corner cases of SAE codes (all-zero rows, singleton clusters, 1000 classes, -0.0, negative values)
must give scikit-learn's numbers.
"""
import math

import numpy as np
import pytest
import scipy.sparse
import torch
from sklearn import metrics as skm

from common import metrics
from common import metrics_kernels as kernels
from common.errors import UserError

REL = 1e-9
# scikit-learn's Davies-Bouldin measures point-to-centroid distances as sqrt(|x|^2 + |c|^2 - 2 x.c),
# so a point that *is* its centroid (a class of one) gets rounding noise up to ~sqrt(eps)|x| ~ 1e-8|x|
# instead of 0; ours is exactly 0 there, which moves DBI by ~1e-9 relative on data with singletons.
REL_DBI = 1e-7


def sae_codes(rng, n, d, n_classes, l0=8, zero_rows=5):
    """Sparse non-negative codes with class structure, a few all-zero rows."""
    y = rng.integers(0, n_classes, n)
    own = rng.integers(0, d, (n_classes, l0))
    X = np.zeros((n, d))
    for i in range(n):
        X[i, own[y[i]]] = rng.exponential(1.0, l0) * (rng.random(l0) < 0.8)
        X[i, rng.integers(0, d, 2)] = 0.2 * rng.random(2)
    X[rng.choice(n, zero_rows, replace=False)] = 0.0
    return X.astype(np.float32).astype(np.float64), y   # float32-exact, like SAE codes


def with_singletons(X, y):
    y = y.copy()
    y[:3] = y.max() + 1 + np.arange(3)          # three classes of one example each
    return X, y


CASES = {
    "sae-codes": lambda rng: sae_codes(rng, 400, 96, 12),
    "singletons": lambda rng: with_singletons(*sae_codes(rng, 300, 64, 8)),
    "1000-classes": lambda rng: sae_codes(rng, 2500, 128, 1000, l0=6, zero_rows=20),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param](np.random.default_rng(sum(map(ord, request.param))))


@pytest.fixture(params=["sparse", "dense"])
def layout(request, monkeypatch):
    """Force one layout: the CPU switches to CSR when at most _SPARSE_MAX_DENSITY is nonzero."""
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", 1.0 if request.param == "sparse" else -1.0)
    return request.param


def sklearn_scores(X, y):
    pred = X.argmax(axis=1)
    return {"ari": skm.adjusted_rand_score(y, pred), "sil_u": skm.silhouette_score(X, pred),
            "sil_s": skm.silhouette_score(X, y), "dbi": skm.davies_bouldin_score(X, y),
            "chi": skm.calinski_harabasz_score(X, y)}


def assert_scores_equal(got, want, rel=REL):
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=REL_DBI if key == "dbi" else rel, abs=1e-12), key


def test_layout_is_the_one_forced(case, layout):
    X, _ = case
    assert kernels._points(torch.from_numpy(X)).sparse == (layout == "sparse")


def test_clustering_metrics_match_sklearn(case, layout):
    X, y = case
    assert_scores_equal(metrics.clustering_metrics(X, y), sklearn_scores(X, y))


def test_each_score_matches_sklearn(case, layout):
    X, y = case
    pred = X.argmax(axis=1)
    Xt = torch.from_numpy(X).float()             # float32 codes, as the pipeline has them
    X32 = Xt.double().numpy()                    # the same values for scikit-learn, in float64
    assert metrics.silhouette(Xt, y) == pytest.approx(skm.silhouette_score(X32, y), rel=REL)
    assert metrics.silhouette(Xt, pred, chunk=37) == pytest.approx(skm.silhouette_score(X32, pred), rel=REL)
    assert metrics.davies_bouldin(Xt, y) == pytest.approx(skm.davies_bouldin_score(X32, y), rel=REL_DBI)
    assert metrics.calinski_harabasz(Xt, y) == pytest.approx(skm.calinski_harabasz_score(X32, y), rel=REL)
    assert metrics.adjusted_rand(y, pred) == pytest.approx(skm.adjusted_rand_score(y, pred), abs=1e-12)


@pytest.mark.parametrize("kind", ["torch-coo", "torch-csr", "scipy-csr", "scipy-coo"])
def test_sparse_inputs_match_dense(kind):
    X, y = sae_codes(np.random.default_rng(5), 300, 64, 7)
    sparse = {"torch-coo": lambda: torch.from_numpy(X).to_sparse(),
              "torch-csr": lambda: torch.from_numpy(X).to_sparse_csr(),
              "scipy-csr": lambda: scipy.sparse.csr_matrix(X),
              "scipy-coo": lambda: scipy.sparse.coo_matrix(X)}[kind]()
    assert_scores_equal(metrics.clustering_metrics(sparse, y), sklearn_scores(X, y))
    assert metrics.silhouette(sparse, y) == pytest.approx(skm.silhouette_score(X, y), rel=REL)


def test_stored_zeros_and_negative_zero_are_ignored():
    X, y = sae_codes(np.random.default_rng(6), 200, 32, 5)
    X[X == 0] = -0.0
    coo = scipy.sparse.coo_matrix(X)
    with_zeros = scipy.sparse.coo_matrix((np.r_[coo.data, 0.0, 0.0], (np.r_[coo.row, 0, 1], np.r_[coo.col, 0, 0])),
                                         shape=X.shape)
    assert_scores_equal(metrics.clustering_metrics(with_zeros, y), sklearn_scores(np.abs(X), y))
    assert_scores_equal(metrics.clustering_metrics(torch.from_numpy(X).float(), y), sklearn_scores(np.abs(X), y))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
def test_sparse_argmax_equals_torch_argmax(dtype, monkeypatch):
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", 1.0)
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(300, 9, generator=g) * 3) * (torch.rand(300, 9, generator=g) < 0.4)
    X[:4] = 0                                    # all-zero rows -> 0
    X[4] = -1.0                                  # every entry negative -> first one
    X[5, :4] = -2.0                              # negatives then implicit zeros -> first zero (column 4)
    X[6, 1:] = -1.0                              # first column is the only zero
    X[7] = torch.tensor([0, 2, 0, 2, 0, 0, 0, 0, 1.0])  # ties -> first
    X[8, 1:], X[8, 0] = -1.0, -0.0               # -0.0 is a zero like the others
    X = X.round().to(dtype) if not dtype.is_floating_point else X.to(dtype)
    P = kernels._points(X)
    assert P.sparse
    assert P.source.data_ptr() == X.data_ptr()   # the rows scanned, not a copy
    for source in (P.source, None):              # numpy's argmax of the scanned rows, then the sparse one
        P.source = source
        assert torch.equal(P.argmax(), X.argmax(dim=1))


def test_too_dense_input_falls_back_to_dense(monkeypatch):
    monkeypatch.setattr(kernels, "_NNZ_SCAN_ELEMENTS", 64)   # several scan blocks
    X, y = sae_codes(np.random.default_rng(7), 200, 32, 5)   # about a quarter of the entries nonzero
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", 0.5)
    assert kernels._points(X).sparse
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", 0.1)
    P = kernels._points(X)
    assert not P.sparse
    assert metrics.silhouette(X, y) == pytest.approx(skm.silhouette_score(X, y), rel=REL)


def test_block_sizes_do_not_change_silhouettes():
    X, y = sae_codes(np.random.default_rng(8), 211, 40, 6)
    pred = X.argmax(axis=1)
    want = kernels._silhouettes(X, [torch.from_numpy(y), torch.from_numpy(pred)], chunk=1000)
    for chunk in (5, 64, 210):
        got = kernels._silhouettes(X, [torch.from_numpy(y), torch.from_numpy(pred)], chunk=chunk)
        assert got == pytest.approx(want, abs=1e-12)


def test_label_kinds_and_encodings():
    X, y = sae_codes(np.random.default_rng(9), 150, 24, 4)
    shifted = y * 1000 - 7                       # sparse, negative label values (sort-based encoding)
    strings_like = np.array([10**12, 5, 5, 10**12] * 37 + [5, 9])[:150]
    for labels in (shifted, strings_like, torch.from_numpy(y).int(), y.reshape(-1, 1)):
        lab = np.asarray(labels).reshape(-1)
        assert metrics.silhouette(X, labels) == pytest.approx(skm.silhouette_score(X, lab), rel=REL)
        assert metrics.davies_bouldin(X, labels) == pytest.approx(skm.davies_bouldin_score(X, lab), rel=REL_DBI)
        assert metrics.calinski_harabasz(X, labels) == pytest.approx(skm.calinski_harabasz_score(X, lab), rel=REL)
        assert metrics.adjusted_rand(labels, y) == pytest.approx(skm.adjusted_rand_score(lab, y), abs=1e-12)


def test_ari_large_contingency_uses_sort_path():
    rng = np.random.default_rng(10)
    a, b = rng.integers(0, 3000, 2000), rng.integers(0, 3000, 2000)   # 3000 x 3000 cells > 4 n + 2^20
    assert metrics.adjusted_rand(a, b) == pytest.approx(skm.adjusted_rand_score(a, b), abs=1e-12)
    assert metrics.adjusted_rand(a, a) == 1.0


def test_degenerate_clusterings(layout):
    X, _ = sae_codes(np.random.default_rng(11), 60, 16, 3)
    assert math.isnan(metrics.silhouette(X, np.zeros(60, int)))           # one cluster
    assert math.isnan(metrics.davies_bouldin(X, np.arange(60)))           # n clusters
    assert math.isnan(metrics.calinski_harabasz(X, np.zeros(60, int)))
    tight = np.repeat(np.eye(3) * 2.0, 20, axis=0)                        # every cluster a single point
    labels = np.repeat(np.arange(3), 20)
    assert metrics.calinski_harabasz(tight, labels) == skm.calinski_harabasz_score(tight, labels) == 1.0
    assert metrics.davies_bouldin(tight, labels) == skm.davies_bouldin_score(tight, labels) == 0.0
    assert metrics.silhouette(tight, labels) == pytest.approx(skm.silhouette_score(tight, labels), abs=1e-12)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_codes_are_one_clear_error(bad, layout):
    X, y = sae_codes(np.random.default_rng(12), 50, 16, 3)
    X[7, 3] = bad
    with pytest.raises(UserError, match="NaN or infinite"):
        metrics.clustering_metrics(torch.from_numpy(X).float(), y)
    with pytest.raises(UserError, match="NaN or infinite"):
        metrics.davies_bouldin(scipy.sparse.csr_matrix(X), y)


def test_thread_count_is_restored():
    before = torch.get_num_threads()
    X, y = sae_codes(np.random.default_rng(13), 80, 16, 3)
    metrics.clustering_metrics(X, y)
    assert torch.get_num_threads() == before
    with pytest.raises(UserError):
        metrics.clustering_metrics(X, y[:-1])
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_gpu_matches_sklearn():
    X, y = sae_codes(np.random.default_rng(14), 500, 64, 9)
    assert_scores_equal(metrics.clustering_metrics(torch.from_numpy(X).float(), y, device="cuda"),
                        sklearn_scores(torch.from_numpy(X).float().double().numpy(), y))


@pytest.fixture
def float32_gram(monkeypatch):
    """Take Davies-Bouldin's float32-Gram path at any size (it normally starts at K * K * d = 2^26)."""
    monkeypatch.setattr(kernels, "_FLOAT32_GRAM_MIN_WORK", 0)


def _dbi_inputs(rng, K, d, kind):
    if kind == "spread":
        C = rng.exponential(1.0, (K, d)) * (rng.random((K, d)) < 0.3)
    elif kind == "near-ties":        # every centroid at almost the same distance from every other
        C = np.eye(K, d) + 1e-7 * rng.random((K, d))
    elif kind == "duplicates":       # coinciding centroids: distance 0 counts as infinite
        C = rng.random((K, d))
        C[1::2] = C[::2][:K // 2]
    elif kind == "tiny":
        C = 1e-25 * rng.standard_normal((K, d))
    else:                            # "huge", signed
        C = 1e20 * rng.standard_normal((K, d))
    C = C.astype(np.float32).astype(np.float64)
    scale = float(np.linalg.norm(C, axis=1).mean())
    intra = np.full(K, scale) if kind == "near-ties" else np.abs(rng.standard_normal(K)) * scale
    return torch.from_numpy(C), torch.from_numpy(intra)


def _worst_ratios_by_differences(C, intra):
    """Reference: every pair's distance from the differences (coinciding centroids: exactly 0)."""
    dist = torch.cdist(C, C, compute_mode="donot_use_mm_for_euclid_dist")
    dist.fill_diagonal_(0.0)
    if torch.allclose(dist, torch.zeros_like(dist)):
        return None
    dist[dist == 0] = math.inf
    return ((intra[:, None] + intra[None, :]) / dist).max(dim=1).values


@pytest.mark.parametrize("kind", ["spread", "near-ties", "duplicates", "tiny", "huge"])
def test_float32_gram_gives_the_float64_maxima(kind, float32_gram):
    C, intra = _dbi_inputs(np.random.default_rng(11), 60, 50, kind)
    csq = (C * C).sum(dim=1)
    # coinciding centroids: the float64 Gram form gives rounding noise, the differences exactly 0
    if kind == "duplicates":
        want = _worst_ratios_by_differences(C, intra)
    else:
        want = kernels._worst_ratios_float64(C, csq, intra, 1)
    got = kernels._worst_ratios(C, csq, intra, 1)
    if want is None:                      # every centroid distance <= 1e-8: the score is 0
        assert got is None
    else:
        assert torch.allclose(got, want, rtol=1e-10, atol=0)


def test_float32_gram_near_ties_fall_back_to_float64(float32_gram, monkeypatch):
    C, intra = _dbi_inputs(np.random.default_rng(12), 60, 50, "near-ties")
    csq = (C * C).sum(dim=1)
    calls = []
    original = kernels._worst_ratios_float64
    monkeypatch.setattr(kernels, "_worst_ratios_float64", lambda *a: calls.append(1) or original(*a))
    kernels._worst_ratios(C, csq, intra, 1)
    assert calls, "every pair is a candidate: the float64 Gram matrix must be used"


@pytest.mark.parametrize("name", sorted(CASES))
def test_davies_bouldin_float32_gram_equals_sklearn(name, float32_gram):
    X, y = CASES[name](np.random.default_rng(13))
    assert metrics.davies_bouldin(X, y) == pytest.approx(skm.davies_bouldin_score(X, y), rel=REL_DBI)
    assert metrics.clustering_metrics(X, y)["dbi"] == pytest.approx(skm.davies_bouldin_score(X, y), rel=REL_DBI)


def test_davies_bouldin_all_centroids_within_1e8_scores_0(float32_gram):
    rng = np.random.default_rng(14)
    spread = rng.standard_normal((4, 10, 5))
    centres = 1e-9 * np.arange(1, 5)[:, None, None]                     # centroids < 1e-8 apart
    X = np.concatenate([centres + spread, centres - spread], axis=1).reshape(-1, 5)   # clusters of spread ~1
    y = np.repeat(np.arange(4), 20)
    assert metrics.davies_bouldin(X, y) == skm.davies_bouldin_score(X, y) == 0.0


@pytest.mark.parametrize("workers", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_parallel_scan_finds_every_nonzero(workers, dtype, monkeypatch):
    monkeypatch.setattr(kernels, "_NNZ_SCAN_ELEMENTS", 100)   # many blocks, shared out to the workers
    g = torch.Generator().manual_seed(15)
    X = torch.randn(97, 13, generator=g) * (torch.rand(97, 13, generator=g) < 0.2)
    X[X == 0] = -0.0                                           # negative zeros are zeros
    X[5] = 0.0
    X = X.to(dtype)
    crow, col, val, shape = kernels._scan_sparse(X, 1.0, workers)
    rows = torch.repeat_interleave(torch.arange(shape[0]), crow[1:] - crow[:-1])
    dense = torch.zeros(shape, dtype=dtype)
    dense[rows, col] = val
    assert torch.equal(dense, X) and bool((val != 0).all())
    assert torch.equal(crow, torch.nn.functional.pad(torch.cumsum((X != 0).sum(dim=1), 0), (1, 0)))
    assert kernels._scan_sparse(X, 0.01, workers) is None      # over the budget: gives up
    X[50, 3] = float("nan")
    with pytest.raises(UserError, match="NaN or infinite"):
        kernels._scan_sparse(X, 1.0, workers)


@pytest.mark.parametrize("workers", [1, 3])
def test_keyed_scan_stores_class_keys(workers, monkeypatch):
    """With the rows' class codes, the scan stores code * d + column and float64 values; the points
    derive their columns and row norms from them only when asked."""
    monkeypatch.setattr(kernels, "_NNZ_SCAN_ELEMENTS", 100)
    g = torch.Generator().manual_seed(16)
    X = torch.rand(97, 14, generator=g) * (torch.rand(97, 14, generator=g) < 0.2)
    X[7] = 0.0
    codes = torch.randint(0, 5, (97,), generator=g)
    crow, col, val, _ = kernels._scan_sparse(X, 1.0, workers)
    kcrow, keys, kval, _ = kernels._scan_sparse(X, 1.0, workers, codes)
    rows = torch.repeat_interleave(torch.arange(97), crow[1:] - crow[:-1])
    assert torch.equal(kcrow, crow) and kval.dtype == torch.float64 and torch.equal(kval, val.double())
    assert torch.equal(keys, codes[rows] * 14 + col)
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", 1.0)
    plain, keyed = kernels._points(X), kernels._points(X, codes=codes)
    assert keyed.keys is not None and keyed._col is None
    assert torch.equal(keyed.col, plain.col) and torch.allclose(keyed.sq, plain.sq, rtol=1e-15)
    assert keyed.class_keys(codes) is keyed.keys
    assert torch.allclose(keyed.class_sums(codes, 5), plain.class_sums(codes, 5), rtol=1e-15, atol=0)
    other = codes.flip(0)
    assert torch.equal(keyed.class_keys(other), plain.class_keys(other))
    assert keyed.sq_total() == pytest.approx(math.fsum((X.double() ** 2).flatten().tolist()), rel=1e-15)
    with pytest.raises(UserError, match="96 labels for 97 examples"):
        kernels._points(X, codes=codes[1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("K", [40, 1001])
def test_symmetric_gram_equals_the_product(dtype, K):
    A = torch.randn(K, 33, generator=torch.Generator().manual_seed(K), dtype=dtype)
    G = kernels._gram(A)
    if K >= 512:                          # off-diagonal blocks computed once and mirrored
        assert torch.equal(G[K // 4:, :K // 4], G[:K // 4, K // 4:].T)
    assert torch.allclose(G, A @ A.T, rtol=0, atol=1e-4 if dtype == torch.float32 else 1e-12)


def test_distances_to_centroids_in_chunks(monkeypatch):
    """The per-row gathers run in chunks of rows (shared out to workers): any chunk size, empty rows
    on the chunk boundaries included, gives the same distances as the dense formula."""
    X, y = sae_codes(np.random.default_rng(17), 300, 40, 6)
    X[100:110] = 0.0
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", 1.0)
    P = kernels._points(torch.from_numpy(X))
    codes, counts = kernels._encode(torch.from_numpy(y))
    centres = kernels._centroids(P, codes, counts)[1]
    want = ((torch.from_numpy(X) - centres[codes]) ** 2).sum(dim=1)
    want[counts[codes] == 1] = 0.0
    for size in (1, 7, 10**6):
        monkeypatch.setattr(kernels, "_GATHER_CHUNK", size)
        for threads in (1, 2):
            with kernels._threads(threads):
                got = P.sq_dist_to(centres, codes, counts)
            assert torch.allclose(got, want, rtol=1e-12, atol=1e-12), (size, threads)


@pytest.mark.parametrize("size", [10, 2**16 - 1, 2**16, 2**17 + 5])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.3, 1.0])
def test_flatnonzero_equals_numpy(size, density):
    """Large masks go through packed bytes; every size (not a multiple of 8 too) and density."""
    g = torch.Generator().manual_seed(size)
    values = torch.randn(size, generator=g) * (torch.rand(size, generator=g) < density)
    values[values == 0] = -0.0 if size % 2 else 0.0
    assert torch.equal(kernels._flatnonzero(values), torch.from_numpy(np.flatnonzero(values.numpy())))
    bits = values.view(torch.int32)               # raw bits: -0.0 is a nonzero word
    assert torch.equal(kernels._flatnonzero(bits), torch.from_numpy(np.flatnonzero(bits.numpy())))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_codes_match_sklearn(dtype):
    """Codes from a bf16/fp16 autocast SAE: the same scores as their float64 values."""
    X, y = sae_codes(np.random.default_rng(18), 300, 40, 6)
    Xh = torch.from_numpy(X).to(dtype)
    X64 = Xh.double().numpy()
    assert metrics.davies_bouldin(Xh, y) == pytest.approx(skm.davies_bouldin_score(X64, y), rel=REL_DBI)
    assert metrics.calinski_harabasz(Xh, y) == pytest.approx(skm.calinski_harabasz_score(X64, y), rel=REL)
    assert_scores_equal(metrics.clustering_metrics(Xh, y), sklearn_scores(X64, y))


# ----------------------------------------------------------------------------- CPU silhouette paths
GRAM_MODES = {   # how _DistanceStrips forms the products: (settings, expected attributes)
    "sparse-x-sparse": ({"_SPARSE_MAX_DENSITY": 1.0, "_SPGEMM_MAX_DENSITY": 1.0}, (True, True)),
    "sparse-x-dense": ({"_SPARSE_MAX_DENSITY": 1.0, "_SPGEMM_MAX_DENSITY": -1.0, "_DENSE_COPY_MAX_BYTES": 0},
                       (True, False)),
    "dense-copy": ({"_SPARSE_MAX_DENSITY": 1.0, "_SPGEMM_MAX_DENSITY": -1.0, "_DENSE_COPY_MAX_BYTES": 2**40},
                   (False, False)),
    "dense": ({"_SPARSE_MAX_DENSITY": -1.0}, (False, False)),
}


@pytest.mark.parametrize("side", ["symmetric", "one-sided"])
@pytest.mark.parametrize("mode", sorted(GRAM_MODES))
def test_cpu_silhouette_paths_match_sklearn(mode, side, monkeypatch):
    """Every way of forming the distances, each distance counted for both points (symmetric) or
    each block against all, block sizes that split clusters and runs: scikit-learn's values."""
    settings, (sparse, spgemm) = GRAM_MODES[mode]
    for name, value in settings.items():
        monkeypatch.setattr(kernels, name, value)
    if side == "one-sided":
        monkeypatch.setattr(kernels, "_SYMMETRIC_MAX_BYTES", 0)
        monkeypatch.setattr(kernels, "_SYMMETRIC_OTHER_MAX_BYTES", 0)
    X, y = sae_codes(np.random.default_rng(19), 333, 48, 7)
    X, y = with_singletons(X, y)
    rng = np.random.default_rng(20)
    pred = np.where(rng.random(333) < 0.3, rng.integers(0, 40, 333), X.argmax(axis=1))   # runs interleave
    strips = kernels._DistanceStrips(kernels._points(torch.from_numpy(X)))
    assert (strips.sparse, strips.spgemm) == (sparse, spgemm)
    want = [skm.silhouette_score(X, y), skm.silhouette_score(X, pred)]
    for chunk in (None, 7, 64, 333):
        got = kernels._silhouettes(X, [torch.from_numpy(y), torch.from_numpy(pred)], chunk=chunk)
        assert got == pytest.approx(want, rel=REL, abs=1e-12), chunk
    assert metrics.silhouette(torch.from_numpy(X).float(), pred) == pytest.approx(
        skm.silhouette_score(torch.from_numpy(X).float().double().numpy(), pred), rel=REL)


def test_symmetric_path_is_taken_when_the_sums_fit(monkeypatch):
    """The (clusters x points) sums of the symmetric path are bounded: above the budget, one-sided."""
    calls = []
    original = kernels._silhouette_sum
    monkeypatch.setattr(kernels, "_silhouette_sum", lambda S, *a: calls.append(S.shape) or original(S, *a))
    X, y = sae_codes(np.random.default_rng(21), 200, 32, 5)
    kernels._silhouettes(X, [torch.from_numpy(y)], chunk=50)
    assert calls == [(5, 200)]                     # once, over every point
    calls.clear()
    monkeypatch.setattr(kernels, "_SYMMETRIC_MAX_BYTES", 0)
    monkeypatch.setattr(kernels, "_SYMMETRIC_OTHER_MAX_BYTES", 0)
    kernels._silhouettes(X, [torch.from_numpy(y)], chunk=50)
    assert calls == [(5, 50)] * 4                  # once per block


@pytest.mark.parametrize("dense_copy", [True, False])
def test_each_mode_has_its_symmetric_budget(dense_copy, monkeypatch):
    """The dense-copy mode's symmetric pass (its sums over a block cost (runs x rows)) has a larger
    budget than the other modes' (theirs cost (clusters x rows)): each mode reads its own."""
    calls = []
    original = kernels._silhouette_sum
    monkeypatch.setattr(kernels, "_silhouette_sum", lambda S, *a: calls.append(S.shape) or original(S, *a))
    X, y = mnist_like_codes(np.random.default_rng(29), 300, 64, 5)
    if not dense_copy:
        monkeypatch.setattr(kernels, "_DENSE_COPY_MAX_BYTES", 0)
    assert kernels._DistanceStrips.dense_copy(kernels._points(X)) == dense_copy
    monkeypatch.setattr(kernels, "_SYMMETRIC_MAX_BYTES" if dense_copy else "_SYMMETRIC_OTHER_MAX_BYTES", 0)
    got = kernels._silhouettes(X, [torch.from_numpy(y)], chunk=100)
    assert len(calls) == 3, "one-sided: one silhouette sum per block"
    assert got[0] == pytest.approx(skm.silhouette_score(X, y), rel=REL, abs=1e-12)
    calls.clear()
    monkeypatch.setattr(kernels, "_SYMMETRIC_OTHER_MAX_BYTES" if dense_copy else "_SYMMETRIC_MAX_BYTES", 0)
    monkeypatch.setattr(kernels, "_SYMMETRIC_MAX_BYTES" if dense_copy else "_SYMMETRIC_OTHER_MAX_BYTES", 2**40)
    kernels._silhouettes(X, [torch.from_numpy(y)], chunk=100)
    assert len(calls) == 1, "symmetric: one sum over every point"


def test_small_inputs_run_on_one_thread():
    X, y = sae_codes(np.random.default_rng(22), 100, 16, 3)
    P = kernels._points(X)
    assert kernels._threads_worth(P, 8) == 1
    big = kernels._Points(10, 2**21, torch.device("cpu"), dense=torch.zeros(1, 1))
    assert kernels._threads_worth(big, 8) == 8


def test_dense_strips_without_the_augmented_copy(monkeypatch):
    """Dense points too large for the [x, |x|^2, 1] copy: the norms are added after the product."""
    monkeypatch.setattr(kernels, "_SPARSE_MAX_DENSITY", -1.0)
    X, y = sae_codes(np.random.default_rng(23), 150, 24, 4)
    monkeypatch.setattr(kernels, "_DENSE_COPY_MAX_BYTES", 0)
    assert kernels._DistanceStrips(kernels._points(X)).augmented is None
    assert metrics.silhouette(X, y, chunk=40) == pytest.approx(skm.silhouette_score(X, y), rel=REL)
    monkeypatch.setattr(kernels, "_DENSE_COPY_MAX_BYTES", 2**40)
    assert kernels._DistanceStrips(kernels._points(X)).augmented is not None
    assert metrics.silhouette(X, y, chunk=40) == pytest.approx(skm.silhouette_score(X, y), rel=REL)


def mnist_like_codes(rng, n, d, n_classes, own=32, noise=6):
    """Dense-ish class-structured codes (MNIST's SAE codes: ~13% nonzero, most of a class's nonzeros
    in a few dozen features of its own, a few scattered ones)."""
    y = rng.integers(0, n_classes, n)
    feats = np.stack([rng.choice(d, own, replace=False) for _ in range(n_classes)])
    X = np.zeros((n, d))
    rows = np.arange(n)[:, None]
    X[rows, feats[y]] = rng.exponential(1.0, (n, own)) * (rng.random((n, own)) < 0.8)
    X[rows, rng.integers(0, d, (n, noise))] = 0.2 * rng.random((n, noise))
    return X.astype(np.float32).astype(np.float64), y


@pytest.mark.parametrize("fill", [1 / 8, 2.0])       # 2.0: no feature is dense, every product sparse
def test_split_products_match_sklearn(fill, monkeypatch):
    """The dense-copy mode's product: a GEMM over a block's well-filled features plus a sparse
    product for its other nonzeros, blocks that straddle classes; scikit-learn's values."""
    monkeypatch.setattr(kernels, "_SPLIT_DENSE_FILL", fill)
    monkeypatch.setattr(kernels, "_SPARSE_COST", 0.0)   # split whatever the cost estimate says
    blocks, whole = [], []
    for name, calls in (("_split_block", blocks), ("_split_block_whole", whole)):
        original = getattr(kernels._DistanceStrips, name)
        monkeypatch.setattr(kernels._DistanceStrips, name,
                            lambda self, *a, calls=calls, original=original: calls.append(a) or original(self, *a))
    X, y = mnist_like_codes(np.random.default_rng(24), 700, 96, 6)
    pred = X.argmax(axis=1)
    P = kernels._points(torch.from_numpy(X))
    strips = kernels._DistanceStrips(P, 64)
    assert strips.augmented is not None and strips.block_axis == 0
    want = [skm.silhouette_score(X, y), skm.silhouette_score(X, pred)]
    for chunk in (None, 64, 100):
        got = kernels._silhouettes(X, [torch.from_numpy(y), torch.from_numpy(pred)], chunk=chunk)
        assert got == pytest.approx(want, rel=REL, abs=1e-12), chunk
    assert len(whole) < len(blocks), "blocks of one class take the split product"


def test_segments_are_runs_of_one_class(monkeypatch):
    """A block's GEMMs run over runs of one class; shorter runs join the next one, a short last
    run the one before."""
    monkeypatch.setattr(kernels, "_SEGMENT_MIN_POINTS", 32)
    P = kernels._points(torch.eye(120))
    groups = torch.repeat_interleave(torch.arange(6), torch.tensor([5, 40, 3, 50, 10, 12]))
    strips = kernels._DistanceStrips(P, 120, groups=groups)
    assert strips._segments(0, 108) == [0, 45, 108]
    assert strips._segments(100, 120) == [0, 20]             # every run short: one segment
    assert strips._segments(5, 45) == [0, 40]
    assert kernels._DistanceStrips(P, 120)._segments(0, 108) == [0, 108]   # no groups: one segment


@pytest.mark.parametrize("kernel", ["scipy", "torch"])
def test_sparse_product_adds_in_place(kernel, monkeypatch):
    """A sparse (rows, cols) matrix times a dense (cols, k) one, added to what the output held,
    with scipy's kernel or torch's addmm_ when scipy's is missing."""
    if kernel == "torch":
        monkeypatch.setattr(kernels, "_scipy_csr_matvecs", lambda: None)
    rng = np.random.default_rng(31)
    A = scipy.sparse.random(50, 70, density=0.1, random_state=1, format="csr")
    B = rng.random((70, 33))
    out = rng.random((50, 33))
    want = out + A @ B
    coo = A.tocoo()                                        # row-major entries
    product = kernels._SparseProduct(coo.row.astype(np.int64), coo.col.astype(np.int64), coo.data, (50, 70))
    assert (product._torch is None) == (kernel == "scipy")
    product.add_to(out, B)
    np.testing.assert_allclose(out, want, rtol=1e-14, atol=0)


@pytest.mark.parametrize("kernel", ["scipy", "torch"])
def test_split_products_per_class_segment_match_sklearn(kernel, monkeypatch):
    """Sparse points (~10% nonzero) in the dense-copy mode, blocks of 128 points straddling classes
    of 30-90 points: one GEMM per class run over its own well-filled features, one sparse product
    for the rest of the block; scikit-learn's values with either sparse kernel."""
    if kernel == "torch":
        monkeypatch.setattr(kernels, "_scipy_csr_matvecs", lambda: None)
    parts = []
    original = kernels._DistanceStrips._segments
    monkeypatch.setattr(kernels._DistanceStrips, "_segments",
                        lambda self, *a: parts.append(original(self, *a)) or parts[-1])
    X, y = mnist_like_codes(np.random.default_rng(28), 900, 256, 12, own=20, noise=5)
    assert 0.05 < float((X != 0).mean()) < 0.12
    pred = X.argmax(axis=1)
    P = kernels._points(torch.from_numpy(X).float())
    assert P.sparse and kernels._DistanceStrips.dense_copy(P)
    got = kernels._silhouettes(torch.from_numpy(X).float(), [torch.from_numpy(y), torch.from_numpy(pred)], chunk=128)
    assert got == pytest.approx([skm.silhouette_score(X, y), skm.silhouette_score(X, pred)], rel=REL, abs=1e-12)
    assert any(len(cuts) > 2 for cuts in parts), "some block holds several class runs"


def test_split_falls_back_to_the_whole_gemm_when_cheaper():
    """Blocks whose nonzeros are scattered (many classes per block): the whole GEMM, same values."""
    X, y = mnist_like_codes(np.random.default_rng(27), 600, 64, 300, own=8, noise=4)
    P = kernels._points(torch.from_numpy(X))
    strips = kernels._DistanceStrips(P, 64)
    assert strips.augmented is not None
    want = skm.silhouette_score(X, y)
    assert kernels._silhouettes(X, [torch.from_numpy(y)], chunk=64)[0] == pytest.approx(want, rel=REL, abs=1e-12)


def test_mnist_shaped_dense_codes_match_sklearn():
    """Codes of MNIST's shape (d = 256, 10 classes, ~13% nonzero; 2,000 of the 10,000 points):
    every score of clustering_metrics equals scikit-learn's on the float64 values."""
    X, y = mnist_like_codes(np.random.default_rng(25), 2000, 256, 10)
    density = float((X != 0).mean())
    assert 0.10 < density < 0.16
    Xt = torch.from_numpy(X).float()
    assert_scores_equal(metrics.clustering_metrics(Xt, y), sklearn_scores(Xt.double().numpy(), y))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_blocks_dealt_to_any_number_of_workers(threads):
    """The symmetric blocks are dealt out back and forth to the workers: every block is computed
    once whatever their number (blocks of 64 points: 11 blocks)."""
    X, y = mnist_like_codes(np.random.default_rng(26), 700, 96, 6)
    pred = X.argmax(axis=1)
    with kernels._threads(threads):
        got = kernels._silhouettes(X, [torch.from_numpy(y), torch.from_numpy(pred)], chunk=64)
    assert got == pytest.approx([skm.silhouette_score(X, y), skm.silhouette_score(X, pred)], rel=REL, abs=1e-12)
