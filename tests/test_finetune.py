"""The fine-tuning engine of the decoupled experiments (common/finetune.py)."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

import common.finetune as FT
from common.errors import UserError
from common.finetune import FinetuneConfig, build_loader, finetune, select_trainable
from common.targets import TargetTable, save_targets

CPU = torch.device("cpu")


class Blobs(Dataset):
    """Gaussian blobs: (x, label, index)."""

    def __init__(self, n: int, seed: int = 0, dim: int = 8, classes: int = 3):
        g = torch.Generator().manual_seed(seed)
        self.y = torch.randint(0, classes, (n,), generator=g)
        self.x = torch.randn(n, dim, generator=g) + 2.0 * F.one_hot(self.y, dim).float()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i]), i


class Net(nn.Module):
    def __init__(self, dim: int = 8, hidden: int = 16, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh())
        self.head = nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


def loaders(n_train=64, batch=8, seed=0):
    return (build_loader(Blobs(n_train, 1), batch, train=True, seed=seed),
            build_loader(Blobs(32, 2), 16, train=False), build_loader(Blobs(32, 3), 16, train=False))


def test_config_rejects_impossible_values():
    with pytest.raises(UserError, match="accum_steps"):
        FinetuneConfig(epochs=1, lr=0.1, accum_steps=0)
    with pytest.raises(UserError, match="unknown fine-tune settings lr_typo"):
        FinetuneConfig.from_dict({"epochs": 1, "lr": 0.1, "lr_typo": 3})
    with pytest.raises(UserError, match="mixup and the auxiliary loss"):
        FinetuneConfig(epochs=1, lr=0.1, mixup_alpha=1.0, aux_lambda=0.1)
    with pytest.raises(UserError, match="amp"):
        FinetuneConfig(epochs=1, lr=0.1, amp="fp8")


def test_only_the_named_parameters_change():
    model = Net()
    before = copy.deepcopy(model.state_dict())
    train, val, test = loaders()
    result = finetune(model, train, val, test, FinetuneConfig(epochs=2, lr=0.1), device=CPU, trainable=["head"])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("body."))
    assert not torch.equal(before["head.weight"], after["head.weight"])
    assert result.test_acc is not None and 0 <= result.test_acc <= 100
    with pytest.raises(UserError, match="no parameters under 'encoder'"):
        select_trainable(Net(), ["encoder"])


def test_best_validation_epoch_is_kept_strictly(monkeypatch):
    """Scores 50, 70, 70, 40: the second epoch wins (a tie does not replace it) and its weights are restored."""
    scores = iter([50.0, 70.0, 70.0, 40.0, 99.0])  # the last call is the test set
    snapshots = []

    def fake_evaluate(model, loader, device, **kw):
        snapshots.append(copy.deepcopy(model.head.state_dict()))
        return next(scores)

    monkeypatch.setattr(FT, "evaluate", fake_evaluate)
    model = Net()
    train, val, test = loaders()
    result = finetune(model, train, val, test, FinetuneConfig(epochs=4, lr=0.2), device=CPU, trainable=["head"])
    assert result.best_epoch == 1 and result.best_val_acc == 70.0 and result.test_acc == 99.0
    assert all(torch.equal(v, snapshots[1][k]) for k, v in model.head.state_dict().items())
    assert not torch.equal(snapshots[1]["weight"], snapshots[2]["weight"])


def test_gradient_accumulation_matches_one_large_batch():
    """4 x accumulation 2 with plain SGD equals batch 8 in one step (same examples, same order)."""
    data = Blobs(32, 5)
    cfg_small = FinetuneConfig(epochs=1, lr=0.5, momentum=0.0, accum_steps=2)
    cfg_large = FinetuneConfig(epochs=1, lr=0.5, momentum=0.0, accum_steps=1)
    val = DataLoader(Blobs(8, 6), batch_size=8)
    a, b = Net(), Net()
    finetune(a, DataLoader(data, batch_size=4), val, None, cfg_small, device=CPU)
    finetune(b, DataLoader(data, batch_size=8), val, None, cfg_large, device=CPU)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6, msg=name)


def test_aux_loss_pulls_each_example_towards_its_own_target(tmp_path):
    """Targets are looked up by dataset index from a shuffled loader: after training with a large λ,
    each hidden activation is closer to its own target than to the target of another example."""
    data = Blobs(64, 7)
    g = torch.Generator().manual_seed(1)
    targets = torch.tanh(data.x @ torch.randn(8, 16, generator=g))  # reachable: a function of each input
    save_targets(tmp_path / "t.npy", targets, data.y)
    table = TargetTable(tmp_path / "t.npy", data.y)
    model = Net()

    def mean_cos(t):
        with torch.no_grad():
            return float(F.cosine_similarity(model.body(data.x), t, dim=1).mean())

    start = mean_cos(targets)
    cfg = FinetuneConfig(epochs=20, lr=0.5, aux_lambda=5.0)
    result = finetune(model, build_loader(data, 8, train=True, seed=3), DataLoader(Blobs(8, 8), batch_size=8), None,
                      cfg, device=CPU, trainable=["body"], hook=("body", "identity"), targets=table)
    assert mean_cos(targets) > start + 0.3
    assert mean_cos(targets) > mean_cos(targets.roll(1, dims=0)) + 0.3
    assert result.history[-1]["train_aux"] < result.history[0]["train_aux"]
    with pytest.raises(UserError, match="needs a hooked module and targets"):
        finetune(Net(), build_loader(data, 8, train=True), DataLoader(data, batch_size=8), None, cfg, device=CPU)


class Interrupting:
    """A loader that raises KeyboardInterrupt after ``limit`` batches in total."""

    def __init__(self, loader, limit):
        self.loader, self.limit, self.seen = loader, limit, 0
        self.sampler = loader.sampler

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            if self.seen == self.limit:
                raise KeyboardInterrupt
            self.seen += 1
            yield batch


def test_interrupted_training_resumes_to_the_same_weights(tmp_path):
    cfg = FinetuneConfig(epochs=3, lr=0.1, momentum=0.9, scheduler="cosine")
    train, val, _ = loaders(n_train=48, batch=8)
    reference = Net()
    ref = finetune(reference, train, val, None, cfg, device=CPU)

    state = tmp_path / "state.pt"
    with pytest.raises(KeyboardInterrupt):  # dies in the third epoch, after two finished ones
        finetune(Net(), Interrupting(loaders(48, 8)[0], 6 * 2 + 3), val, None, cfg, device=CPU, resume_path=state)
    assert state.is_file()
    logs = []
    resumed = Net()
    res = finetune(resumed, loaders(48, 8)[0], val, None, cfg, device=CPU, resume_path=state, log=logs.append)
    assert any("resuming after epoch 2" in line for line in logs)
    assert [h["val_acc"] for h in res.history] == [h["val_acc"] for h in ref.history]
    for (name, pa), (_, pb) in zip(resumed.named_parameters(), reference.named_parameters()):
        torch.testing.assert_close(pa, pb, msg=name)
    state.write_bytes(b"garbage")
    with pytest.raises(UserError, match="unreadable"):
        finetune(Net(), train, val, None, cfg, device=CPU, resume_path=state)


def test_mixup_label_smoothing_and_odd_batches_run():
    """The CIFAR baseline recipe: mixup (pairs, so an odd last batch falls back to smoothed CE) + cosine."""
    cfg = FinetuneConfig(epochs=2, lr=0.05, mixup_alpha=1.0, label_smoothing=0.1, scheduler="cosine",
                         cosine_steps=20, clip_grad=1.0)
    model = Net()
    result = finetune(model, build_loader(Blobs(37, 1), 8, train=True), DataLoader(Blobs(16, 2), batch_size=16), None,
                      cfg, device=CPU, n_classes=3)
    assert len(result.history) == 2 and np.isfinite(result.history[-1]["train_ce"])
    assert result.history[-1]["lr"] == pytest.approx(0.025)  # 10 of 20 cosine steps: half the lr


def test_non_finite_loss_stops_with_one_line():
    model = Net()
    with torch.no_grad():
        model.head.weight.fill_(float("nan"))
    with pytest.raises(UserError, match="the loss became nan"):
        finetune(model, *loaders()[:2], None, FinetuneConfig(epochs=1, lr=0.1), device=CPU)
