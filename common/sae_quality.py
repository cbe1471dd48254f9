"""How good an SAE is as an SAE, the numbers SAE users compare: all on the test set's hooked activations.

=====================  ===================================================================================
``explained_variance``  1 - FVU: 1 - sum_i ||x_i - x̂_i||² / sum_i ||x_i - mean(x)||², x̂ = decode(encode(x))
``recon_mse``           mean over examples and dimensions of (x - x̂)² (the SAE training loss' MSE term)
``dead_frac``           share of the d_sae features that are zero on every test example
``l0``                  mean number of nonzero codes per example (:func:`common.metrics.l0`)
``acc_spliced``         task accuracy (%) with the hooked activation replaced by x̂: ``head(x̂)``
=====================  ===================================================================================

``head`` maps the hooked activation to the logits (the rest of the model after the hook), e.g. for the
MNIST MLP ``lambda h1: fc3(relu(fc2(h1)))``. Everything is computed in batches with float64 sums, so
a dataset-sized activation matrix is never copied. Nothing here knows about an experiment.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from .io import read_json, write_json
from .metrics import l0

__all__ = ["QUALITY_COLUMNS", "FEATURE_DENSITY_FILE", "explained_variance", "recon_mse", "dead_frac",
           "feature_density", "l0", "acc_spliced", "sae_quality", "write_feature_density", "read_feature_density"]

QUALITY_COLUMNS = ("explained_variance", "recon_mse", "dead_frac", "acc_spliced")
FEATURE_DENSITY_FILE = "feature_density.json"   # per cycle directory, for the notebooks' density histograms

Head = Callable[[torch.Tensor], torch.Tensor]


def _batches(acts: torch.Tensor, batch_size: int, device: torch.device):
    for start in range(0, acts.shape[0], batch_size):
        yield start, acts[start:start + batch_size].to(device, torch.float32)


def _device(sae) -> torch.device:
    return next(sae.parameters()).device


def explained_variance(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """1 - sum ||x - x̂||² / sum ||x - mean(x)||² over the rows (examples) of x."""
    x, x_hat = x.double(), x_hat.double()
    residual = (x - x_hat).square().sum()
    total = (x - x.mean(dim=0)).square().sum()
    return float(1.0 - residual / total) if total > 0 else float("nan")


def recon_mse(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """Mean squared error over every element."""
    return float((x.double() - x_hat.double()).square().mean())


def feature_density(codes: torch.Tensor) -> torch.Tensor:
    """Per feature, the share of examples on which it is nonzero (d_sae floats in [0, 1])."""
    return (codes != 0).double().mean(dim=0)


def dead_frac(codes: torch.Tensor) -> float:
    """Share of features that are zero on every example."""
    return float((codes != 0).sum(dim=0).eq(0).double().mean())


@torch.no_grad()
def acc_spliced(head: Head, sae, acts: torch.Tensor, labels: torch.Tensor, batch_size: int = 4096) -> float:
    """Accuracy (%) of ``head(decode(encode(acts)))`` against ``labels``."""
    device = _device(sae)
    correct = 0
    for start, x in _batches(acts, batch_size, device):
        logits = head(sae.decode(sae.encode(x)))
        correct += int((logits.argmax(dim=-1).cpu() == labels[start:start + len(x)].cpu()).sum())
    return 100.0 * correct / len(labels)


@torch.no_grad()
def sae_quality(sae, acts: torch.Tensor, *, head: Head | None = None, labels: torch.Tensor | None = None,
                batch_size: int = 4096, return_density: bool = False) -> dict:
    """``explained_variance``, ``recon_mse``, ``dead_frac`` and (given ``head`` and ``labels``)
    ``acc_spliced`` of ``sae`` on ``acts`` (examples x d_in), in two streamed passes (the mean, then
    the rest); NaN for ``acc_spliced`` without a head. With ``return_density`` the result also holds
    ``feature_density`` (a d_sae tensor, see :func:`feature_density`)."""
    device = _device(sae)
    n, d_in = acts.shape
    mean = torch.zeros(d_in, dtype=torch.float64, device=device)
    for _, x in _batches(acts, batch_size, device):
        mean += x.double().sum(dim=0)
    mean /= n
    residual = total = 0.0
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.float64, device=device)
    correct = 0
    for start, x in _batches(acts, batch_size, device):
        z = sae.encode(x)
        x_hat = sae.decode(z)
        residual += float((x.double() - x_hat.double()).square().sum())
        total += float((x.double() - mean).square().sum())
        fired += (z != 0).double().sum(dim=0)
        if head is not None and labels is not None:
            logits = head(x_hat)
            correct += int((logits.argmax(dim=-1).cpu() == labels[start:start + len(x)].cpu()).sum())
    out = {"explained_variance": 1.0 - residual / total if total > 0 else float("nan"), "recon_mse": residual / (n * d_in),
           "dead_frac": float(fired.eq(0).double().mean()),
           "acc_spliced": 100.0 * correct / n if head is not None and labels is not None else float("nan")}
    if return_density:
        out["feature_density"] = (fired / n).cpu()
    return out


def write_feature_density(directory: str | os.PathLike, density: torch.Tensor, n_examples: int) -> Path:
    """``directory/feature_density.json``: each feature's firing share on the test set (6 significant
    digits: ~3 KB for 256 features, ~70 KB for 6144), for the notebooks' histograms."""
    path = Path(directory) / FEATURE_DENSITY_FILE
    write_json(path, {"n_examples": int(n_examples), "density": [float(f"{v:.6g}") for v in density.tolist()]})
    return path


def read_feature_density(directory: str | os.PathLike) -> torch.Tensor | None:
    """The densities :func:`write_feature_density` wrote in ``directory``; None when there are none."""
    path = Path(directory) / FEATURE_DENSITY_FILE
    return torch.tensor(read_json(path)["density"], dtype=torch.float64) if path.is_file() else None
