"""Linear probes on SAE codes: scikit-learn logistic regression (MNIST) and a torch linear layer
(CIFAR-10, ImageNet). Both return test accuracy in percent."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .activations import as_source
from .errors import require


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def sklearn_probe(train_x, train_y, test_x, test_y, max_iter: int = 1000) -> float:
    """L2 logistic regression with scikit-learn defaults otherwise (lbfgs, C=1), features unscaled,
    as the authors ran it; convergence warnings are silenced (they are expected on raw codes)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    train_x, test_x, train_y, test_y = map(_numpy, (train_x, test_x, train_y, test_y))
    require(train_x.ndim == 2 and test_x.ndim == 2 and train_x.shape[1] == test_x.shape[1],
            f"probe inputs must be 2-d with the same width, got {train_x.shape} and {test_x.shape}")
    require(len(train_x) == len(train_y) and len(test_x) == len(test_y), "probe features and labels differ in length")
    require(len(np.unique(train_y)) >= 2, "a probe needs at least two classes in its training data")
    probe = LogisticRegression(max_iter=max_iter)  # the authors' n_jobs=-1 has no effect on lbfgs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        probe.fit(train_x, train_y)
    return 100.0 * float((probe.predict(test_x) == test_y).mean())


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
    for epoch in range(epochs):
        for batch in tqdm(train.iter_batches(batch_size, shuffle=True, seed=seed + epoch), total=steps,
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
        for batch in test.iter_batches(4 * batch_size):
            correct += int((probe(batch.x.to(device)).argmax(1).cpu() == batch.labels).sum())
            total += batch.x.shape[0]
    require(total > 0, "no test codes to score the probe on")
    return 100.0 * correct / total
