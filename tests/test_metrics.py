"""common.metrics against straightforward reference implementations and scikit-learn."""
import math

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from common import metrics
from common.errors import UserError
from common.sae import SAEConfig, SparseAutoencoder


def ref_csi(X, y):
    classes = np.unique(y)
    values = []
    for j in range(X.shape[1]):
        a = np.maximum(X[:, j], 0)
        means = np.array([a[y == c].mean() for c in classes])
        k = int(means.argmax())
        other = np.delete(means, k).mean()
        values.append((means[k] - other) / (means[k] + other + 1e-12))
    return float(np.mean(values))


def ref_u(X, y, faithful):
    values = []
    for j in range(X.shape[1]):
        fires = (X[:, j] > np.percentile(X[:, j], 75)).astype(int)
        mi = skm.mutual_info_score(fires, y)
        if not faithful:
            mi /= np.log(2)
        p = fires.mean()
        h = -(p * np.log2(p + 1e-12) + (1 - p) * np.log2(1 - p + 1e-12))
        values.append(mi / (h + 1e-12))
    return float(np.mean(values))


def sparse_codes(rng, n, d, n_classes, density=0.1):
    y = rng.integers(0, n_classes, n)
    X = np.maximum(rng.normal(size=(n, d)), 0) * (rng.random((n, d)) < density)
    X[np.arange(n), y % d] += 2.0  # class structure
    return X, y


def edge_case_codes(rng):
    X, y = sparse_codes(rng, 400, 40, 6)
    X[:, 3] = 0.0                 # dead feature
    X[:, 5] = 1.7                 # always-on feature
    X[:25] = 0.0                  # all-zero rows (argmax cluster 0)
    y[0] = 6                      # a class with a single example
    return X, y


CASES = {
    "dense-gaussian": lambda rng: (rng.normal(size=(300, 20)), rng.integers(0, 5, 300)),
    "sparse-codes": lambda rng: sparse_codes(rng, 500, 64, 10),
    "edge-cases": edge_case_codes,
    "1000-classes": lambda rng: sparse_codes(rng, 3000, 48, 1000, density=0.3),
}


@pytest.fixture(params=sorted(CASES))
def case(request):
    return CASES[request.param](np.random.default_rng(len(request.param)))


def test_csi_matches_reference(case):
    X, y = case
    assert metrics.csi(X, y) == pytest.approx(ref_csi(X, y), abs=1e-9)


@pytest.mark.parametrize("faithful", [True, False])
def test_uncertainty_coefficient_matches_reference(case, faithful):
    X, y = case
    assert metrics.uncertainty_coefficient(X, y, faithful=faithful) == pytest.approx(ref_u(X, y, faithful), abs=1e-9)


def test_u_units_quirk_is_ln2():
    X, y = sparse_codes(np.random.default_rng(1), 400, 30, 5)
    faithful = metrics.uncertainty_coefficient(X, y, faithful=True)
    assert faithful == pytest.approx(math.log(2) * metrics.uncertainty_coefficient(X, y, faithful=False), rel=1e-9)


def test_dead_and_always_on_features_score_zero():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 4, 200)
    X = np.stack([np.zeros(200), np.full(200, 3.0)], axis=1)
    assert metrics.csi(X, y) == 0.0
    assert metrics.uncertainty_coefficient(X, y) == 0.0


def test_perfectly_selective_feature():
    y = np.repeat(np.arange(4), 50)
    X = (y[:, None] == np.arange(4)[None, :]).astype(float)
    assert metrics.csi(X, y) == pytest.approx(1.0, abs=1e-9)


def test_clustering_scores_match_sklearn(case):
    X, y = case
    pred = X.argmax(axis=1)
    assert metrics.silhouette(X, y) == pytest.approx(skm.silhouette_score(X, y), abs=1e-9)
    assert metrics.silhouette(X, pred) == pytest.approx(skm.silhouette_score(X, pred), abs=1e-9)
    assert metrics.davies_bouldin(X, y) == pytest.approx(skm.davies_bouldin_score(X, y), rel=1e-9)
    assert metrics.calinski_harabasz(X, y) == pytest.approx(skm.calinski_harabasz_score(X, y), rel=1e-9)
    assert metrics.adjusted_rand(y, pred) == pytest.approx(skm.adjusted_rand_score(y, pred), abs=1e-12)


def test_clustering_metrics_uses_argmax_clusters_and_true_labels(case):
    X, y = case
    pred = X.argmax(axis=1)
    got = metrics.clustering_metrics(X, y)
    assert set(got) == {"ari", "sil_u", "sil_s", "dbi", "chi"}
    assert all(isinstance(v, float) for v in got.values())
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(y, pred), abs=1e-12)
    assert got["sil_u"] == pytest.approx(skm.silhouette_score(X, pred), abs=1e-9)
    assert got["sil_s"] == pytest.approx(skm.silhouette_score(X, y), abs=1e-9)
    assert got["dbi"] == pytest.approx(skm.davies_bouldin_score(X, y), rel=1e-9)
    assert got["chi"] == pytest.approx(skm.calinski_harabasz_score(X, y), rel=1e-9)


def test_chunking_does_not_change_silhouette():
    X, y = sparse_codes(np.random.default_rng(3), 257, 16, 7)
    assert metrics.silhouette(X, y, chunk=10) == pytest.approx(metrics.silhouette(X, y, chunk=1000), abs=1e-12)


def test_single_cluster_is_nan_not_a_crash():
    X = np.zeros((50, 8))
    y = np.arange(50) % 3
    got = metrics.clustering_metrics(X, y)
    assert math.isnan(got["sil_u"])          # every code is zero -> one argmax cluster
    assert got["ari"] == pytest.approx(skm.adjusted_rand_score(y, np.zeros(50, int)))


def test_l0_counts_entries_above_threshold():
    codes = np.array([[0.0, 1e-6, 0.5], [2.0, 0.0, 3.0]])
    assert metrics.l0(codes) == 2.0          # nonzero: (2 + 2) / 2
    assert metrics.l0(codes, 1e-5) == 1.5    # MNIST threshold: (1 + 2) / 2


def test_reconstruction_csi_pair():
    torch.manual_seed(0)
    sae = SparseAutoencoder(SAEConfig(d_in=6, d_sae=12, l1_coeff=0.0))
    y = torch.arange(60) % 3
    codes = torch.relu(torch.randn(60, 12)) + (torch.arange(12)[None, :] // 4 == y[:, None]) * 2.0
    got = metrics.reconstruction_csi(sae, codes, y, k=4)
    with torch.no_grad():
        full = sae.decode(codes)
        keep = (torch.arange(12)[None, :] // 4 == y[:, None]).float()  # each class's top-4 are its own block
        sharp = sae.decode(codes * keep)
    assert got["csi_recon"] == pytest.approx(ref_csi(full.numpy().astype(float), y.numpy()), abs=1e-6)
    assert got["csi_recon_sharpened"] == pytest.approx(ref_csi(sharp.numpy().astype(float), y.numpy()), abs=1e-6)


def test_reconstruction_csi_with_given_top_features():
    """A top-feature table chosen elsewhere (e.g. on the training codes) is used as given, row c for
    class c, also when the labels here are not 0..C-1 in order."""
    torch.manual_seed(1)
    sae = SparseAutoencoder(SAEConfig(d_in=5, d_sae=9, l1_coeff=0.0))
    y = torch.tensor([2, 5, 7] * 20)
    codes = torch.relu(torch.randn(60, 9))
    top = torch.randint(0, 9, (8, 3))
    got = metrics.reconstruction_csi(sae, codes, y, k=3, top=top)
    keep = torch.zeros(60, 9)
    keep.scatter_(1, top[y], 1.0)
    with torch.no_grad():
        sharp = sae.decode(codes * keep)
    assert got["csi_recon_sharpened"] == pytest.approx(ref_csi(sharp.numpy().astype(float), y.numpy()), abs=1e-6)
    chosen_here = metrics.reconstruction_csi(sae, codes, y, k=3)
    assert got["csi_recon"] == pytest.approx(chosen_here["csi_recon"])
    with pytest.raises(UserError):
        metrics.reconstruction_csi(sae, codes, y, k=3, top=top[:5])


@pytest.mark.parametrize("call", [
    lambda: metrics.csi(np.ones((5, 3)), np.arange(4)),
    lambda: metrics.csi(np.ones(5), np.arange(5)),
    lambda: metrics.csi(np.ones((5, 3)), np.zeros(5)),
    lambda: metrics.uncertainty_coefficient(np.ones((5, 3)), np.arange(6)),
    lambda: metrics.clustering_metrics(np.ones((5, 3)), np.arange(4)),
    lambda: metrics.silhouette(np.array([[np.nan, 1.0], [0.0, 1.0]]), np.array([0, 1])),
])
def test_bad_input_is_one_clear_error(call):
    with pytest.raises(UserError):
        call()


def test_bfloat16_codes_give_their_float32_values_scores():
    """SAE codes from a bf16 autocast run: every monosemanticity metric takes them (numpy has no bf16)."""
    X, y = sparse_codes(np.random.default_rng(3), 300, 20, 4)
    Xb = torch.from_numpy(X).to(torch.bfloat16)
    X32 = Xb.float()
    for faithful in (True, False):
        assert metrics.uncertainty_coefficient(Xb, y, faithful) == metrics.uncertainty_coefficient(X32, y, faithful)
    assert metrics.csi(Xb, y) == metrics.csi(X32, y) and metrics.l0(Xb) == metrics.l0(X32)
