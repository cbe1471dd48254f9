"""Training a classifier and SAEs on its hidden activations at the same time (the MNIST recipe).

Each step: forward the classifier, CE + λ·aux on the hooked layer toward the example's target,
and one SAE step per hooked layer on the *detached* activations of that same forward pass. The
SAE losses cannot reach the classifier (detached inputs) and Adam is per parameter, so one
backward of the summed losses and one optimiser over all parameters equal the authors' separate
optimisers (MLP step, then each SAE step) step for step, with a third of the Python overhead:
with the plain Adam kernel the updates are bit-identical to the authors' loop (tested).

Two switches choose the floating-point path, neither changes the procedure:
- ``adam``: ``fused`` (one fused kernel for all parameters, fast) or ``plain`` (``torch.optim.Adam``
  with PyTorch's defaults, on a CPU its per-parameter loop: the authors' kernel);
- ``step``: ``autograd`` (the losses written out, gradients by autograd: the authors' path) or
  ``manual`` (:class:`ManualStep`: the same gradients derived by hand, a few fused products into
  gradient buffers kept between steps; equal to autograd's in float64, see the tests).

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
from .fused_adam import FusedAdam
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


ADAM_KERNELS = ("fused", "plain")
_threshold_backward = torch.ops.aten.threshold_backward   # ReLU's backward, looked up once
STEPS = ("autograd", "manual")


def make_adam(groups: list[dict], kernel: str) -> torch.optim.Adam | FusedAdam:
    """Adam with PyTorch's defaults (betas 0.9/0.999, eps 1e-8, no weight decay) in either kernel:
    ``fused`` one kernel for every parameter (``torch.optim.Adam(fused=True)``'s update, called
    directly: :class:`common.fused_adam.FusedAdam`); ``plain`` ``torch.optim.Adam`` left at its
    defaults, which on a CPU is the per-parameter loop the authors' code ran. Same update, other rounding."""
    require(kernel in ADAM_KERNELS, f"unknown Adam kernel '{kernel}'; choose one of {', '.join(ADAM_KERNELS)}")
    return FusedAdam(groups) if kernel == "fused" else torch.optim.Adam(groups)


def train_concurrent(model: nn.Module, saes: dict[int, SparseAutoencoder], train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], *, epochs: int, batch_size: int, lr: float,
                     sae_lr: float, seed: int, aux_lambda: float = 0.0, aux_kind: str = "cosine",
                     aux_layer: int = 1, targets: torch.Tensor | None = None, adam: str = "fused",
                     step: str = "autograd", desc: str = "train",
                     on_epoch: Callable[[dict], None] | None = None) -> dict:
    """Train ``model`` (returning ``(logits, *hidden)``) and ``saes`` (keyed by hidden index, 1-based).

    ``targets[i]`` is the auxiliary target of training example ``i``. Keeps, in place, the weights of
    the epoch with the strictly best validation accuracy (classifier and SAEs of that same epoch).
    ``adam`` and ``step`` choose the floating-point path (module docstring); ``step="manual"`` needs a
    ReLU MLP that lists its layers (``model.linear_layers()``, see :class:`ManualStep`).
    """
    x_train, y_train = train
    require(epochs > 0 and batch_size > 0, "epochs and batch size must be positive")
    require(aux_lambda >= 0, f"the auxiliary λ (aux_lambda) must be >= 0, got {aux_lambda}")
    require(step in STEPS, f"unknown training step '{step}'; choose one of {', '.join(STEPS)}")
    if aux_lambda > 0:
        require(targets is not None and targets.shape[0] == len(x_train),
                f"need one target per training example ({len(x_train)}), got "
                f"{None if targets is None else targets.shape[0]}")
    manual = None
    if step == "manual":
        manual = ManualStep(model, saes, aux_lambda=aux_lambda, aux_kind=aux_kind, aux_layer=aux_layer)
        step_targets = manual.step_targets(targets) if aux_lambda > 0 else None
        # Adam is elementwise: one flat buffer per learning rate is one kernel call per group
        # instead of one per parameter (most of the fused optimiser's time at this size is per call)
        groups = [{"params": [manual.flat_mlp.param], "lr": lr}]
        groups += [{"params": [manual.flat_saes.param], "lr": sae_lr}] if saes else []
    else:
        groups = [{"params": list(model.parameters()), "lr": lr}]
        groups += [{"params": list(s.parameters()), "lr": sae_lr} for s in saes.values()]
    optimizer = make_adam(groups, adam)
    best = {"val_acc": -1.0, "epoch": -1, "state": None}
    history = []
    # each epoch's examples in batch order, gathered once into buffers kept for the whole training:
    # each batch is then a contiguous slice (a gather of random rows per step costs more, and much
    # more while another process streams memory on the other core), and no epoch pays for fresh pages
    x_epoch, y_epoch = torch.empty_like(x_train), torch.empty_like(y_train)
    t_table = None if aux_lambda <= 0 else (targets if manual is None else step_targets)
    t_epoch = None if t_table is None else torch.empty_like(t_table)
    for epoch, order in enumerate(loader_permutations(len(x_train), seed, epochs)):
        model.train()
        totals = torch.zeros(3)
        batches = range(0, len(order), batch_size)
        torch.index_select(x_train, 0, order, out=x_epoch)
        torch.index_select(y_train, 0, order, out=y_epoch)
        if t_table is not None:
            torch.index_select(t_table, 0, order, out=t_epoch)
        for start in tqdm(batches, desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            stop = start + batch_size
            t_batch = None if t_epoch is None else t_epoch[start:stop]
            if manual is not None:
                losses = manual(x_epoch[start:stop], y_epoch[start:stop], t_batch)
            else:
                losses = _autograd_step(model, saes, optimizer, x_epoch[start:stop], y_epoch[start:stop], t_batch,
                                        aux_lambda, aux_kind, aux_layer)
            optimizer.step()
            for sae in saes.values():
                sae.normalize_decoder_()
            totals += losses
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
    if manual is not None:
        manual.release()
    model.load_state_dict(best["state"][0])
    for layer, sae in saes.items():
        sae.load_state_dict(best["state"][1][layer])
    model.eval()
    return {"best_epoch": best["epoch"], "best_val_acc": best["val_acc"], "history": history}


def _autograd_step(model, saes, optimizer, x, y, t, aux_lambda, aux_kind, aux_layer) -> torch.Tensor:
    """The losses as the authors wrote them, gradients by one backward of their sum; returns the
    detached (task, aux, SAE total) for the epoch's log."""
    logits, *hidden = model(x)
    task = F.cross_entropy(logits, y)
    loss = task
    aux = task.new_zeros(())
    if aux_lambda > 0:
        aux = aux_loss(hidden[aux_layer - 1], t, aux_kind)
        loss = loss + aux_lambda * aux
    sae_total = sum((sae.loss(hidden[layer - 1].detach()).total for layer, sae in saes.items()), task.new_zeros(()))
    optimizer.zero_grad(set_to_none=True)
    (loss + sae_total).backward()
    return torch.stack([task.detach(), aux.detach(), sae_total.detach()])


class FlatParameters:
    """Parameters re-homed as views of one flat buffer, their gradients as views of another, so that
    an optimiser over ``param`` (one tensor) updates them all; :meth:`release` gives each parameter
    its own storage back (checkpoints cannot hold tensors that share memory)."""

    def __init__(self, params: list[nn.Parameter]):
        self.params = params
        data = torch.cat([p.detach().reshape(-1) for p in params]) if params else torch.zeros(0)
        self.param = nn.Parameter(data)
        self.param.grad = torch.zeros_like(data)
        offset = 0
        for p in params:
            n = p.numel()
            p.data = data[offset:offset + n].view_as(p)
            p.grad = self.param.grad[offset:offset + n].view_as(p)
            offset += n

    def stacked(self, first: nn.Parameter, count: int, grad: bool = False) -> torch.Tensor:
        """``count`` same-shaped parameters stored one after another from ``first``, as one (count, ...) view."""
        index = next(i for i, p in enumerate(self.params) if p is first)
        offset = sum(p.numel() for p in self.params[:index])
        flat = self.param.grad if grad else self.param.data
        return flat[offset:offset + count * first.numel()].view(count, *first.shape)

    def release(self) -> None:
        for p in self.params:
            p.data = p.data.clone()
            p.grad = None


class ManualStep:
    """The gradients of one concurrent-training step, derived by hand and written into the
    parameters' ``.grad`` buffers (kept from step to step), without autograd.

    The classifier must be a ReLU MLP that lists its ``nn.Linear`` layers in order
    (``model.linear_layers()``): ``h_0 = x.flatten(1)``, ``h_i = relu(h_{i-1} W_i^T + b_i)``, the last
    layer's output the logits, ``model(x)`` returning ``(logits, h_1, h_2, ...)``. With
    ``L = CE(logits, y) + λ aux(h_a, t)`` and ``g_i = dL/d(pre-activation of layer i)``:

        g_last = (softmax(logits) - onehot(y)) / B
        dW_i = g_i^T h_{i-1};  db_i = sum_b g_i
        g_{i-1} = (g_i W_i + [i-1 = a] λ daux/dh_a) * (h_{i-1} > 0)

    and for the two auxiliary forms (``common.aux_loss``; ``F.cosine_similarity`` divides each side
    by its norm clamped at eps = 1e-8, the clamp carrying no gradient):

        cosine:    u_i = t_i / max(|t_i|, eps), N_i = |h_i|, n_i = max(N_i, eps), f_i = <h_i, u_i> / n_i
                   aux = mean_i (1 - f_i);  daux/dh_i = -(u_i - f_i h_i / N_i) / (B n_i)
        broadcast: per unit k (the cosine runs along the batch axis): S_k = sum_j h_jk,
                   N_k = |h_.k|, n_k = max(N_k, eps), w_k = sum_a t_ak / max(sqrt(B) |t_ak|, eps) / (B d)
                   aux = 1 - sum_k w_k S_k / n_k;  daux/dh_jk = -(w_k / n_k) (1 - S_k h_jk / (n_k N_k))

    (a term h / N with N = 0 is 0, as autograd's norm gradient). Each SAE's gradients come from
    :meth:`SparseAutoencoder.loss_and_grads_` on the same forward's hidden activations. Calling the
    step on a batch and its rows of :meth:`step_targets` returns the detached (task, aux, SAE
    total); the caller then runs the optimiser on ``flat_mlp.param`` and ``flat_saes.param``.

    Speed (beside the definitions above, same formulas): the parameters live in two flat buffers
    (:class:`FlatParameters`), and SAEs of one configuration on hidden layers of one width are
    stepped together as a stack, with batched products (:meth:`_stacked_sae_step`), the hidden
    activations written straight into the stack's input.
    """

    EPS = 1e-8   # F.cosine_similarity's default

    def __init__(self, model: nn.Module, saes: dict[int, SparseAutoencoder], *, aux_lambda: float = 0.0,
                 aux_kind: str = "cosine", aux_layer: int = 1):
        from .aux_loss import AUX_LOSSES

        require(callable(getattr(model, "linear_layers", None)),
                f"train.step manual needs a ReLU MLP that lists its layers (linear_layers()); "
                f"{type(model).__name__} does not")
        require(aux_kind in AUX_LOSSES, f"unknown aux loss '{aux_kind}'; choose one of {', '.join(AUX_LOSSES)}")
        self.layers = list(model.linear_layers())
        require(all(isinstance(layer, nn.Linear) and layer.bias is not None for layer in self.layers),
                "linear_layers() must return nn.Linear layers with biases")
        require(1 <= aux_layer < len(self.layers), f"aux layer {aux_layer} is not a hidden layer")
        self.saes = saes
        self.aux_lambda, self.aux_kind, self.aux_layer = float(aux_lambda), aux_kind, aux_layer
        self.flat_mlp = FlatParameters([p for layer in self.layers for p in (layer.weight, layer.bias)])
        configs = {sae.cfg for sae in saes.values()}
        widths = {self.layers[k - 1].out_features for k in saes}
        self.stack = (len(saes) > 1 and len(configs) == 1 and len(widths) == 1 and next(iter(configs)).topk is None
                      and all(1 <= k < len(self.layers) for k in saes))
        names = ("encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias")
        self.flat_saes = FlatParameters([sae.get_parameter(name) for name in names for sae in saes.values()])
        if self.stack:
            first = next(iter(saes.values()))
            self.sae_stack = [(self.flat_saes.stacked(first.get_parameter(name), len(saes)),
                               self.flat_saes.stacked(first.get_parameter(name), len(saes), grad=True)) for name in names]
            (w_enc, _), (b_enc, _), (w_dec, _), (b_dec, _) = self.sae_stack
            # the views the stacked step multiplies by, made once (the flat buffers do not move)
            self.sae_views = (w_enc.transpose(1, 2), b_enc[:, None, :], w_dec, w_dec.transpose(1, 2), b_dec[:, None, :])
            self.sae_cfg = first.cfg
        # per layer, what a step reads and writes, looked up once (the flat buffers do not move):
        # (weight, bias, weight^T, weight's gradient, bias's gradient)
        self.tensors = [(layer.weight, layer.bias, layer.weight.T, layer.weight.grad, layer.bias.grad)
                        for layer in self.layers]
        self._per_batch: dict[int, tuple] = {}   # batch size -> buffers and views of a step (see _buffers)

    def release(self) -> None:
        """Every parameter back in its own storage (after training)."""
        self.flat_mlp.release()
        self.flat_saes.release()

    def step_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """The target table as the step reads it: the per-example cosine only ever sees
        t_i / max(|t_i|, eps), so it is normalised once for the whole table; the broadcast form
        reads the raw targets."""
        if self.aux_kind == "cosine":
            return targets / targets.norm(dim=1, keepdim=True).clamp_min(self.EPS)
        return targets

    def _buffers(self, batch: int, x: torch.Tensor) -> tuple:
        """For a batch size: the SAE stack's (n_saes, B, d) input (None without a stack), each hidden
        layer's output slot in it (None: a fresh tensor), and the -1 column of the one-hot."""
        kept = self._per_batch.get(batch)
        if kept is None:
            stacked_inputs, slots = None, {}
            if self.stack:   # h_k of the SAE layers written straight into the SAE stack's input
                stacked_inputs = x.new_empty(len(self.saes), batch, self.layers[next(iter(self.saes)) - 1].out_features)
                slots = {k: stacked_inputs[i] for i, k in enumerate(self.saes)}
            outs = [slots.get(i) for i in range(1, len(self.layers))]
            kept = self._per_batch[batch] = (stacked_inputs, outs, torch.full((batch, 1), -1.0, dtype=x.dtype))
        return kept

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None = None) -> torch.Tensor:
        """One step's gradients for the batch ``(x, y)``, ``t`` its rows of :meth:`step_targets`."""
        x = x.flatten(1)
        batch = x.shape[0]
        stacked_inputs, outs, minus_one = self._buffers(batch, x)
        activations = [x]                                   # h_0 .. h_{L-1}: each layer's input
        for (_, bias, weight_t, _, _), out in zip(self.tensors, outs):
            h = torch.addmm(bias, activations[-1], weight_t, out=out) if out is not None \
                else torch.addmm(bias, activations[-1], weight_t)
            activations.append(h.clamp_min_(0))
        _, bias, weight_t, _, _ = self.tensors[-1]
        logits = torch.addmm(bias, activations[-1], weight_t)
        log_p = torch.log_softmax(logits, dim=1)
        y_column = y[:, None]
        task = -log_p.gather(1, y_column).mean()
        g = log_p.exp_().scatter_add_(1, y_column, minus_one).mul_(1.0 / batch)
        aux, aux_grad = task.new_zeros(()), None
        if self.aux_lambda > 0:
            aux, aux_grad = self._aux(activations[self.aux_layer], t.to(x.dtype))
        for i in range(len(self.layers) - 1, -1, -1):
            (weight, _, _, weight_grad, bias_grad), inputs = self.tensors[i], activations[i]
            torch.mm(g.T, inputs, out=weight_grad)
            torch.sum(g, 0, out=bias_grad)
            if i == 0:
                break
            g = torch.mm(g, weight)
            if i == self.aux_layer and aux_grad is not None:
                g.add_(aux_grad)
            g = _threshold_backward(g, inputs, 0)     # ReLU: where(h > 0, g, 0)
        if stacked_inputs is not None:
            sae_total = self._stacked_sae_step(stacked_inputs)
        else:
            sae_total = task.new_zeros(())
            for k, sae in self.saes.items():
                sae_total = sae_total + sae.loss_and_grads_(activations[k]).total
        return torch.stack([task, aux, sae_total])

    def _stacked_sae_step(self, h: torch.Tensor) -> torch.Tensor:
        """:meth:`SparseAutoencoder.loss_and_grads_` of every SAE at once, h (n_saes, B, d_in); returns
        the sum of their losses. Same formulas, batched products (examples as rows)."""
        (_, gw_enc), (_, gb_enc), (_, gw_dec), (_, gb_dec) = self.sae_stack
        w_enc_t, b_enc, w_dec, w_dec_t, b_dec = self.sae_views
        cfg = self.sae_cfg
        batch = h.shape[1]
        z = torch.baddbmm(b_enc, h, w_enc_t).clamp_min_(0)                                  # (n, B, d_sae)
        diff = torch.baddbmm(b_dec, z, w_dec_t).sub_(h)                                     # x_hat - x
        l1_scale = 1.0 / (batch * cfg.d_sae if cfg.l1_form == "mean" else batch)
        total = diff.square().sum() / (batch * cfg.d_in) + (cfg.l1_coeff * l1_scale) * z.sum()
        g = diff.mul_(2.0 / (batch * cfg.d_in))
        torch.bmm(g.transpose(1, 2), z, out=gw_dec)
        torch.sum(g, 1, out=gb_dec)
        dz = _threshold_backward(torch.bmm(g, w_dec).add_(cfg.l1_coeff * l1_scale), z, 0)
        torch.bmm(dz.transpose(1, 2), h, out=gw_enc)
        torch.sum(dz, 1, out=gb_enc)
        return total

    def _aux(self, h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return aux_and_grad(h, t, self.aux_kind, self.aux_lambda)


def aux_and_grad(h: torch.Tensor, t: torch.Tensor, kind: str, scale: float | torch.Tensor,
                 eps: float = ManualStep.EPS) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, scale · daux/dh) of one batch, formulas in :class:`ManualStep`'s docstring; ``t`` is the
    batch's rows of :meth:`ManualStep.step_targets`. ``h`` is (B, d), or (M, B, d) for M runs side by
    side with one ``scale`` each (a tensor of M values): aux is then (M,)."""
    stacked = h.dim() == 3
    if stacked:
        scale = scale.to(h.dtype).view(-1, 1, 1)
    if kind == "cosine":
        norm = h.norm(dim=-1, keepdim=True)
        n = norm.clamp_min(eps)
        f = (h * t).sum(dim=-1, keepdim=True).div_(n)
        aux = (1.0 - f).mean(dim=(1, 2)) if stacked else (1.0 - f).mean()
        inv_norm = torch.where(norm > 0, norm, torch.ones_like(norm)).reciprocal_()
        grad = (h * (f * inv_norm)).sub_(t).mul_(scale / h.shape[-2] / n)
        return aux, grad
    batch, dim = h.shape[-2:]
    s = h.sum(dim=-2)
    norm = h.norm(dim=-2)
    n = norm.clamp_min(eps)
    w = (t / (t.abs() * batch ** 0.5).clamp_min_(eps)).sum(dim=0).div_(batch * dim)
    aux = 1.0 - (w * s / n).sum(dim=-1)
    inv_norm = torch.where(norm > 0, norm, torch.ones_like(norm)).reciprocal_()
    if stacked:
        scale = scale.view(-1, 1)
    grad = (h * (s / n * inv_norm).unsqueeze(-2)).sub_(1.0).mul_((w * scale / n).unsqueeze(-2))
    return aux, grad


def sweep_aux_lambda(make_model: Callable[[], nn.Module], lambdas: list[float], train: tuple[torch.Tensor, torch.Tensor],
                     val: tuple[torch.Tensor, torch.Tensor], *, epochs: int, batch_size: int, lr: float, seed: int,
                     targets: torch.Tensor, aux_kind: str = "cosine", aux_layer: int = 1, step: str = "autograd",
                     desc: str = "λ sweep", test: tuple[torch.Tensor, torch.Tensor] | None = None) -> list[dict]:
    """Best validation accuracy of one training run per λ, all runs trained at once; with ``test``
    also each run's test accuracy at its best validation epoch (``best_test_acc``: what the authors
    chose λ by).

    The copies (identical seeded initialisation, identical data order) are trained side by side;
    Adam is elementwise, so one optimiser over the stacked parameters is the same as one per run.
    ``step`` as in :func:`train_concurrent`: ``autograd`` stacks the copies with ``torch.func`` and
    differentiates through ``vmap``; ``manual`` (:class:`StackedManualStep`) writes ManualStep's
    gradients for all copies at once. No SAEs are trained: they cannot influence the classifier, and
    only its accuracy decides λ. Test data is touched only when ``test`` is given.
    """
    require(len(lambdas) > 0 and all(value >= 0 for value in lambdas), "the λ sweep needs values >= 0")
    require(step in STEPS, f"unknown training step '{step}'; choose one of {', '.join(STEPS)}")
    x_train, y_train = train
    models = [make_model() for _ in lambdas]
    runs = (StackedManualStep if step == "manual" else _VmapRuns)(models, lambdas, aux_kind, aux_layer)
    optimizer = FusedAdam([{"params": runs.parameters(), "lr": lr}])
    best = torch.full((len(lambdas),), -1.0)
    best_epoch = torch.full((len(lambdas),), -1)
    best_test = torch.full((len(lambdas),), float("nan"))
    for epoch, order in enumerate(loader_permutations(len(x_train), seed, epochs)):
        for start in tqdm(range(0, len(order), batch_size), desc=f"{desc} epoch {epoch + 1}/{epochs}", leave=False):
            idx = order[start:start + batch_size]
            runs.gradients(x_train[idx], y_train[idx], targets[idx])
            optimizer.step()
        with torch.no_grad():
            acc = runs.accuracies(*val)
            improved = acc > best
            if test is not None:
                best_test = torch.where(improved, runs.accuracies(*test), best_test)
        best = torch.where(improved, acc, best)
        best_epoch = torch.where(improved, torch.full_like(best_epoch, epoch), best_epoch)
    rows = [{"aux_lambda": value, "best_val_acc": float(a), "best_epoch": int(e)}
            for value, a, e in zip(lambdas, best, best_epoch)]
    if test is not None:
        for row, t in zip(rows, best_test):
            row["best_test_acc"] = float(t)
    return rows


def _percent_correct(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy in percent of each run, logits (M, N, classes)."""
    return 100.0 * (logits.argmax(dim=-1) == y).double().mean(dim=1).float()


class _VmapRuns:
    """The copies as one ``torch.func`` stack, losses through ``vmap``, gradients by autograd
    (the sweep's ``step="autograd"``)."""

    def __init__(self, models: list[nn.Module], lambdas: list[float], aux_kind: str, aux_layer: int):
        from torch.func import functional_call, stack_module_state

        self.params, self.buffers = stack_module_state(models)
        base = copy.deepcopy(models[0]).to("meta")
        self.batched = torch.vmap(lambda p, b, x: functional_call(base, (p, b), (x,)), in_dims=(0, 0, None))
        self.lambdas, self.aux_kind, self.aux_layer = lambdas, aux_kind, aux_layer

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def gradients(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        runs = len(self.lambdas)
        logits, *hidden = self.batched(self.params, self.buffers, x)            # (M, B, ...)
        task = F.cross_entropy(logits.flatten(0, 1), y.repeat(runs), reduction="none").view(runs, -1).mean(dim=1)
        aux = _stacked_aux(hidden[self.aux_layer - 1], t, self.aux_kind)      # (M,)
        for p in self.params.values():
            p.grad = None
        (task + torch.tensor(self.lambdas, dtype=x.dtype) * aux).sum().backward()

    def accuracies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _percent_correct(self.batched(self.params, self.buffers, x)[0], y)


class StackedManualStep:
    """:class:`ManualStep`'s gradients (no SAEs) for M copies of one ReLU MLP trained side by side
    on the same batches, copy m with its own λ_m: the λ sweep's ``step="manual"``.

    Layer i of all copies is one (M, out, in) weight and one (M, out) bias, views of one flat buffer
    (``param``; gradients in ``param.grad``). Activations are (M, B, width) and the later layers
    batched products; the first layer reads the same input in every copy, so its M products are
    one (B, in) x (in, M·out) product forward and one (M·out, B) x (B, in) product for its weight
    gradient, which is most of the work.
    """

    def __init__(self, models: list[nn.Module], lambdas: list[float], aux_kind: str, aux_layer: int):
        from .aux_loss import AUX_LOSSES

        require(all(callable(getattr(m, "linear_layers", None)) for m in models),
                "the manual λ sweep needs ReLU MLPs that list their layers (linear_layers())")
        require(aux_kind in AUX_LOSSES, f"unknown aux loss '{aux_kind}'; choose one of {', '.join(AUX_LOSSES)}")
        per_model = [list(m.linear_layers()) for m in models]
        require(1 <= aux_layer < len(per_model[0]), f"aux layer {aux_layer} is not a hidden layer")
        stacked = []
        for i in range(len(per_model[0])):
            stacked.append(nn.Parameter(torch.stack([layers[i].weight.detach() for layers in per_model])))
            stacked.append(nn.Parameter(torch.stack([layers[i].bias.detach() for layers in per_model])))
        self.flat = FlatParameters(stacked)
        self.param = self.flat.param
        self.weights, self.biases = stacked[0::2], stacked[1::2]
        self.runs = len(models)
        self.lambdas = torch.tensor(lambdas, dtype=stacked[0].dtype)
        self.aux_kind, self.aux_layer = aux_kind, aux_layer

    def parameters(self) -> list[torch.Tensor]:
        return [self.param]

    def step_targets(self, targets: torch.Tensor) -> torch.Tensor:
        if self.aux_kind == "cosine":
            return targets / targets.norm(dim=1, keepdim=True).clamp_min(ManualStep.EPS)
        return targets

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[x, h_1, ..., h_{L-1}, logits], the stacked ones (M, rows, width)."""
        x = x.flatten(1)
        w, b = self.weights[0], self.biases[0]
        first = torch.addmm(b.view(-1), x, w.view(-1, w.shape[-1]).T).clamp_min_(0)   # (rows, M·out)
        outputs = [x, first.view(x.shape[0], self.runs, -1).transpose(0, 1)]
        for w, b in zip(self.weights[1:], self.biases[1:]):
            h = torch.baddbmm(b[:, None, :], outputs[-1], w.transpose(1, 2))
            outputs.append(h.clamp_min_(0) if len(outputs) < len(self.weights) else h)
        return outputs

    @torch.no_grad()
    def gradients(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> None:
        """Every copy's gradient for the batch (x, y), t its rows of the targets, into ``param.grad``."""
        *activations, logits = self._forward(x)
        batch = logits.shape[1]
        log_p = torch.log_softmax(logits, dim=-1)
        g = log_p.exp_().scatter_add_(-1, y.expand(self.runs, -1)[..., None],
                                      torch.full((self.runs, batch, 1), -1.0, dtype=log_p.dtype)).mul_(1.0 / batch)
        _, aux_grad = aux_and_grad(activations[self.aux_layer], self.step_targets(t).to(logits.dtype),
                                   self.aux_kind, self.lambdas)
        for i in range(len(self.weights) - 1, 0, -1):
            inputs = activations[i]
            torch.bmm(g.transpose(1, 2), inputs, out=self.weights[i].grad)
            torch.sum(g, 1, out=self.biases[i].grad)
            g = torch.bmm(g, self.weights[i])
            if i == self.aux_layer:
                g.add_(aux_grad)
            g = _threshold_backward(g, inputs, 0)
        g = g.transpose(0, 1).reshape(batch, -1)                                       # (B, M·out)
        first = self.weights[0]
        torch.mm(g.T, activations[0], out=first.grad.view(-1, first.shape[-1]))
        torch.sum(g, 0, out=self.biases[0].grad.view(-1))

    @torch.no_grad()
    def accuracies(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _percent_correct(self._forward(x)[-1], y)


def _stacked_aux(h: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """The auxiliary loss of every stacked run: h is (M, B, d), targets (B, d); returns (M,)."""
    t = targets.to(h.dtype)
    if kind == "cosine":
        return (1.0 - F.cosine_similarity(h, t.unsqueeze(0), dim=2)).mean(dim=1)
    if kind == "broadcast":  # as aux_loss.broadcast_cosine_distance, per run: cosine along the batch axis
        return (1.0 - F.cosine_similarity(h.unsqueeze(1), t[None, :, None, :], dim=2)).mean(dim=(1, 2))
    raise ValueError(f"unknown aux loss '{kind}'")
