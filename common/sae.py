"""A ReLU sparse autoencoder: untied encoder/decoder with biases (Towards Monosemanticity style).

Options that the paper's three experiments need and that the presets switch between:
- ``l1_form``: ``mean`` = mean |z| over batch *and* features (the authors' MNIST code);
  ``sum`` = per-example L1 norm averaged over the batch (their ViT/ConvNeXt code).
- ``decoder_norm``: ``none`` (MNIST); ``rows`` = each of the d_in rows of the (d_in x d_sae)
  decoder weight is unit-norm, what the authors' ViT/ConvNeXt code did (authors-code §2.5);
  ``features`` = each dictionary atom (column) is unit-norm, the usual constraint (corrected).
- ``topk``: keep only the k largest codes per example (a TopK SAE); the L1 term still applies
  unless ``l1_coeff`` is 0.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load_meta, load_module, save_module
from .errors import UserError, require

L1_FORMS = ("mean", "sum")
DECODER_NORMS = ("none", "rows", "features")


@dataclass(frozen=True)
class SAEConfig:
    d_in: int
    d_sae: int
    l1_coeff: float
    l1_form: str = "sum"
    decoder_norm: str = "none"
    topk: int | None = None

    def __post_init__(self) -> None:
        require(self.d_in > 0 and self.d_sae > 0, f"SAE sizes must be positive (d_in={self.d_in}, d_sae={self.d_sae})")
        require(self.l1_coeff >= 0, f"SAE l1_coeff must be >= 0, got {self.l1_coeff}")
        require(self.l1_form in L1_FORMS, f"unknown l1_form '{self.l1_form}'; choose one of {', '.join(L1_FORMS)}")
        require(self.decoder_norm in DECODER_NORMS,
                f"unknown decoder_norm '{self.decoder_norm}'; choose one of {', '.join(DECODER_NORMS)}")
        require(self.topk is None or 0 < self.topk <= self.d_sae,
                f"SAE topk must be in 1..{self.d_sae}, got {self.topk}")


class SAELoss(NamedTuple):
    total: torch.Tensor
    mse: torch.Tensor
    l1: torch.Tensor


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.d_sae)
        self.decoder = nn.Linear(cfg.d_sae, cfg.d_in)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.encoder(x))
        if self.cfg.topk is not None:
            values, idx = z.topk(self.cfg.topk, dim=-1)
            z = torch.zeros_like(z).scatter_(-1, idx, values)
        return z

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encode(x)
        return self.decode(z), z

    def loss(self, x: torch.Tensor) -> SAELoss:
        x_hat, z = self(x)
        mse = F.mse_loss(x_hat, x)
        l1 = z.abs().mean() if self.cfg.l1_form == "mean" else z.abs().sum(dim=-1).mean()
        return SAELoss(mse + self.cfg.l1_coeff * l1, mse, l1)

    @torch.no_grad()
    def loss_and_grads_(self, x: torch.Tensor) -> SAELoss:
        """:meth:`loss` of a batch with its gradients written into each parameter's ``.grad``
        (overwritten, not accumulated), derived by hand instead of by autograd.

        Same gradients as ``loss(x).total.backward()`` (equal in float64; see tests/test_sae.py),
        but the two (d_sae x d_in) weight gradients are written into buffers kept from step to
        step instead of fresh ones: on a CPU, first touches of 2 x 26 MB per step (page faults)
        cost as much as a GEMM at the ImageNet shape. With L = mse + c l1, g = dL/dx_hat:
            g = 2 (x_hat - x) / (B d_in);  dW_dec = g^T z;  db_dec = sum_b g
            dz = g W_dec + c dl1/dz (z >= 0, so |z| = z);  dpre = dz where z > 0 (ReLU, TopK)
            dW_enc = dpre^T x;  db_enc = sum_b dpre
        """
        cfg = self.cfg
        w_enc, b_enc, w_dec, b_dec = self.encoder.weight, self.encoder.bias, self.decoder.weight, self.decoder.bias
        for p in (w_enc, b_enc, w_dec, b_dec):
            if p.grad is None or p.grad.shape != p.shape or not p.grad.is_contiguous():
                p.grad = torch.empty_like(p, memory_format=torch.contiguous_format)
        batch = x.shape[0]
        # examples as columns: every product is (large) x (small), 4-16% faster on a CPU at batch 64-128
        zt = torch.addmm(b_enc[:, None], w_enc, x.T).clamp_min_(0)              # (d_sae, B)
        if cfg.topk is not None:
            values, idx = zt.topk(cfg.topk, dim=0)
            zt = torch.zeros_like(zt).scatter_(0, idx, values)
        diff = torch.addmm(b_dec[:, None], w_dec, zt).sub_(x.T)                 # (d_in, B): x_hat - x
        mse = diff.square().mean()
        l1_scale = 1.0 / (batch * cfg.d_sae if cfg.l1_form == "mean" else batch)   # mean |z| or mean_b sum_j |z|
        l1 = zt.sum() * l1_scale
        g = diff.mul_(2.0 / diff.numel())
        torch.mm(g, zt.T, out=w_dec.grad)
        torch.sum(g, 1, out=b_dec.grad)
        dz = torch.mm(w_dec.T, g).add_(cfg.l1_coeff * l1_scale).mul_(zt > 0)
        torch.mm(dz, x, out=w_enc.grad)
        torch.sum(dz, 1, out=b_enc.grad)
        return SAELoss(mse + cfg.l1_coeff * l1, mse, l1)

    @torch.no_grad()
    def normalize_decoder_(self) -> None:
        weight = self.decoder.weight  # (d_in, d_sae): column j is the atom of feature j
        # in place, bit-identical to weight.copy_(F.normalize(weight, dim)): no temporary copy of the
        # decoder per step (on a CPU that copy and its page faults cost up to ~10% of a small-batch step)
        if self.cfg.decoder_norm == "rows":
            weight.div_(weight.norm(dim=1, keepdim=True).clamp_min_(1e-12))
        elif self.cfg.decoder_norm == "features":
            weight.div_(weight.norm(dim=0, keepdim=True).clamp_min_(1e-12))

    def save(self, path: str | os.PathLike, **extra) -> None:
        save_module(path, self, {"kind": "sae", "config": asdict(self.cfg), **extra})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "SparseAutoencoder":
        meta = load_meta(path)
        if meta.get("kind") != "sae" or "config" not in meta:
            raise UserError(f"{path} is not an SAE checkpoint")
        sae = cls(SAEConfig(**meta["config"]))
        load_module(path, sae, device)
        return sae.to(device)
