"""Training a classifier and SAEs on its hidden activations at the same time (the MNIST recipe).

Each step: forward the classifier, CE + λ·aux on the hooked layer toward the example's target,
and one SAE step per hooked layer on the *detached* activations of that same forward pass. The
SAE losses cannot reach the classifier (detached inputs) and Adam is per parameter, so one
backward of the summed losses and one optimiser over all parameters equal the authors' separate
optimisers step for step, with a third of the Python overhead.

The shuffle order mirrors a ``DataLoader(shuffle=True, generator=torch.Generator().manual_seed(s))``:
every epoch draws one int64 (the loader's worker base seed), the epoch's ``randperm`` and one more
(discarded) ``randperm`` from that generator, so seed 42 visits examples in the authors' order
(checked against a real DataLoader in the tests).
"""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .aux_loss import aux_loss
from .errors import require
from .sae import SparseAutoencoder


def loader_permutations(n: int, seed: int, epochs: int) -> list[torch.Tensor]:
    """The example order of each epoch of a seeded, shuffled torch DataLoader."""
    generator = torch.Generator().manual_seed(seed)
    orders = []
    for _ in range(epochs):
        torch.empty((), dtype=torch.int64).random_(generator=generator)  # the loader's base-seed draw
        orders.append(torch.randperm(n, generator=generator))
        # RandomSampler then draws one more permutation for the "num_samples % n" remainder (empty
        # here) before it stops, so that one is consumed and discarded every epoch.
        torch.randperm(n, generator=generator)
    return orders


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 8192) -> float:
    model.eval()
    correct = sum(int((model(x[s:s + batch_size])[0].argmax(1) == y[s:s + batch_size]).sum())
                  for s in range(0, len(x), batch_size))
    model.train()
    return 100.0 * correct / len(x)


def train_concurrent(model: nn.Module, saes: dict[int, SparseAutoencoder], train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                     sae_lr: float, seed: int, aux_weight: float = 0.0, aux_kind: str = "cosine",
                     aux_layer: int = 1, targets: torch.Tensor | None = None, desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` (returning ``(logits, *hidden)``) and ``saes`` (keyed by hidden index, 1-based).

    ``targets[i]`` is the auxiliary target of training example ``i``. Keeps, in place, the weights of
    the epoch with the strictly best validation accuracy (classifier and SAEs of that same epoch).
    """
    x_train, y_train = train
    require(epochs > 0 and batch_size > 0, "epochs and batch size must be positive")
    require(aux_weight >= 0, f"the auxiliary weight λ must be >= 0, got {aux_weight}")
    if aux_weight > 0:
        require(targets is not None and targets.shape[0] == len(x_train),
                f"need one target per training example ({len(x_train)}), got "
                f"{None if targets is None else targets.shape[0]}")
    groups = [{"params": list(model.parameters()), "lr": lr}]
    groups += [{"params": list(s.parameters()), "lr": sae_lr} for s in saes.values()]
    optimizer = torch.optim.Adam(groups, fused=True)  # one kernel per step instead of ~10 per parameter
    best = {"val_acc": -1.0, "epoch": -1, "state": None}
    history = []
    for epoch, order in enumerate(loader_permutations(len(x_train), seed, epochs)):
        model.train()
        totals = torch.zeros(3)
        batches = range(0, len(order), batch_size)
        # the epoch's examples in batch order, copied once: each batch is then a contiguous slice
        # (a gather of random rows per step costs more, and much more while another process
        # streams memory on the other core)
        x_epoch, y_epoch = x_train[order], y_train[order]
        t_epoch = targets[order] if aux_weight > 0 else None
        for start in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            stop = start + batch_size
            logits, *hidden = model(x_epoch[start:stop])
            task = F.cross_entropy(logits, y_epoch[start:stop])
            loss = task
            aux = task.new_zeros(())
            if aux_weight > 0:
                aux = aux_loss(hidden[aux_layer - 1], t_epoch[start:stop], aux_kind)
                loss = loss + aux_weight * aux
            sae_total = sum((sae.loss(hidden[layer - 1].detach()).total for layer, sae in saes.items()),
                            task.new_zeros(()))
            optimizer.zero_grad(set_to_none=True)
            (loss + sae_total).backward()
            optimizer.step()
            for sae in saes.values():
                sae.normalize_decoder_()
            totals += torch.stack([task.detach(), aux.detach(), sae_total.detach()])
        val_acc = accuracy(model, *val)
        steps = len(batches)
        record = {"epoch": epoch, "task_loss": float(totals[0]) / steps, "aux_loss": float(totals[1]) / steps,
                  "sae_loss": float(totals[2]) / steps, "val_acc": val_acc}
        history.append(record)
        if on_epoch:
            on_epoch(record)
        if val_acc > best["val_acc"]:  # strictly better, as the authors' checkpoint rule
            best = {"val_acc": val_acc, "epoch": epoch,
                    "state": (copy.deepcopy(model.state_dict()),
                              {k: copy.deepcopy(s.state_dict()) for k, s in saes.items()})}
    model.load_state_dict(best["state"][0])
    for layer, sae in saes.items():
        sae.load_state_dict(best["state"][1][layer])
    model.eval()
    return {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "history": history}


def sweep_aux_weight(make_model: Callable[[], nn.Module], lambdas: list[float], train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], *, epochs: int, batch_size: int, lr: float, seed: int,
                     targets: torch.Tensor, aux_kind: str = "cosine", aux_layer: int = 1,
                     desc: str = "λ sweep") -> list[dict]:
    """Best validation accuracy of one training run per λ, all runs trained at once.

    The copies (identical seeded initialisation, identical data order) are stacked with
    ``torch.func`` and evaluated with ``vmap``; Adam is elementwise, so one optimiser over the
    stacked parameters is the same as one per run. No SAEs are trained: they cannot influence the
    classifier, and only its validation accuracy decides λ. Test data is never touched.
    """
    from torch.func import functional_call, stack_module_state

    require(len(lambdas) > 0 and all(lam >= 0 for lam in lambdas), "the λ sweep needs values >= 0")
    x_train, y_train = train
    models = [make_model() for _ in lambdas]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    weights = torch.tensor(lambdas, dtype=x_train.dtype)

    def forward(p, b, x):
        return functional_call(base, (p, b), (x,))

    batched = torch.vmap(forward, in_dims=(0, 0, None))
    optimizer = torch.optim.Adam(list(params.values()), lr=lr, fused=True)
    best = torch.full((len(lambdas),), -1.0)
    best_epoch = torch.full((len(lambdas),), -1)
    for epoch, order in enumerate(loader_permutations(len(x_train), seed, epochs)):
        for start in tqdm(range(0, len(order), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            idx = order[start:start + batch_size]
            logits, *hidden = batched(params, buffers, x_train[idx])            # (M, B, ...)
            task = F.cross_entropy(logits.flatten(0, 1), y_train[idx].repeat(len(lambdas)), reduction="none")
            task = task.view(len(lambdas), -1).mean(dim=1)
            aux = _stacked_aux(hidden[aux_layer - 1], targets[idx], aux_kind)  # (M,)
            optimizer.zero_grad(set_to_none=True)
            (task + weights * aux).sum().backward()
            optimizer.step()
        with torch.no_grad():
            preds = batched(params, buffers, val[0])[0].argmax(dim=-1)
            acc = 100.0 * (preds == val[1]).double().mean(dim=1).float()
        improved = acc > best
        best = torch.where(improved, acc, best)
        best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
    return [{"lambda": lam, "best_val_acc": float(a), "best_epoch": int(e)}
            for lam, a, e in zip(lambdas, best, best_epoch)]


def _stacked_aux(h: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The auxiliary loss of every stacked run: h is (M, B, d), targets (B, d); returns (M,)."""
    t = targets.to(h.dtype)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(h, t.unsqueeze(0), dim=2)).mean(dim=1)
    if kind == "broadcast":  # as aux_loss.broadcast_cosine_distance, per run: cosine along the batch axis
        return (1.0 - F.cosine_similarity(h.unsqueeze(1), t[None, :, None, :], dim=2)).mean(dim=(1, 2))
    raise ValueError(f"unknown aux loss '{kind}'")
