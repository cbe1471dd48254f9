"""The fine-tuning engine of the decoupled experiments (CIFAR-10 ViT-H, ImageNet ConvNeXt-V2).

One epoch loop in the style of ConvNeXt-V2's ``engine_finetune``: cross-entropy plus
``aux_lambda`` times the SAE-ception auxiliary loss between the hooked activation and its target,
looked up by dataset index in a :class:`~common.targets.TargetTable`. Only the parameters whose
names start with one of ``trainable`` are optimised (CIFAR: ``encoder``; ImageNet: ``head.norm``
and ``head.fc``); SGD/Adam/AdamW, gradient accumulation, autocast (bf16 or fp16; fp16 with a
GradScaler), gradient-norm clipping over the trainable parameters, optional cosine schedule per
optimizer step, optional mixup / label smoothing (the CIFAR baseline). After each epoch the model
is scored on the validation loader; the epoch with the strictly best validation accuracy is kept,
reloaded at the end and scored on the test loader.

Loaders yield ``(inputs, labels, dataset_indices)``; ``inputs`` can be images or cached features,
anything the module takes. Under torchrun the model is wrapped in DDP (gradients synchronised only
on optimizer steps), evaluation is sharded exactly and counts are summed over ranks.

Mixed precision applies on CUDA; on a CPU the engine runs in fp32 whatever ``amp`` says.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import distributed as D
from . import preflight
from .aux_loss import AUX_LOSSES, aux_loss
from .errors import UserError, require
from .hooks import ActivationCapture
from .io import atomic_path
from .schema import boolean, check, choice, integer, nullable, optional, real

OPTIMIZERS = ("sgd", "adam", "adamw")
AMP_MODES = ("none", "bf16", "fp16")
SCHEDULERS = ("none", "cosine")


@dataclass
class FinetuneConfig:
    epochs: int
    lr: float
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    accum_steps: int = 1
    clip_grad: float | None = None
    amp: str = "none"
    scheduler: str = "none"
    cosine_steps: int | None = None      # T_max in optimizer steps; None = the whole run
    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mixup_prob: float = 1.0
    aux_lambda: float = 0.0
    aux_kind: str = "cosine"
    aux_detach: bool = False             # the authors' CIFAR code: the term is computed and logged, no gradient
    test_amp: str | None = None          # autocast of the final test evaluation; None = ``amp``
    channels_last: bool = False
    compile: bool = False

    def __post_init__(self) -> None:
        require(isinstance(self.epochs, int) and self.epochs > 0, f"fine-tune epochs must be a positive integer, got {self.epochs}")
        require(self.lr > 0, f"fine-tune learning rate must be positive, got {self.lr}")
        require(self.optimizer in OPTIMIZERS, f"unknown optimizer '{self.optimizer}'; choose one of {', '.join(OPTIMIZERS)}")
        require(self.weight_decay >= 0 and 0 <= self.momentum < 1,
                f"need weight_decay >= 0 and 0 <= momentum < 1, got {self.weight_decay}, {self.momentum}")
        require(isinstance(self.accum_steps, int) and self.accum_steps >= 1,
                f"accum_steps must be an integer >= 1, got {self.accum_steps}")
        require(self.clip_grad is None or self.clip_grad > 0, f"clip_grad must be positive or null, got {self.clip_grad}")
        require(self.amp in AMP_MODES, f"unknown amp mode '{self.amp}'; choose one of {', '.join(AMP_MODES)}")
        require(self.test_amp is None or self.test_amp in AMP_MODES,
                f"unknown test_amp mode '{self.test_amp}'; choose one of {', '.join(AMP_MODES)} (or null: as amp)")
        require(self.scheduler in SCHEDULERS, f"unknown scheduler '{self.scheduler}'; choose one of {', '.join(SCHEDULERS)}")
        require(self.cosine_steps is None or self.cosine_steps > 0, f"cosine_steps must be positive, got {self.cosine_steps}")
        require(0 <= self.label_smoothing < 1, f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        require(self.mixup_alpha >= 0 and self.cutmix_alpha >= 0 and 0 <= self.mixup_prob <= 1,
                "mixup_alpha and cutmix_alpha must be >= 0 and mixup_prob in [0, 1]")
        require(self.aux_lambda >= 0, f"the auxiliary loss weight must be >= 0, got {self.aux_lambda}")
        require(self.aux_kind in AUX_LOSSES, f"unknown aux loss '{self.aux_kind}'; choose one of {', '.join(AUX_LOSSES)}")
        require(not (self.uses_mixup and self.aux_lambda > 0),
                "mixup and the auxiliary loss cannot be combined (mixed images have no single target)")

    @property
    def uses_mixup(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    @property
    def eval_test_amp(self) -> str:
        return self.amp if self.test_amp is None else self.test_amp

    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "finetune", **overrides) -> "FinetuneConfig":
        """Build from a config section (``where`` names it in errors); unknown keys are an error (a typo
        must not be ignored), and every value's type is checked before the ranges."""
        known = {f.name for f in dataclasses.fields(cls)}
        require(isinstance(values, Mapping), f"{where} must be a mapping of fine-tune settings, got {values!r}")
        merged = {**values, **overrides}
        unknown = sorted(set(merged) - known)
        require(not unknown, f"unknown fine-tune settings {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        check(values, FINETUNE_FIELDS, f"{where}.")
        return cls(**merged)


#: the type and range of every fine-tune setting a config may give (checked by ``from_dict``)
FINETUNE_FIELDS = {
    "epochs": integer(ge=1), "lr": real(gt=0), "optimizer": optional(choice(*OPTIMIZERS)),
    "momentum": optional(real(ge=0, lt=1)), "weight_decay": optional(real(ge=0)),
    "accum_steps": optional(integer(ge=1)), "clip_grad": optional(nullable(real(gt=0))),
    "amp": optional(choice(*AMP_MODES)), "scheduler": optional(choice(*SCHEDULERS)),
    "cosine_steps": optional(nullable(integer(ge=1))), "label_smoothing": optional(real(ge=0, lt=1)),
    "mixup_alpha": optional(real(ge=0)), "cutmix_alpha": optional(real(ge=0)),
    "mixup_prob": optional(real(ge=0, le=1)), "aux_lambda": optional(real(ge=0)),
    "aux_kind": optional(choice(*AUX_LOSSES)), "aux_detach": optional(boolean()),
    "test_amp": optional(nullable(choice(*AMP_MODES))), "channels_last": optional(boolean()),
    "compile": optional(boolean()),
}


@dataclass
class FinetuneResult:
    best_epoch: int
    best_val_acc: float
    test_acc: float | None
    history: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- helpers
def select_trainable(model: nn.Module, prefixes: Iterable[str]) -> list[nn.Parameter]:
    """Freeze everything except parameters named ``p`` or ``p.*`` for a prefix p ("" = all)."""
    prefixes = list(prefixes)
    require(prefixes, "no trainable parameters were named")
    chosen, matched = [], {p: False for p in prefixes}
    for name, param in model.named_parameters():
        hit = [p for p in prefixes if p == "" or name == p or name.startswith(p + ".")]
        param.requires_grad_(bool(hit))
        for p in hit:
            matched[p] = True
        if hit:
            chosen.append(param)
    missing = [p for p, ok in matched.items() if not ok]
    require(not missing, f"{type(model).__name__} has no parameters under {', '.join(repr(m) for m in missing)}")
    return chosen


def autocast_context(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    if device.type != "cuda" or amp == "none":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


def build_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int = 0, num_workers: int = 0,
                 pin_memory: bool | None = None) -> DataLoader:
    """Training loaders shuffle with a seeded sampler (DistributedSampler under DDP); evaluation
    loaders keep dataset order and shard exactly across ranks."""
    require(batch_size > 0, f"batch size must be positive, got {batch_size}")
    require(num_workers >= 0, f"num_workers must be >= 0, got {num_workers}")
    sampler = D.train_sampler(dataset, shuffle=True, seed=seed) if train else D.shard_sampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
                      generator=torch.Generator().manual_seed(seed), persistent_workers=False,
                      drop_last=False)


def _to_device(inputs: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    inputs = inputs.to(device, non_blocking=True)
    if channels_last and inputs.ndim == 4:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    return inputs


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, device: torch.device, *, amp: str = "none",
             channels_last: bool = False, desc: str = "eval") -> float:
    """Top-1 accuracy in percent over a loader of (inputs, labels, indices), summed over ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    total = len(loader) if hasattr(loader, "__len__") else None
    batches = preflight.steps(loader, desc, total=total)   # all of them, unless a preflight runs (its first few)
    for inputs, labels, _ in tqdm(batches, total=total, desc=desc, leave=False, disable=not D.is_main()):
        with autocast_context(device, amp):
            logits = model(_to_device(inputs, device, channels_last))
        labels = labels.to(device)
        counts[0] += (logits.argmax(dim=1) == labels).sum()
        counts[1] += labels.numel()
    D.all_reduce_sum(counts)
    model.train(was_training)
    require(counts[1] > 0, f"{desc}: the loader is empty")
    return float(100.0 * counts[0] / counts[1])


def _make_optimizer(params: list[nn.Parameter], cfg: FinetuneConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}


def _load_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value)


# ----------------------------------------------------------------------------- the loop
def finetune(model: nn.Module, train_loader, val_loader, test_loader, cfg: FinetuneConfig, *,
             device: torch.device, trainable: Iterable[str] = ("",), hook: tuple[str, str] | None = None,
             targets=None, n_classes: int | None = None, resume_path: str | os.PathLike | None = None,
             desc: str = "fine-tune", log: Callable[[str], None] | None = None) -> FinetuneResult:
    """Fine-tune ``model`` in place and leave it holding the best-validation weights.

    ``hook`` = (module name, selector) of the activation the auxiliary loss acts on and ``targets``
    a TargetTable indexed by the training loader's dataset indices; both are needed when
    ``cfg.aux_lambda > 0``. ``resume_path`` (optional) holds the end-of-epoch training state, so an
    interrupted run continues from its last finished epoch; it is deleted when the run completes.
    """
    log = log or (lambda msg: tqdm.write(msg) if D.is_main() else None)
    use_aux = cfg.aux_lambda > 0
    if use_aux:
        require(hook is not None and targets is not None, "the auxiliary loss needs a hooked module and targets")
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    params = select_trainable(model, trainable)
    optimizer = _make_optimizer(params, cfg)
    steps_per_epoch = math.ceil(len(train_loader) / cfg.accum_steps)
    require(steps_per_epoch > 0, "the training loader is empty")
    scheduler = None
    if cfg.scheduler == "cosine":
        t_max = cfg.cosine_steps or steps_per_epoch * cfg.epochs
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=t_max, eta_min=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and cfg.amp == "fp16")
    mixup = None
    if cfg.uses_mixup:
        from timm.data import Mixup

        mixup = Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.mixup_prob,
                      label_smoothing=cfg.label_smoothing, num_classes=n_classes or _infer_classes(model))

    start_epoch, best_val, best_epoch, best_state, history = 0, -math.inf, -1, None, []
    if resume_path is not None and Path(resume_path).is_file():
        state = _read_resume(resume_path, device)
        _load_trainable(model, state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scheduler is not None and state.get("scheduler") is not None:
            scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") is not None:
            scaler.load_state_dict(state["scaler"])
        start_epoch, best_val, best_epoch = state["epoch"] + 1, state["best_val"], state["best_epoch"]
        best_state, history = state["best_state"], state["history"]
        log(f"{desc}: resuming after epoch {start_epoch} of {cfg.epochs} (best val {best_val:.2f}%)")

    forward_model: nn.Module = model
    if D.world_size() > 1:
        forward_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        forward_model = torch.compile(forward_model)

    # detached (``aux_detach``, the authors' CIFAR code): the term is still computed and logged, but
    # loss = CE + λ·constant, so every update is the CE-only one
    capture = ActivationCapture(model, hook[0], hook[1], detach=cfg.aux_detach) if use_aux else None
    for epoch in preflight.epochs(range(start_epoch, cfg.epochs)):
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        model.train()
        sums = torch.zeros(4, dtype=torch.float64, device=device)  # ce, aux, examples, batches
        started = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        n_batches = len(train_loader)
        batches = preflight.steps(train_loader, f"{desc} train", total=n_batches, group=cfg.accum_steps)
        bar = tqdm(batches, total=n_batches, desc=f"{desc} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                   disable=not D.is_main())
        with capture if capture is not None else contextlib.nullcontext():
            for step, (inputs, labels, indices) in enumerate(bar):
                inputs = _to_device(inputs, device, cfg.channels_last)
                labels = labels.to(device, non_blocking=True)
                soft = None
                if mixup is not None and inputs.shape[0] % 2 == 0:  # timm's Mixup pairs examples up
                    inputs, soft = mixup(inputs, labels)
                is_update = (step + 1) % cfg.accum_steps == 0 or step + 1 == n_batches
                sync = contextlib.nullcontext() if is_update or not isinstance(
                    forward_model, nn.parallel.DistributedDataParallel) else forward_model.no_sync()
                with sync:
                    with autocast_context(device, cfg.amp):
                        logits = forward_model(inputs)
                        if soft is not None:
                            ce = torch.sum(-soft * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
                        else:
                            ce = F.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
                        aux = torch.zeros((), device=device)
                        if capture is not None:
                            acts = capture.pop().float()
                            aux = aux_loss(acts, targets.lookup(indices).to(device, non_blocking=True).float(),
                                           cfg.aux_kind)
                        loss = ce + cfg.aux_lambda * aux
                    if is_update and not torch.isfinite(loss):
                        raise UserError(f"{desc}: the loss became {float(loss.detach())} at epoch {epoch + 1}, batch {step + 1}; "
                                        f"lower the learning rate or use --amp bf16/none")
                    scaler.scale(loss / cfg.accum_steps).backward()
                if is_update:
                    if cfg.clip_grad is not None:
                        scaler.unscale_(optimizer)
                        torch.nn.utils.clip_grad_norm_(params, cfg.clip_grad)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    if scheduler is not None:
                        scheduler.step()
                b = labels.shape[0]
                sums[0] += ce.detach().double() * b
                sums[1] += aux.detach().double() * b
                sums[2] += b
                sums[3] += 1
                if D.is_main() and (step % 20 == 0 or step + 1 == n_batches):
                    bar.set_postfix(ce=f"{float(ce.detach()):.4f}", aux=f"{float(aux.detach()):.4f}", lr=f"{optimizer.param_groups[0]['lr']:.2e}")
        D.all_reduce_sum(sums)
        seconds = time.perf_counter() - started
        val_acc = evaluate(model, val_loader, device, amp=cfg.amp, channels_last=cfg.channels_last,
                           desc=f"{desc} val")
        record = {"epoch": epoch, "train_ce": float(sums[0] / sums[2]), "train_aux": float(sums[1] / sums[2]),
                  "val_acc": val_acc, "lr": optimizer.param_groups[0]["lr"], "seconds": seconds,
                  "examples_per_s": float(sums[2]) / max(seconds, 1e-9)}
        history.append(record)
        improved = val_acc > best_val
        if improved:
            best_val, best_epoch, best_state = val_acc, epoch, _trainable_state(model)
        log(f"{desc} epoch {epoch + 1}/{cfg.epochs}: ce {record['train_ce']:.4f} aux {record['train_aux']:.4f} "
            f"val acc {val_acc:.2f}%{' (best)' if improved else ''}")
        if resume_path is not None and epoch + 1 < cfg.epochs:
            if D.is_main():
                _write_resume(resume_path, {
                    "model": _trainable_state(model), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict() if scheduler is not None else None,
                    "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch,
                    "best_val": best_val, "best_epoch": best_epoch, "best_state": best_state, "history": history})
            D.barrier()
    _load_trainable(model, best_state)
    test_acc = None
    if test_loader is not None:
        test_acc = evaluate(model, test_loader, device, amp=cfg.eval_test_amp, channels_last=cfg.channels_last,
                            desc=f"{desc} test")
        log(f"{desc}: best epoch {best_epoch + 1} (val {best_val:.2f}%), test acc {test_acc:.2f}%")
    if cfg.channels_last:
        model.to(memory_format=torch.contiguous_format)
    return FinetuneResult(best_epoch=best_epoch, best_val_acc=best_val, test_acc=test_acc, history=history)


def _infer_classes(model: nn.Module) -> int:
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    require(last, "mixup needs the number of classes, but the model has no Linear layer")
    return last[-1].out_features


def _write_resume(path: str | os.PathLike, state: dict) -> None:
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _read_resume(path: str | os.PathLike, device: torch.device) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # a truncated or foreign file
        raise UserError(f"training state {path} is unreadable ({type(err).__name__}); delete it to start the "
                        f"stage over") from None


def remove_resume(path: str | os.PathLike | None) -> None:
    if path is not None and D.is_main():
        Path(path).unlink(missing_ok=True)
