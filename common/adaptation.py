"""The adapt stage's blocks: one fine-tune at a given λ, saved with its record, and the choice of λ.

An experiment's ``adapt.py`` builds the model and the data and calls :func:`fine_tune_and_save`
for one λ; :func:`adapt_cycle` calls that once (cycle 0: λ = 0; ``aux.select: fixed``: the cycle's
λ from ``aux.lambdas``) or once per value of ``aux.sweep``, keeping the best by validation accuracy
(``aux.select_on: test`` picks by test accuracy, as the authors did).
"""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from . import distributed as D
from .checkpoint import load_meta, sidecar
from .config import Config
from .decoupled import CycleRun, per_cycle
from .errors import require
from .finetune import FinetuneConfig, build_loader, evaluate, finetune, remove_resume
from .io import atomic_path, read_json, write_json
from .runs import Stage
from .seed import set_seed
from .targets import TargetTable

#: what a fine-tune leaves in its folder (the cycle's own, or sweep/lambda_<λ>/)
OUTPUTS = ["model.safetensors", "model.json", "adapt.json"]


def section_of(run: CycleRun) -> Config:
    """``baseline`` for cycle 0, ``adapt`` for the SAE-ception cycles: what trains, on which batches."""
    return run.cfg["baseline" if run.cycle == 0 else "adapt"]


def finetune_config(run: CycleRun, aux_lambda: float) -> FinetuneConfig:
    """The cycle's optimiser, schedule and precision (``<section>.finetune``) with the auxiliary term."""
    runtime, aux = run.cfg.get("runtime", {}), run.cfg.aux
    return FinetuneConfig.from_dict(section_of(run).finetune, aux_lambda=float(aux_lambda), aux_kind=aux.kind,
                                    aux_detach=bool(aux.detach), channels_last=bool(runtime.get("channels_last", False)),
                                    compile=bool(runtime.get("compile", False)))


def start_model(run: CycleRun, pretrained: Callable[[], nn.Module], saved: Callable[[Path], nn.Module]) -> nn.Module:
    """Cycle 0: ``pretrained()`` (rank 0 first, so only it downloads); cycle k: ``saved(path)`` of
    cycle k-1's model. The seed is set first: a new classification head is drawn from it."""
    set_seed(run.seed)
    if run.cycle > 0:
        return load_cycle_model(run, saved, run.cycle - 1)
    if not run.dist.is_main:
        D.barrier()
    model = pretrained()
    if run.dist.is_main:
        D.barrier()
    return model


def load_cycle_model(run: CycleRun, saved: Callable[[Path], nn.Module], cycle: int | None = None) -> nn.Module:
    """The model a finished adapt stage saved (``saved`` reads the file into a model), on the CPU."""
    path = run.paths(cycle).model
    meta = load_meta(path)
    require(meta.get("kind") == "model" and meta.get("experiment") == run.experiment,
            f"{path} is not a {run.experiment} model checkpoint")
    return saved(path)


def fine_tune_and_save(run: CycleRun, out_dir: Path, aux_lambda: float, *, model: nn.Module, module: nn.Module,
                       splits: tuple[Dataset, Dataset, Dataset], hook: tuple[str, str], n_classes: int,
                       train_labels: torch.Tensor, save: Callable[[Path, nn.Module, dict], None]) -> dict:
    """Fine-tune ``module`` (``model`` or a part of it that shares its parameters) on the
    (train, val, test) ``splits`` with CE + λ·aux on ``hook`` towards cycle k-1's targets, keep the
    best validation epoch, and ``save(path, model, meta)`` with ``adapt.json`` into ``out_dir``.
    An untrained baseline (``baseline.train: false``) is only scored. Resumable per epoch."""
    stage = _fine_tune_stage(run, out_dir)
    section, ft = section_of(run), finetune_config(run, aux_lambda)
    workers = int(run.cfg.data.num_workers)
    train, val, test = splits
    val = build_loader(val, int(section.eval_batch_size), train=False, num_workers=workers)
    test = build_loader(test, int(section.eval_batch_size), train=False, num_workers=workers)
    if run.cycle == 0 and not section.train:
        module.to(run.device)
        val_acc = evaluate(module, val, run.device, amp=ft.amp, desc="baseline val")
        test_acc = evaluate(module, test, run.device, amp=ft.eval_test_amp, desc="baseline test")
        result = {"trained": False, "best_epoch": -1, "val_acc": val_acc, "test_acc": test_acc, "history": []}
        run.log(f"baseline used as is: val acc {val_acc:.2f}%, test acc {test_acc:.2f}%")
    else:
        targets = TargetTable(run.paths(run.cycle - 1).targets, train_labels) if aux_lambda > 0 else None
        train = build_loader(train, int(section.batch_size), train=True, seed=run.seed, num_workers=workers)
        desc = "baseline" if run.cycle == 0 else f"cycle {run.cycle} λ={aux_lambda:g}"
        res = finetune(module, train, val, test, ft, device=run.device, trainable=section.trainable, hook=hook,
                       targets=targets, n_classes=n_classes, resume_path=out_dir / "adapt_state.pt", desc=desc)
        result = {"trained": True, "best_epoch": res.best_epoch, "val_acc": res.best_val_acc,
                  "test_acc": res.test_acc, "history": res.history}
    result.update({"cycle": run.cycle, "aux_lambda": float(aux_lambda), "finetune": dataclasses.asdict(ft),
                   "trainable": section.trainable})
    if run.dist.is_main:
        model.to("cpu")
        save(out_dir / "model.safetensors", model, {
            "kind": "model", "experiment": run.experiment, "cycle": run.cycle, "seed": run.seed,
            "aux_lambda": float(aux_lambda), "val_acc": result["val_acc"], "test_acc": result["test_acc"]})
        write_json(out_dir / "adapt.json", result)
        stage.finish(OUTPUTS)
        remove_resume(out_dir / "adapt_state.pt")
    D.barrier()
    return result


def adapt_cycle(run: CycleRun, fine_tune: Callable[[float, Path], dict]) -> None:
    """The adapt stage: ``fine_tune(λ, out_dir)`` once at the cycle's λ, or once per value of the
    sweep (each in ``sweep/lambda_<λ>/``, each resumable) and the best copied into the cycle."""
    stage = run.begin("adapt")
    if stage is None:
        return
    aux, paths = run.cfg.aux, run.paths()
    if run.cycle == 0 or aux.select == "fixed":
        fine_tune(0.0 if run.cycle == 0 else float(per_cycle(aux.lambdas, run.cycle, "aux.lambdas", first_cycle=1)),
                  paths.dir)
        return
    key = "val_acc" if aux.select_on == "val" else "test_acc"
    runs = [(float(v), paths.dir / "sweep" / f"lambda_{float(v):g}") for v in aux.sweep]
    # a finished member of the sweep is read back, not redone
    runs = [(aux_lambda, sub, read_json(sub / "adapt.json") if _fine_tune_stage(run, sub).done()
             else fine_tune(aux_lambda, sub)) for aux_lambda, sub in runs]
    best = runs[0]
    for candidate in runs[1:]:
        if candidate[2][key] > best[2][key]:  # strict: ties keep the earlier (smaller) λ of the grid
            best = candidate
    aux_lambda, sub, result = best
    run.log(f"λ sweep: chose λ={aux_lambda:g} by {key} {result[key]:.2f}% over " +
            ", ".join(f"{r[0]:g}: {r[2][key]:.2f}" for r in runs))
    if run.dist.is_main:
        _copy_checkpoint(sub / "model.safetensors", paths.model)
        write_json(paths.adapt, {**result, "sweep": [{"aux_lambda": r[0], "val_acc": r[2]["val_acc"],
                                                      "test_acc": r[2]["test_acc"]} for r in runs],
                                 "selected_on": key})
        stage.finish(OUTPUTS)
        if not aux.get("keep_sweep_models", True):
            for _, other, _ in runs:  # adapt.json stays as the record of the sweep
                (other / "model.safetensors").unlink(missing_ok=True)
                sidecar(other / "model.safetensors").unlink(missing_ok=True)
    D.barrier()


def _fine_tune_stage(run: CycleRun, out_dir: Path) -> Stage:
    """The adapt stage of the cycle, or of one member of its λ sweep (same inputs, its own folder)."""
    return Stage(out_dir, "adapt", run.stage("adapt").after)


def _copy_checkpoint(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    write_json(sidecar(dst), {**read_json(sidecar(src)), "file_bytes": dst.stat().st_size})
