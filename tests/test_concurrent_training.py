"""common.concurrent_training: the authors' data order, their floating-point path (plain Adam,
separate optimisers) bit for bit, the hand-derived step against autograd, batched λ sweep."""
import copy
import sys

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from common.aux_loss import aux_loss
from common.concurrent_training import ManualStep, loader_permutations, sweep_aux_lambda, train_concurrent
from common.sae import SAEConfig, SparseAutoencoder
from conftest import REPO

sys.path.insert(0, str(REPO / "DIGIT-MNIST"))
from mnist import MLP  # noqa: E402
sys.path.pop(0)


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


class ListedTiny(Tiny):
    def linear_layers(self):
        return [self.fc1, self.fc2]


def make_listed():
    torch.manual_seed(7)
    return ListedTiny()


def test_one_optimiser_equals_separate_optimisers():
    x, y, t = data()
    model, sae = make(), SparseAutoencoder(SAEConfig(d_in=8, d_sae=16, l1_coeff=0.1, l1_form="mean"))
    ref_model, ref_sae = copy.deepcopy(model), copy.deepcopy(sae)
    train_concurrent(model, {1: sae}, (x[:240], y[:240]), (x[240:], y[240:]), epochs=1, batch_size=32, lr=1e-2,
                     sae_lr=1e-2, seed=3, aux_lambda=0.5, targets=t[:240])
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


@pytest.mark.parametrize("step", ["autograd", "manual"])
@pytest.mark.parametrize("kind", ["cosine", "broadcast"])
def test_batched_sweep_equals_separate_runs(kind, step):
    x, y, t = data()
    lambdas = [0.0, 0.3, 1.0]
    swept = sweep_aux_lambda(make_listed, lambdas, (x[:240], y[:240]), (x[240:], y[240:]), epochs=3, batch_size=32,
                             lr=1e-2, seed=1, targets=t[:240], aux_kind=kind, step=step)
    for aux_lambda, result in zip(lambdas, swept):
        single = train_concurrent(make_listed(), {}, (x[:240], y[:240]), (x[240:], y[240:]), epochs=3, batch_size=32,
                                  lr=1e-2, sae_lr=1e-2, seed=1, aux_lambda=aux_lambda, aux_kind=kind, targets=t[:240])
        assert result["aux_lambda"] == aux_lambda
        assert result["best_val_acc"] == pytest.approx(single["best_val_acc"], abs=1e-4)
        assert result["best_epoch"] == single["best_epoch"]


@pytest.mark.parametrize("kind", ["cosine", "broadcast"])
def test_stacked_manual_step_gives_each_copys_autograd_gradient(kind):
    """StackedManualStep (the manual λ sweep) in float64 on the 784-16-16-10 MLP, copies with other
    weights and other λ (aux on h1, behind a hidden layer): each copy's gradient is autograd's."""
    from common.aux_loss import aux_loss
    from common.concurrent_training import StackedManualStep

    lambdas = [0.0, 0.4, 2.5]
    models = []
    for i in range(len(lambdas)):
        torch.manual_seed(i)
        models.append(MLP().double())
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(32, 784, generator=g, dtype=torch.float64) * 255, torch.randint(0, 10, (32,), generator=g)
    t = torch.randn(32, 16, generator=g, dtype=torch.float64)
    step = StackedManualStep(models, lambdas, kind, aux_layer=1)
    step.gradients(x, y, t)
    for m, (model, value) in enumerate(zip(models, lambdas)):
        logits, h1, _ = model(x)
        loss = nn.functional.cross_entropy(logits, y) + value * aux_loss(h1, t, kind)
        grads = torch.autograd.grad(loss, [p for layer in model.linear_layers() for p in (layer.weight, layer.bias)])
        ours = [p.grad[m] for pair in zip(step.weights, step.biases) for p in pair]
        for a, b in zip(ours, grads):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


def test_sweep_reports_the_test_accuracy_of_each_runs_best_validation_epoch():
    """aux.select_on test (the authors' choice of λ): each run's test accuracy at its best validation
    epoch. With the validation split given as the test split too, the two columns must agree; with
    another split they are that split's accuracy of the very model a single run keeps."""
    x, y, t = data()
    lambdas = [0.0, 0.5]
    train, val, other = (x[:200], y[:200]), (x[200:260], y[200:260]), (x[260:], y[260:])
    same = sweep_aux_lambda(make, lambdas, train, val, epochs=3, batch_size=32, lr=1e-2, seed=1, targets=t[:200],
                            test=val)
    assert [r["best_test_acc"] for r in same] == pytest.approx([r["best_val_acc"] for r in same], abs=1e-4)
    swept = sweep_aux_lambda(make, lambdas, train, val, epochs=3, batch_size=32, lr=1e-2, seed=1, targets=t[:200],
                             test=other)
    for aux_lambda, result in zip(lambdas, swept):
        model = make()
        train_concurrent(model, {}, train, val, epochs=3, batch_size=32, lr=1e-2, sae_lr=1e-2, seed=1,
                         aux_lambda=aux_lambda, targets=t[:200])
        with torch.no_grad():
            acc = 100.0 * (model(other[0])[0].argmax(1) == other[1]).double().mean().item()
        assert result["best_test_acc"] == pytest.approx(acc, abs=1e-4)
    assert "best_test_acc" not in sweep_aux_lambda(make, lambdas, train, val, epochs=1, batch_size=32, lr=1e-2,
                                                   seed=1, targets=t[:200])[0]


# ----------------------------------------------------------------------------- the authors' path

class PixelDataset(Dataset):
    """As the authors' dataset: uint8 images turned into float per item, int64 labels, and the
    auxiliary target stored per example ((1, 16) for the main runs, (16,) for the random ablation)."""

    def __init__(self, images, labels, targets=None):
        self.images, self.labels, self.targets = images, labels, targets

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        item = (torch.from_numpy(self.images[i].copy()).float(), torch.tensor(self.labels[i], dtype=torch.long))
        return item if self.targets is None else (*item, self.targets[i])


def pixel_data(n_train=320, n_val=64, seed=0):
    rng = np.random.default_rng(seed)
    patterns = (rng.random((10, 28, 28)) < 0.15) * 200.0
    labels = rng.integers(0, 10, n_train + n_val)
    images = np.clip(patterns[labels] + rng.normal(0, 40, (len(labels), 28, 28)), 0, 255).astype(np.uint8)
    targets = torch.from_numpy(rng.normal(size=(n_train, 16))).float()
    return images[:n_train], labels[:n_train], images[n_train:], labels[n_train:], targets


def build(seed=42):
    """As the authors' main.py: the seed reset before the MLP and before each SAE."""
    torch.manual_seed(seed)
    model = MLP()
    saes = {}
    for layer in (1, 2):
        torch.manual_seed(seed)
        saes[layer] = SparseAutoencoder(SAEConfig(d_in=16, d_sae=256, l1_coeff=0.75, l1_form="mean"))
    return model, saes


def authors_loop(kind, loss_factor, images, labels, val_images, val_labels, targets, epochs):
    """The authors' procedure written as their code does it: three optimisers with PyTorch's
    defaults, a DataLoader shuffled by generator 42, the MLP step (CE + λ aux, backward, step), then
    one step per SAE on the detached activations, and the strictly-best validation epoch kept."""
    model, saes = build()
    optimizer = torch.optim.Adam(model.parameters())
    sae_optimizers = {k: torch.optim.Adam(s.parameters()) for k, s in saes.items()}
    stored = None if kind == "baseline" else [t.view(1, 16) if kind == "broadcast" else t.clone() for t in targets]
    loader = DataLoader(PixelDataset(images, labels, stored), batch_size=64, shuffle=True, num_workers=0,
                        generator=torch.Generator().manual_seed(42))
    val = DataLoader(PixelDataset(val_images, val_labels), batch_size=128, shuffle=False)
    cosine = nn.CosineSimilarity()
    best, best_state = 0.0, None
    for _ in range(epochs):
        for batch in loader:
            images_b, labels_b = batch[0], batch[1]
            optimizer.zero_grad()
            logits, h1, h2 = model(images_b)
            loss = nn.CrossEntropyLoss()(logits, labels_b)
            if kind != "baseline":
                loss = loss + loss_factor * (1 - cosine(h1, batch[2])).mean()
            loss.backward()
            optimizer.step()
            for k, h in ((1, h1.detach()), (2, h2.detach())):
                sae_optimizers[k].zero_grad()
                reconstructed, encoded = saes[k](h)
                sae_loss = nn.MSELoss()(reconstructed, h) + 0.75 * torch.mean(torch.abs(encoded))
                sae_loss.backward()
                sae_optimizers[k].step()
        with torch.no_grad():
            correct = sum(int((model(x)[0].argmax(1) == y).sum()) for x, y in val)
        accuracy = 100 * correct / len(val_labels)
        if accuracy > best:
            best, best_state = accuracy, copy.deepcopy([model.state_dict(), *(s.state_dict() for s in saes.values())])
    return best_state


def ours(kind, aux_lambda, images, labels, val_images, val_labels, targets, epochs, adam="plain", step="autograd"):
    model, saes = build()
    as_float = lambda a: torch.from_numpy(a.reshape(len(a), -1)).float()
    train_concurrent(model, saes, (as_float(images), torch.from_numpy(labels).long()),
                     (as_float(val_images), torch.from_numpy(val_labels).long()), epochs=epochs, batch_size=64,
                     lr=0.001, sae_lr=0.001, seed=42, aux_lambda=0.0 if kind == "baseline" else aux_lambda,
                     aux_kind="cosine" if kind == "baseline" else kind, targets=targets, adam=adam, step=step)
    return [model.state_dict(), *(s.state_dict() for s in saes.values())]


@pytest.mark.parametrize("kind", ["baseline", "broadcast", "cosine"])
def test_plain_adam_follows_the_authors_loop_bit_for_bit(kind):
    """adam plain + step autograd: one optimiser and one backward of the summed losses give exactly
    the authors' separate-optimiser updates (their λ came from np.arange: 0.060000000000000005)."""
    data = pixel_data()
    loss_factor = np.arange(0.01, 0.31, 0.01)[5]
    theirs = authors_loop(kind, loss_factor, *data, epochs=2)
    mine = ours(kind, 0.06, *data, epochs=2)
    for a, b in zip(theirs, mine):
        assert a.keys() == b.keys()
        for name in a:
            assert torch.equal(a[name], b[name]), name
    fused = ours(kind, 0.06, *data, epochs=2, adam="fused")      # the check can fail: the fast kernel rounds otherwise
    assert any(not torch.equal(f[name], m[name]) for f, m in zip(fused, mine) for name in f)


# ----------------------------------------------------------------------------- the hand-derived step

def autograd_grads(model, saes, x, y, t, aux_lambda, kind):
    logits, h1, h2 = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    if aux_lambda > 0:
        loss = loss + aux_lambda * aux_loss(h1, t, kind)
    loss = loss + saes[1].loss(h1.detach()).total + saes[2].loss(h2.detach()).total
    for p in [*model.parameters(), *saes[1].parameters(), *saes[2].parameters()]:
        p.grad = None
    loss.backward()
    return [p.grad.clone() for p in [*model.parameters(), *saes[1].parameters(), *saes[2].parameters()]]


@pytest.mark.parametrize("kind", ["baseline", "cosine", "broadcast"])
def test_manual_gradients_equal_autograds_in_float64(kind):
    model, saes = build()
    model, saes = model.double(), {k: s.double() for k, s in saes.items()}
    with torch.no_grad():
        model.fc1.bias[3] = -1e6           # a unit dead on the whole batch: its column of h1 is all zero
    g = torch.Generator().manual_seed(1)
    x = torch.rand(50, 784, generator=g, dtype=torch.float64) * 255
    y = torch.randint(0, 10, (50,), generator=g)
    t = torch.randn(50, 16, generator=g, dtype=torch.float64)
    t[0, :] = 0.0                          # a zero target row and a zero coordinate (cosine of 0)
    t[1, 5] = 0.0
    aux_lambda = 0.0 if kind == "baseline" else 0.3
    kind = "cosine" if kind == "baseline" else kind
    expected = autograd_grads(model, saes, x, y, t, aux_lambda, kind)
    step = ManualStep(model, saes, aux_lambda=aux_lambda, aux_kind=kind)
    losses = step(x, y, step.step_targets(t)[:50])
    got = [p.grad for p in [*model.parameters(), *saes[1].parameters(), *saes[2].parameters()]]
    for a, b in zip(got, expected):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12 * float(b.abs().max()))
    assert bool((expected[0][3] == 0).all()) and float(expected[0].abs().max()) > 0
    with torch.no_grad():
        logits, h1, h2 = model(x)
        task = nn.functional.cross_entropy(logits, y)
        aux = aux_loss(h1, t, kind) if aux_lambda > 0 else torch.zeros(())
    assert float(losses[0]) == pytest.approx(float(task), rel=1e-12)
    assert float(losses[1]) == pytest.approx(float(aux), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("kind", ["baseline", "cosine", "broadcast"])
def test_manual_training_follows_autograds_trajectory(kind):
    """Two epochs (10 steps with a short last batch): float64 equal to 1e-9, float32 to rounding."""
    data = pixel_data()
    for dtype, tol in ((torch.float64, 1e-9), (torch.float32, 2e-4)):
        runs = []
        for step in ("autograd", "manual"):
            model, saes = build()
            model, saes = model.to(dtype), {k: s.to(dtype) for k, s in saes.items()}
            images, labels, val_images, val_labels, targets = data
            as_x = lambda a: torch.from_numpy(a.reshape(len(a), -1)).to(dtype)
            train_concurrent(model, saes, (as_x(images), torch.from_numpy(labels).long()),
                             (as_x(val_images), torch.from_numpy(val_labels).long()), epochs=2, batch_size=48,
                             lr=0.001, sae_lr=0.001, seed=42, aux_lambda=0.0 if kind == "baseline" else 0.2,
                             aux_kind="cosine" if kind == "baseline" else kind, targets=targets.to(dtype),
                             adam="fused", step=step)
            runs.append([p.detach().clone() for p in [*model.parameters(), *saes[1].parameters(),
                                                      *saes[2].parameters()]])
        for a, b in zip(*runs):
            assert torch.allclose(a, b, rtol=tol, atol=tol * float(b.abs().max())), (dtype, kind)


def test_manual_step_needs_an_mlp_that_lists_its_layers():
    from common.errors import UserError

    with pytest.raises(UserError, match="linear_layers"):
        ManualStep(Tiny(), {})


@pytest.mark.parametrize("step", ["autograd", "manual"])
def test_fused_adam_is_torchs_fused_adam_bit_for_bit(step, monkeypatch):
    """train.adam fused calls torch's fused Adam kernel directly (common.fused_adam): the same
    training with torch.optim.Adam(fused=True) in its place ends at the same bits."""
    import common.concurrent_training as ct
    from common.fused_adam import FusedAdam

    x, y = torch.rand(192, 784) * 255, torch.randint(0, 10, (192,))
    t = torch.randn(192, 16)
    cfg = SAEConfig(d_in=16, d_sae=32, l1_coeff=0.5, l1_form="mean")
    results = []
    for optimiser in ("ours", "torch"):
        if optimiser == "torch":
            monkeypatch.setattr(ct, "FusedAdam", lambda groups: torch.optim.Adam(groups, fused=True))
        torch.manual_seed(3)
        model, saes = MLP(), {1: SparseAutoencoder(cfg), 2: SparseAutoencoder(cfg)}
        train_concurrent(model, saes, (x[:160], y[:160]), (x[160:], y[160:]), epochs=2, batch_size=32, lr=1e-3,
                         sae_lr=1e-3, seed=5, aux_lambda=0.2, aux_kind="broadcast", targets=t[:160], step=step)
        results.append([p.detach().clone() for p in [*model.parameters(), *saes[1].parameters(), *saes[2].parameters()]])
    assert all(torch.equal(a, b) for a, b in zip(*results))
    p = nn.Parameter(torch.ones(3))
    opt = FusedAdam([{"params": [p], "lr": 0.1}])
    opt.step()                                                  # no gradient: no update, as torch's Adam
    assert torch.equal(p, torch.ones(3)) and not opt.state
