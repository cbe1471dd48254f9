"""common.concurrent_training: the authors' data order, one-optimiser equivalence, batched λ sweep."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from common.concurrent_training import loader_permutations, sweep_aux_weight, train_concurrent
from common.sae import SAEConfig, SparseAutoencoder


def test_order_equals_a_seeded_shuffled_dataloader():
    loader = DataLoader(TensorDataset(torch.arange(100)), batch_size=100, shuffle=True,
                        generator=torch.Generator().manual_seed(42))
    expected = [batch[0] for _ in range(3) for batch in loader]
    for got, want in zip(loader_permutations(100, 42, 3), expected):
        assert torch.equal(got, want)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(20, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        return self.fc2(h), h


def data(n=300, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(3, 20, generator=g)[y] * 2 + torch.randn(n, 20, generator=g)
    return x, y, torch.randn(n, 8, generator=g)


def make():
    torch.manual_seed(7)
    return Tiny()


def test_one_optimiser_equals_separate_optimisers():
    x, y, t = data()
    model, sae = make(), SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, l1_coeff=0.1, l1_form="mean"))
    ref_model, ref_sae = copy.deepcopy(model), copy.deepcopy(sae)
    train_concurrent(model, {1: sae}, (x[:240], y[:240]), (x[240:], y[240:]), epochs=1, batch_size=32, lr=1e-2,
                     sae_lr=1e-2, seed=3, aux_weight=0.5, targets=t[:240])
    # the authors' loop: two optimisers, two backward passes, same data order
    opt_m, opt_s = torch.optim.Adam(ref_model.parameters(), lr=1e-2), torch.optim.Adam(ref_sae.parameters(), lr=1e-2)
    for idx in loader_permutations(240, 3, 1)[0].split(32):
        logits, h = ref_model(x[idx])
        loss = nn.functional.cross_entropy(logits, y[idx]) + 0.5 * (1 - nn.functional.cosine_similarity(h, t[idx])).mean()
        opt_m.zero_grad(); loss.backward(); opt_m.step()
        sae_loss = ref_sae.loss(h.detach()).total
        opt_s.zero_grad(); sae_loss.backward(); opt_s.step()
    for a, b in zip(list(model.parameters()) + list(sae.parameters()), list(ref_model.parameters()) + list(ref_sae.parameters())):
        assert torch.allclose(a, b, atol=1e-5)


def test_best_validation_epoch_is_kept():
    x, y, t = data()
    model = make()
    out = train_concurrent(model, {}, (x[:240], y[:240]), (x[240:], y[240:]), epochs=4, batch_size=32, lr=1e-2,
                           sae_lr=1e-2, seed=0)
    accs = [r["val_acc"] for r in out["history"]]
    assert out["best_epoch"] == accs.index(max(accs)) and out["best_val_acc"] == max(accs)


@pytest.mark.parametrize("kind", ["cosine", "broadcast"])
def test_batched_sweep_equals_separate_runs(kind):
    x, y, t = data()
    lambdas = [0.0, 0.3, 1.0]
    swept = sweep_aux_weight(make, lambdas, (x[:240], y[:240]), (x[240:], y[240:]), epochs=3, batch_size=32, lr=1e-2,
                             seed=1, targets=t[:240], aux_kind=kind)
    for lam, result in zip(lambdas, swept):
        single = train_concurrent(make(), {}, (x[:240], y[:240]), (x[240:], y[240:]), epochs=3, batch_size=32,
                                  lr=1e-2, sae_lr=1e-2, seed=1, aux_weight=lam, aux_kind=kind, targets=t[:240])
        assert result["lambda"] == lam
        assert result["best_val_acc"] == pytest.approx(single["best_val_acc"], abs=1e-4)
        assert result["best_epoch"] == single["best_epoch"]
