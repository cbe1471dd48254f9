"""Training an SAE from an activation source: Adam, epochs, best validation loss, tqdm."""
from __future__ import annotations

import copy
import math

import torch
from tqdm.auto import tqdm

from . import preflight
from .activations import ActivationSource, as_source
from .errors import require
from .sae import SparseAutoencoder


def sae_step(sae: SparseAutoencoder, optimizer: torch.optim.Optimizer, x: torch.Tensor,
             autocast_dtype: torch.dtype | None = None) -> float:
    """One Adam step on a batch, then the decoder constraint; returns the loss.

    In full precision the gradients come from :meth:`SparseAutoencoder.loss_and_grads_` (by hand,
    into buffers kept between steps); under autocast from autograd."""
    if autocast_dtype is None:
        loss = sae.loss_and_grads_(x).total
    else:
        with torch.autocast(x.device.type, dtype=autocast_dtype):
            loss = sae.loss(x).total
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
    optimizer.step()
    sae.normalize_decoder_()
    return float(loss.detach())


@torch.no_grad()
def evaluate_sae(sae: SparseAutoencoder, source: ActivationSource, batch_size: int = 1024,
                 device: str | torch.device = "cpu") -> dict[str, float]:
    """Example-weighted mean loss terms and L0 (count of nonzero codes) over a source."""
    totals = {"loss": 0.0, "mse": 0.0, "l1": 0.0, "l0": 0.0}
    n = 0
    batches = preflight.steps(source.iter_batches(batch_size), "SAE val", total=math.ceil(len(source) / batch_size))
    for batch in batches:
        x = batch.x.to(device)
        loss = sae.loss(x)
        z = sae.encode(x)
        b = x.shape[0]
        totals["loss"] += float(loss.total) * b
        totals["mse"] += float(loss.mse) * b
        totals["l1"] += float(loss.l1) * b
        totals["l0"] += float((z > 0).sum())
        n += b
    require(n > 0, "cannot evaluate an SAE on an empty activation source")
    return {k: v / n for k, v in totals.items()}


def train_sae(sae: SparseAutoencoder, train, val=None, *, epochs: int, batch_size: int, lr: float,
              seed: int = 0, device: str | torch.device = "cpu", autocast_dtype: torch.dtype | None = None,
              desc: str = "SAE") -> dict:
    """Train in place; the weights of the epoch with the lowest validation loss are kept.

    ``train``/``val`` are activation sources or arrays. Without ``val`` the last epoch is kept.
    """
    require(epochs > 0, f"SAE epochs must be positive, got {epochs}")
    require(lr > 0, f"SAE learning rate must be positive, got {lr}")
    train, val = as_source(train), (as_source(val) if val is not None else None)
    require(len(train) > 0, "no activations to train the SAE on")
    require(train.dim == sae.cfg.d_in, f"activations have width {train.dim} but the SAE expects {sae.cfg.d_in}")
    sae.to(device).train()
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr, fused=True)
    best_loss, best_state, best_epoch, history = math.inf, None, -1, []
    steps_per_epoch = math.ceil(len(train) / batch_size)
    for epoch in preflight.epochs(range(epochs)):
        running = 0.0
        batches = preflight.steps(train.iter_batches(batch_size, shuffle=True, seed=seed + epoch), f"{desc} train",
                                  total=steps_per_epoch)
        for batch in tqdm(batches, total=steps_per_epoch, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            running += sae_step(sae, optimizer, batch.x.to(device, non_blocking=True), autocast_dtype)
        record = {"epoch": epoch, "train_loss": running / steps_per_epoch}
        if val is not None:
            sae.eval()
            record.update({f"val_{k}": v for k, v in evaluate_sae(sae, val, 4 * batch_size, device).items()})
            sae.train()
        history.append(record)
        score = record.get("val_loss", -epoch)  # without validation data the newest epoch wins
        if score < best_loss:
            best_loss, best_epoch = score, epoch
            best_state = copy.deepcopy(sae.state_dict())
    sae.load_state_dict(best_state)
    sae.eval()
    return {"best_epoch": best_epoch, "history": history}


@torch.no_grad()
def encode_source(sae: SparseAutoencoder, source, batch_size: int = 4096,
                  device: str | torch.device = "cpu") -> torch.Tensor:
    """All SAE codes of a source, in source order, on the CPU."""
    source = as_source(source)
    codes = [sae.encode(b.x.to(device)).float().cpu() for b in source.iter_batches(batch_size)]
    return torch.cat(codes) if codes else torch.empty(0, sae.cfg.d_sae)
