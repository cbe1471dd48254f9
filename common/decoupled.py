"""The decoupled SAE-ception pipeline shared by CIFAR-10 (ViT-H) and ImageNet-1k (ConvNeXt-V2).

A cycle k has five stages, each a thin script in the experiment folder that calls one function
here with the experiment's :class:`DecoupledExperiment` adapter:

=========  =====================================================================================
adapt      cycle 0: the baseline (fine-tuned per ``baseline``, or only scored when
           ``baseline.train`` is false); cycle k >= 1: fine-tune cycle k-1's model with
           CE + λ·aux towards cycle k-1's targets (``adapt``), λ fixed per cycle or chosen by a
           sweep on validation accuracy  ->  ``model.safetensors``, ``adapt.json``
extract    hooked activations of the train / val / test splits into on-disk caches
           (:mod:`common.extraction`)  ->  ``activations/<split>/``
sae        the cycle's SAE, best validation loss; trained from the train cache, or from
           activations recomputed on augmented images every epoch (``activations.sae_on_the_fly``,
           as the authors did)  ->  ``sae.safetensors``, ``sae_train.json``
sharpen    the targets of ``sharpen.mode`` (:data:`common.sharpening.STRATEGIES`: per-class top-k
           kept or removed, per-example top-k, random unit rows), row i = train example i, streamed
           by :func:`common.targets.write_targets`  ->  ``targets.npy``, ``sharpen.json``
metrics    every column of docs/conventions.md on the test split  ->  ``metrics.json``
=========  =====================================================================================

Nothing here materialises a dataset-sized array of SAE codes: class means, targets and the probe
stream over :class:`~common.activations.ActivationSource` objects (:class:`EncodedSource` encodes
batch by batch), so ImageNet's 1.26M-row caches work in bounded memory.

Config keys read here (an experiment's ``config.yaml``; see ``CIFAR-10/config.yaml``)::

    experiment, cycles                          name written to metrics.json; last cycle k
    data: {num_workers}
    hook: {module, selector}                    e.g. encoder / cls_token, head.flatten / identity
    runtime: {channels_last, compile, threads}  threads: torch CPU threads, 0 = torch's default
    baseline: {train, trainable, batch_size, eval_batch_size, augment, finetune: {...}}
    adapt: {trainable, batch_size, eval_batch_size, augment, finetune: {...}}
    aux: {kind, detach, select: fixed|sweep, lambdas (cycles 1..), sweep (grid), select_on: val|test, keep_sweep_models}
    activations: {train_view: augmented|clean, sae_on_the_fly, batch_size, amp, sae_amp, dtype, chunk_rows}
    sae: {d_sae, l1_coeff, l1_form, decoder_norm, lr, epochs, batch_size, amp}   (l1_coeff, epochs: scalar or per-cycle list)
    sharpen: {top_k, mode, batch_size, dtype (optional: float32 | float16 target file)}
    metrics: {l0_threshold, recon_top_k, recon_top_k_from: test|train, batch_size,
              probe: {epochs, lr, batch_size, subset_fraction, seed, train_amp, test_amp}}

``finetune`` sections are :class:`common.finetune.FinetuneConfig` fields. Types and ranges of every
key: :data:`SCHEMA` (plus each experiment's own). Which stage needs which: :data:`GRAPH`, a
:class:`common.runs.StageGraph` (the same mechanism DIGIT-MNIST uses).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from . import distributed as D
from . import schema as S
from .activation_cache import ActivationCache
from .activations import ArraySource, EncodedSource, ModelActivationSource
from .aux_loss import AUX_LOSSES
from .checkpoint import load_meta, load_module, save_module, sidecar
from .errors import UserError, cli_main, require
from .finetune import FinetuneConfig, amp_dtype, build_loader, evaluate, finetune, remove_resume
from .hooks import SELECTORS
from .io import atomic_path, read_json, write_json
from .runs import Stage, StageGraph, cycle_dir, cycle_of, parse_stage_args, stage_parser
from .sae import DECODER_NORMS, L1_FORMS, SAEConfig, SparseAutoencoder
from .seed import set_seed
from .sharpening import NEEDS_CLASS_FEATURES, STRATEGIES, ClassMeans, top_features
from .targets import write_targets

SPLITS = ("train", "val", "test")
STAGES = ("adapt", "extract", "sae", "sharpen", "metrics")
#: stage -> [(cycle offset, stage that must be finished)]; cycle 0 has no predecessor cycle
REQUIRES = {
    "adapt": [(-1, "adapt"), (-1, "sharpen")],
    "extract": [(0, "adapt")],
    "sae": [(0, "extract")],
    "sharpen": [(0, "sae")],
    "metrics": [(0, "adapt"), (0, "extract"), (0, "sae")],
}
GRAPH = StageGraph(REQUIRES)


# ----------------------------------------------------------------------------- the adapter
@dataclass
class AdaptationInputs:
    """What the fine-tuning engine trains and on which data."""
    module: nn.Module                 # trained in place; its parameters are (part of) the saved model
    train: Dataset                    # items (inputs, label, dataset index)
    val: Dataset
    test: Dataset
    hook: tuple[str, str]             # (module name inside ``module``, selector) the aux loss acts on


class DecoupledExperiment:
    """What an experiment supplies; the pipeline does the rest. Subclass and fill in."""

    name: str = ""
    n_classes: int = 0
    config_path: Path | None = None

    def build_model(self, cfg: dict, pretrained: bool) -> nn.Module:
        """The model architecture; with ``pretrained`` the cycle-0 starting weights (downloads allowed),
        without it a bare skeleton that a checkpoint is loaded into."""
        raise NotImplementedError

    def dataset(self, cfg: dict, data_root: str, split: str, augment: bool) -> Dataset:
        """``split`` in train/val/test; items ``(input, label, index)`` with ``index`` in 0..len-1."""
        raise NotImplementedError

    def labels(self, cfg: dict, data_root: str, split: str) -> torch.Tensor:
        """Labels of a split in index order (cheap: used for dataset fingerprints)."""
        raise NotImplementedError

    def validate(self, cfg: dict) -> None:
        """Experiment-specific config checks (the shared ones are in :func:`validate_config`)."""

    def head_after_hook(self, model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """The rest of ``model`` after the hooked activation (hooked activation -> logits): the task
        accuracy with the activation replaced by its SAE reconstruction (``acc_spliced``) runs it."""
        raise NotImplementedError(f"{type(self).__name__} does not say how its model continues after the hook")

    def adaptation_inputs(self, ctx: "StageContext", model: nn.Module, section: dict) -> AdaptationInputs:
        """By default the whole model on images; ImageNet can train ``model.head`` on cached features."""
        cfg, root = ctx.cfg, ctx.data_root
        return AdaptationInputs(model, self.dataset(cfg, root, "train", augment=bool(section["augment"])),
                                self.dataset(cfg, root, "val", augment=False),
                                self.dataset(cfg, root, "test", augment=False),
                                (cfg["hook"]["module"], cfg["hook"]["selector"]))

    def extraction_inputs(self, ctx: "StageContext", model: nn.Module, split: str,
                          augment: bool) -> tuple[nn.Module, Dataset, tuple[str, str]]:
        """(module to run, dataset of (input, label, index), (hook module, selector)) for extraction;
        by default the model on images. ImageNet runs ``model.head`` on cached backbone features."""
        return model, self.dataset(ctx.cfg, ctx.data_root, split, augment), \
            (ctx.cfg["hook"]["module"], ctx.cfg["hook"]["selector"])

    def save_model(self, ctx: "StageContext", model: nn.Module, path: Path, meta: dict) -> None:
        """Write a cycle's model (by default every weight; ImageNet keeps only what adaptation changes)."""
        save_module(path, model, meta)

    def load_model(self, ctx: "StageContext", path: Path) -> nn.Module:
        """Read what :meth:`save_model` wrote into a model, on the CPU."""
        model = self.build_model(ctx.cfg, pretrained=False)
        load_module(path, model)
        return model


# ----------------------------------------------------------------------------- run context
@dataclass
class CyclePaths:
    dir: Path

    @property
    def model(self) -> Path:
        return self.dir / "model.safetensors"

    @property
    def adapt(self) -> Path:
        return self.dir / "adapt.json"

    @property
    def sae(self) -> Path:
        return self.dir / "sae.safetensors"

    @property
    def targets(self) -> Path:
        return self.dir / "targets.npy"

    @property
    def metrics(self) -> Path:
        return self.dir / "metrics.json"

    def acts(self, split: str) -> Path:
        return self.dir / "activations" / split


@dataclass
class StageContext:
    exp: DecoupledExperiment
    cfg: dict
    run_dir: Path
    seed: int
    cycle: int
    data_root: str
    dist: D.DistInfo
    args: argparse.Namespace | None = None  # the parsed command line (extra options of a script)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    def paths(self, cycle: int | None = None) -> CyclePaths:
        return CyclePaths(cycle_dir(self.run_dir, self.seed, self.cycle if cycle is None else cycle))

    def stage(self, name: str, cycle: int | None = None) -> Stage:
        """Stage ``name`` of a cycle (default this one), with the stages it is built from."""
        return stage_at(lambda c: self.paths(c).dir, name, self.cycle if cycle is None else cycle)

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[{self.exp.name} seed {self.seed} cycle {self.cycle}] {message}")

    def labels(self, split: str) -> torch.Tensor:
        return self.exp.labels(self.cfg, self.data_root, split)


def per_cycle(value: Any, cycle: int, key: str, first_cycle: int = 0) -> Any:
    """A scalar applies to every cycle; a list holds one value per cycle from ``first_cycle`` on."""
    if isinstance(value, (list, tuple)):
        i = cycle - first_cycle
        require(0 <= i < len(value), f"{key} lists values for cycles {first_cycle}..{first_cycle + len(value) - 1}, "
                                     f"none for cycle {cycle}")
        return value[i]
    return value


def stage_at(directory_of: Callable[[int], Path], name: str, cycle: int) -> Stage:
    """Stage ``name`` of ``cycle`` with the stages it is built from (:data:`GRAPH`)."""
    return GRAPH.stage(directory_of(cycle), name)


def begin_stage(ctx: StageContext, name: str) -> Stage | None:
    """The stage to run now, or None (logged) when it has finished; stops with one line when a
    stage it is built from has not."""
    stage = ctx.stage(name)
    if stage.done():
        ctx.log(f"{name}: already finished, skipped")
        return None
    require_predecessors(ctx, name)
    return stage


def require_predecessors(ctx: StageContext, stage: str) -> None:
    needed = GRAPH.missing(ctx.stage(stage))
    if needed is not None:
        cycle = cycle_of(needed.directory)
        where = "this cycle" if cycle == ctx.cycle else f"cycle {cycle}"
        raise UserError(f"cycle {ctx.cycle} '{stage}' needs the '{needed.name}' stage of {where}, which has not "
                        f"finished in {needed.directory} (or was built from stages that have run again since); "
                        f"run the stages in order (run.sh does)")


def stage_main(stage: Callable[[StageContext], None], exp: DecoupledExperiment, argv: list[str] | None = None, *,
               description: str = "", distributed: bool = False,
               add_arguments: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Command line of a stage script: ``--run-dir --seed --cycle --device --data-root``."""

    def main(args_list: list[str] | None) -> None:
        parser = stage_parser(description)
        if not any("--data-root" in action.option_strings for action in parser._actions):
            parser.add_argument("--data-root", default=None, help="dataset root (default $SAE_CEPTION_DATA or ./data)")
        if add_arguments is not None:
            add_arguments(parser)
        args, cfg = parse_stage_args(parser, args_list)
        require(cfg.get("experiment") == exp.name,
                f"{args.run_dir} holds a {cfg.get('experiment')} run, not {exp.name}")
        require(args.cycle <= int(cfg["cycles"]),
                f"cycle {args.cycle} is beyond this run's last cycle {cfg['cycles']} (config key 'cycles')")
        threads = int(cfg.get("runtime", {}).get("threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        info = D.init_distributed(args.device)
        succeeded = False
        try:
            require(distributed or info.world_size == 1,
                    "this stage runs as one process; start it with python, not torchrun")
            data_root = getattr(args, "data_root", None) or os.environ.get("SAE_CEPTION_DATA", "./data")
            ctx = StageContext(exp, cfg, Path(args.run_dir), args.seed, args.cycle, str(data_root), info, args)
            started = time.perf_counter()
            stage(ctx)
            ctx.log(f"{stage.__name__.removesuffix('_stage')} finished in {time.perf_counter() - started:.1f}s")
            succeeded = True
        finally:
            if succeeded and info.world_size > 1:
                # Every rank's work is written once all pass this barrier. Leave without the process
                # group's C++ teardown: with gloo it sometimes aborts a rank at exit ("terminate called
                # without an active exception"), and torchrun then reports a finished run as failed.
                D.barrier()
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
            D.cleanup()

    cli_main(main, sys.argv[1:] if argv is None else argv)


#: autocast of a forward pass: none (fp32), bf16, fp16 (CUDA only; a CPU always runs fp32)
AMP = ("none", "bf16", "fp16")
#: precision of a stage's activations: ``shared`` = the split's cache (``activations.amp``/``dtype``),
#: else its own fp32 (``none``) or autocast pass
STAGE_AMP = ("shared",) + AMP


def _section(baseline: bool) -> dict:
    """``baseline`` / ``adapt``: what trains, on which batches; ``finetune`` is checked by FinetuneConfig."""
    fields = {"trainable": S.items(S.text(nonempty=False)), "batch_size": S.integer(ge=1),
              "eval_batch_size": S.integer(ge=1), "augment": S.boolean(), "finetune": S.anything()}
    return {"train": S.boolean(), **fields} if baseline else fields


#: every shared key of a decoupled experiment's config, with its type and range (common.schema)
SCHEMA = {
    "experiment": S.text(), "cycles": S.integer(ge=0), "preset": S.optional(S.text()),
    "data": {"num_workers": S.integer(ge=0)},
    "hook": {"module": S.text(), "selector": S.choice(*SELECTORS)},
    "runtime": {"channels_last": S.boolean(), "compile": S.boolean(), "threads": S.integer(ge=0)},
    "baseline": _section(baseline=True),
    "adapt": _section(baseline=False),
    "aux": {"kind": S.choice(*AUX_LOSSES), "detach": S.boolean(), "select": S.choice("fixed", "sweep"),
            "lambdas": S.per_cycle(S.real(ge=0)), "sweep": S.items(S.real(ge=0)),
            "select_on": S.choice("val", "test"), "keep_sweep_models": S.boolean()},
    "activations": {"train_view": S.choice("augmented", "clean"), "sae_on_the_fly": S.boolean(),
                    "batch_size": S.integer(ge=1), "amp": S.choice(*AMP), "sae_amp": S.choice(*STAGE_AMP),
                    "dtype": S.choice("float16", "float32"), "chunk_rows": S.integer(ge=1)},
    "sae": {"d_sae": S.integer(ge=1), "l1_coeff": S.per_cycle(S.real(ge=0)), "l1_form": S.choice(*L1_FORMS),
            "decoder_norm": S.choice(*DECODER_NORMS), "lr": S.real(gt=0), "epochs": S.per_cycle(S.integer(ge=1)),
            "batch_size": S.integer(ge=1), "amp": S.choice(*AMP)},
    "sharpen": {"top_k": S.integer(ge=1), "mode": S.choice(*STRATEGIES), "batch_size": S.integer(ge=1),
                "dtype": S.optional(S.choice("float16", "float32"))},
    "metrics": {"l0_threshold": S.real(ge=0), "recon_top_k": S.integer(ge=1),
                "recon_top_k_from": S.choice("test", "train"), "batch_size": S.integer(ge=1),
                "probe": {"epochs": S.integer(ge=1), "lr": S.real(gt=0), "batch_size": S.integer(ge=1),
                          "subset_fraction": S.real(gt=0, le=1), "seed": S.integer(ge=0),
                          "train_amp": S.choice(*STAGE_AMP), "test_amp": S.choice(*STAGE_AMP)}},
}


def validate_config(cfg: dict, exp: DecoupledExperiment | None = None) -> None:
    """Every shared setting checked up front (types and ranges first, then the values that depend on
    each other), so an impossible value fails with one line before hours of compute."""
    S.check(cfg, SCHEMA)
    cycles = cfg["cycles"]
    for section in ("baseline", "adapt"):
        FinetuneConfig.from_dict(cfg[section]["finetune"], where=f"{section}.finetune")
        require(cfg[section]["trainable"], f"{section}.trainable must be a non-empty list of parameter-name prefixes")
    aux = cfg["aux"]
    for k in range(1, cycles + 1):
        lambdas = [per_cycle(aux["lambdas"], k, "aux.lambdas", first_cycle=1)] if aux["select"] == "fixed" \
            else aux["sweep"]
        for aux_lambda in lambdas:
            FinetuneConfig.from_dict(cfg["adapt"]["finetune"], where="adapt.finetune", aux_lambda=float(aux_lambda),
                                     aux_kind=aux["kind"], aux_detach=aux["detach"])
    acts = cfg["activations"]
    require(not acts["sae_on_the_fly"] or acts["train_view"] == "augmented",
            "activations.sae_on_the_fly recomputes augmented activations; it needs train_view augmented")
    s = cfg["sae"]
    for k in range(cycles + 1):
        SAEConfig(d_in=1, d_sae=s["d_sae"], l1_coeff=float(per_cycle(s["l1_coeff"], k, "sae.l1_coeff")),
                  l1_form=s["l1_form"], decoder_norm=s["decoder_norm"])
        per_cycle(s["epochs"], k, "sae.epochs")
    require(cfg["sharpen"]["top_k"] <= s["d_sae"], f"sharpen.top_k must be in 1..sae.d_sae ({s['d_sae']}), "
                                                   f"got {cfg['sharpen']['top_k']}")
    require(cfg["metrics"]["recon_top_k"] <= s["d_sae"], f"metrics.recon_top_k must be in 1..sae.d_sae "
                                                         f"({s['d_sae']}), got {cfg['metrics']['recon_top_k']}")
    if exp is not None:
        exp.validate(cfg)


# ----------------------------------------------------------------------------- models and sources
def load_cycle_model(ctx: StageContext, cycle: int | None = None) -> tuple[nn.Module, dict]:
    """The model a finished adapt stage saved, on the CPU, with its metadata."""
    path = ctx.paths(cycle).model
    meta = load_meta(path)
    require(meta.get("kind") == "model" and meta.get("experiment") == ctx.exp.name,
            f"{path} is not a {ctx.exp.name} model checkpoint")
    return ctx.exp.load_model(ctx, path), meta


def open_cache(ctx: StageContext, split: str, name: str | None = None) -> ActivationCache:
    """The cycle's cache ``name`` (default: the split's own) of ``split``, checked against its labels."""
    cache = ActivationCache(ctx.paths().acts(name or split))
    cache.require_dataset(ctx.labels(split), f"the {split} split of {ctx.data_root}")
    return cache


# ----------------------------------------------------------------------------- stage: adapt
def _finetune_cfg(ctx: StageContext, section: dict, aux_lambda: float) -> FinetuneConfig:
    runtime = ctx.cfg.get("runtime", {})
    return FinetuneConfig.from_dict(section["finetune"], aux_lambda=float(aux_lambda),
                                    aux_kind=ctx.cfg["aux"]["kind"], aux_detach=bool(ctx.cfg["aux"]["detach"]),
                                    channels_last=bool(runtime.get("channels_last", False)),
                                    compile=bool(runtime.get("compile", False)))


def _build_start_model(ctx: StageContext) -> nn.Module:
    """Cycle 0's starting point (rank 0 downloads first), or cycle k-1's saved model."""
    set_seed(ctx.seed)  # a new classification head is initialised from the replicate's seed
    if ctx.cycle == 0:
        if not ctx.dist.is_main:
            D.barrier()
        model = ctx.exp.build_model(ctx.cfg, pretrained=True)
        if ctx.dist.is_main:
            D.barrier()
        return model
    return load_cycle_model(ctx, ctx.cycle - 1)[0]


def _adapt_once(ctx: StageContext, out_dir: Path, aux_lambda: float, desc: str) -> dict:
    """Fine-tune (or, for an untrained baseline, only score) and save ``model`` + ``adapt.json`` in out_dir."""
    stage = Stage(out_dir, "adapt", ctx.stage("adapt").after)     # a λ-sweep fine-tune: adapt's inputs
    if stage.done():
        return read_json(out_dir / "adapt.json")
    section = ctx.cfg["baseline" if ctx.cycle == 0 else "adapt"]
    model = _build_start_model(ctx)
    inputs = ctx.exp.adaptation_inputs(ctx, model, section)
    workers = int(ctx.cfg["data"]["num_workers"])
    val = build_loader(inputs.val, int(section["eval_batch_size"]), train=False, num_workers=workers)
    test = build_loader(inputs.test, int(section["eval_batch_size"]), train=False, num_workers=workers)
    ft = _finetune_cfg(ctx, section, aux_lambda)
    if ctx.cycle == 0 and not section["train"]:
        inputs.module.to(ctx.device)
        val_acc = evaluate(inputs.module, val, ctx.device, amp=ft.amp, desc="baseline val")
        test_acc = evaluate(inputs.module, test, ctx.device, amp=ft.eval_test_amp, desc="baseline test")
        result = {"trained": False, "best_epoch": -1, "val_acc": val_acc, "test_acc": test_acc, "history": []}
        ctx.log(f"baseline used as is: val acc {val_acc:.2f}%, test acc {test_acc:.2f}%")
    else:
        targets = None
        if aux_lambda > 0:
            from .targets import TargetTable

            targets = TargetTable(ctx.paths(ctx.cycle - 1).targets, ctx.labels("train"))
        train = build_loader(inputs.train, int(section["batch_size"]), train=True, seed=ctx.seed, num_workers=workers)
        res = finetune(inputs.module, train, val, test, ft, device=ctx.device, trainable=section["trainable"],
                       hook=inputs.hook, targets=targets, n_classes=ctx.exp.n_classes,
                       resume_path=out_dir / "adapt_state.pt", desc=desc)
        result = {"trained": True, "best_epoch": res.best_epoch, "val_acc": res.best_val_acc,
                  "test_acc": res.test_acc, "history": res.history}
    result.update({"cycle": ctx.cycle, "aux_lambda": float(aux_lambda), "finetune": dataclasses.asdict(ft),
                   "trainable": section["trainable"]})
    if ctx.dist.is_main:
        model.to("cpu")
        ctx.exp.save_model(ctx, model, out_dir / "model.safetensors", {
            "kind": "model", "experiment": ctx.exp.name, "cycle": ctx.cycle, "seed": ctx.seed,
            "aux_lambda": float(aux_lambda), "val_acc": result["val_acc"], "test_acc": result["test_acc"]})
        write_json(out_dir / "adapt.json", result)
        stage.finish(["model.safetensors", "model.json", "adapt.json"])
        remove_resume(out_dir / "adapt_state.pt")
    D.barrier()
    return result


def _copy_checkpoint(src: Path, dst: Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)
    write_json(sidecar(dst), {**read_json(sidecar(src)), "file_bytes": dst.stat().st_size})


def adapt_stage(ctx: StageContext) -> None:
    paths = ctx.paths()
    stage = begin_stage(ctx, "adapt")
    if stage is None:
        return
    aux = ctx.cfg["aux"]
    if ctx.cycle == 0 or aux["select"] == "fixed":
        aux_lambda = 0.0 if ctx.cycle == 0 else float(per_cycle(aux["lambdas"], ctx.cycle, "aux.lambdas", first_cycle=1))
        _adapt_once(ctx, paths.dir, aux_lambda, "baseline" if ctx.cycle == 0 else f"cycle {ctx.cycle} λ={aux_lambda:g}")
        return
    # λ sweep: one fine-tune per value (each resumable), the best by validation (or, as the authors, test) accuracy
    key = "val_acc" if aux["select_on"] == "val" else "test_acc"
    runs = []
    for aux_lambda in aux["sweep"]:
        sub = paths.dir / "sweep" / f"lambda_{float(aux_lambda):g}"
        runs.append((float(aux_lambda), sub, _adapt_once(ctx, sub, float(aux_lambda), f"cycle {ctx.cycle} λ={float(aux_lambda):g}")))
    best = runs[0]
    for run in runs[1:]:
        if run[2][key] > best[2][key]:  # strict: ties keep the earlier (smaller) λ of the grid
            best = run
    aux_lambda, sub, result = best
    ctx.log(f"λ sweep: chose λ={aux_lambda:g} by {key} {result[key]:.2f}% over " +
            ", ".join(f"{r[0]:g}: {r[2][key]:.2f}" for r in runs))
    if ctx.dist.is_main:
        _copy_checkpoint(sub / "model.safetensors", paths.model)
        write_json(paths.adapt, {**result, "sweep": [{"aux_lambda": r[0], "val_acc": r[2]["val_acc"],
                                                      "test_acc": r[2]["test_acc"]} for r in runs],
                                 "selected_on": key})
        stage.finish(["model.safetensors", "model.json", "adapt.json"])
        if not aux.get("keep_sweep_models", True):
            for _, other, _ in runs:  # adapt.json stays as the record of the sweep
                (other / "model.safetensors").unlink(missing_ok=True)
                sidecar(other / "model.safetensors").unlink(missing_ok=True)
    D.barrier()


# ----------------------------------------------------------------------------- stage: extract
@dataclass(frozen=True)
class Extraction:
    """One activation cache of a cycle: which split, which forward precision, which storage."""
    name: str        # folder under activations/
    split: str
    amp: str         # autocast of the forward pass
    dtype: str       # storage


def extractions(cfg: dict) -> list[Extraction]:
    """The caches a cycle extracts. ``train`` (targets, probe, SAE) and ``test`` (metrics) run under
    ``activations.amp``; ``val`` (SAE validation only) under ``activations.sae_amp``; a probe split
    whose precision is not ``shared`` gets a cache of its own (``probe_train``, ``probe_test``). A
    pass without autocast is stored as float32: an fp16 file would round it again."""
    acts, probe = cfg["activations"], cfg["metrics"]["probe"]

    def own(name: str, split: str, amp: str) -> Extraction:
        if amp == "shared":
            return Extraction(name, split, acts["amp"], acts["dtype"])
        return Extraction(name, split, amp, "float32" if amp == "none" else acts["dtype"])

    plan = [own("train", "train", "shared"), own("val", "val", acts["sae_amp"]), own("test", "test", "shared")]
    plan += [own(f"probe_{split}", split, probe[f"{split}_amp"]) for split in ("train", "test")
             if probe[f"{split}_amp"] != "shared"]
    return plan


def probe_cache_name(cfg: dict, split: str) -> str:
    return split if cfg["metrics"]["probe"][f"{split}_amp"] == "shared" else f"probe_{split}"


def extract_stage(ctx: StageContext) -> None:
    from .extraction import extract

    paths = ctx.paths()
    stage = begin_stage(ctx, "extract")
    if stage is None:
        return
    model, _ = load_cycle_model(ctx)
    acts = ctx.cfg["activations"]
    outputs = []
    for job in extractions(ctx.cfg):
        augmented = job.split == "train" and acts["train_view"] == "augmented"
        set_seed(ctx.seed)  # the augmentation draws of an augmented view are reproducible
        module, data, (hook_module, selector) = ctx.exp.extraction_inputs(ctx, model, job.split, augmented)
        cache = extract(module, data, hook_module, selector, paths.acts(job.name), device=ctx.device,
                        autocast_dtype=amp_dtype(ctx.device, job.amp), batch_size=int(acts["batch_size"]),
                        num_workers=int(ctx.cfg["data"]["num_workers"]), chunk_rows=int(acts["chunk_rows"]),
                        dtype=job.dtype, desc=f"extract {job.name}", view="augmented" if augmented else "clean",
                        amp=job.amp)
        cache.require_dataset(ctx.labels(job.split), f"the {job.split} split")
        outputs.append(paths.acts(job.name) / "manifest.json")
    if ctx.dist.is_main:
        stage.finish(outputs)
    D.barrier()


# ----------------------------------------------------------------------------- stage: sae
def sae_stage(ctx: StageContext) -> None:
    from .sae_training import train_sae

    paths = ctx.paths()
    stage = begin_stage(ctx, "sae")
    if stage is None:
        return
    acts, s = ctx.cfg["activations"], ctx.cfg["sae"]
    val = open_cache(ctx, "val")
    if acts["sae_on_the_fly"]:
        model, _ = load_cycle_model(ctx)
        hook = ctx.cfg["hook"]
        train = ModelActivationSource(model, ctx.exp.dataset(ctx.cfg, ctx.data_root, "train", augment=True),
                                      (hook["module"], hook["selector"]), dim=val.dim, labels=ctx.labels("train"),
                                      device=ctx.device, autocast=amp_dtype(ctx.device, sae_data_amp(ctx.cfg)),
                                      num_workers=int(ctx.cfg["data"]["num_workers"]))
    else:
        train = open_cache(ctx, "train")
    sae_cfg = SAEConfig(d_in=val.dim, d_sae=int(s["d_sae"]),
                        l1_coeff=float(per_cycle(s["l1_coeff"], ctx.cycle, "sae.l1_coeff")),
                        l1_form=s["l1_form"], decoder_norm=s["decoder_norm"])
    set_seed(ctx.seed)
    sae = SparseAutoencoder(sae_cfg)
    result = train_sae(sae, train, val, epochs=int(per_cycle(s["epochs"], ctx.cycle, "sae.epochs")),
                       batch_size=int(s["batch_size"]), lr=float(s["lr"]), seed=ctx.seed, device=ctx.device,
                       autocast_dtype=amp_dtype(ctx.device, s["amp"]), desc=f"SAE cycle {ctx.cycle}")
    best = result["history"][result["best_epoch"]]
    ctx.log(f"SAE: best epoch {result['best_epoch'] + 1}, val loss {best.get('val_loss', float('nan')):.5f}, "
            f"val L0 {best.get('val_l0', float('nan')):.1f}")
    sae.to("cpu").save(paths.sae, experiment=ctx.exp.name, cycle=ctx.cycle, seed=ctx.seed,
                       best_epoch=result["best_epoch"], on_the_fly=bool(acts["sae_on_the_fly"]))
    write_json(paths.dir / "sae_train.json", {**result, "on_the_fly": bool(acts["sae_on_the_fly"]),
                                              "train_view": acts["train_view"]})
    stage.finish(["sae.safetensors", "sae.json", "sae_train.json"])


def sae_data_amp(cfg: dict) -> str:
    """Autocast of the forward pass that makes the SAE's training data on the fly (as its validation split)."""
    acts = cfg["activations"]
    return acts["amp"] if acts["sae_amp"] == "shared" else acts["sae_amp"]


def load_cycle_sae(ctx: StageContext) -> SparseAutoencoder:
    sae = SparseAutoencoder.load(ctx.paths().sae, ctx.device)
    return sae.eval()


# ----------------------------------------------------------------------------- stage: sharpen
def train_class_means(ctx: StageContext, sae: SparseAutoencoder, train: ActivationCache, batch: int) -> ClassMeans:
    """Per-class mean SAE codes over the train cache, streamed batch by batch."""
    means = ClassMeans(ctx.exp.n_classes, sae.cfg.d_sae)
    for b in tqdm(EncodedSource(train, sae, ctx.device).iter_batches(batch), desc="class means", leave=False,
                  total=-(-len(train) // batch)):
        means.update(b.x, b.labels)
    return means


def train_top_features(ctx: StageContext, sae: SparseAutoencoder, k: int, batch: int) -> torch.Tensor:
    """(classes, k) top features per class by mean code over the training split."""
    return top_features(train_class_means(ctx, sae, open_cache(ctx, "train"), batch).means(), k)


@torch.no_grad()
def sharpen_stage(ctx: StageContext) -> None:
    paths = ctx.paths()
    stage = begin_stage(ctx, "sharpen")
    if stage is None:
        return
    sh = ctx.cfg["sharpen"]
    train = open_cache(ctx, "train")
    sae = load_cycle_sae(ctx)
    require(train.dim == sae.cfg.d_in, f"the train activations have width {train.dim}, the SAE expects {sae.cfg.d_in}")
    batch = int(sh["batch_size"])
    top, counts = None, None
    if sh["mode"] in NEEDS_CLASS_FEATURES:      # per-class strategies: class means over the train split first
        means = train_class_means(ctx, sae, train, batch)
        top, counts = top_features(means.means(), int(sh["top_k"])).to(ctx.device), means.counts.tolist()
    # row i = train example i, streamed
    write_targets(paths.targets, train.iter_batches(batch), ctx.labels("train"), sae.cfg.d_in, sh["mode"], sae=sae,
                  top_idx=top, k=int(sh["top_k"]), random_seed=ctx.seed, device=ctx.device, dtype=sh.get("dtype", "float32"),
                  total=-(-len(train) // batch), experiment=ctx.exp.name, cycle=ctx.cycle, seed=ctx.seed,
                  mode=sh["mode"], top_k=int(sh["top_k"]), view=ctx.cfg["activations"]["train_view"])
    write_json(paths.dir / "sharpen.json", {"top_features": None if top is None else top.cpu().tolist(),
                                            "class_counts": counts, "top_k": int(sh["top_k"]), "mode": sh["mode"]})
    stage.finish(["targets.npy", "targets.json", "sharpen.json"])


# ----------------------------------------------------------------------------- stage: metrics
def metrics_stage(ctx: StageContext) -> None:
    from .metrics import clustering_metrics, csi, l0, reconstruction_csi, uncertainty_coefficient
    from .probes import torch_probe
    from .results import write_metrics
    from .sae_quality import FEATURE_DENSITY_FILE, sae_quality, write_feature_density
    from .sae_training import encode_source

    paths = ctx.paths()
    stage = begin_stage(ctx, "metrics")
    if stage is None:
        return
    m, p = ctx.cfg["metrics"], ctx.cfg["metrics"]["probe"]
    sae = load_cycle_sae(ctx)
    test = open_cache(ctx, "test")
    dense, y = test.read_all(), test.labels
    codes = encode_source(sae, test, int(m["batch_size"]), ctx.device)
    adapt = read_json(paths.adapt)
    # the probe's codes: from the metric caches, or from caches of their own precision (metrics.probe.*_amp)
    probe_train = EncodedSource(open_cache(ctx, "train", probe_cache_name(ctx.cfg, "train")), sae, ctx.device)
    probe_test = ArraySource(codes, y) if probe_cache_name(ctx.cfg, "test") == "test" else \
        ArraySource(encode_source(sae, open_cache(ctx, "test", "probe_test"), int(m["batch_size"]), ctx.device), y)
    set_seed(int(p["seed"]))
    probe = torch_probe(probe_train, probe_test, ctx.exp.n_classes, epochs=int(p["epochs"]), lr=float(p["lr"]),
                        batch_size=int(p["batch_size"]), subset_fraction=float(p["subset_fraction"]),
                        seed=int(p["seed"]), device=ctx.device)
    # Table 5's per-class top-k: chosen on these test codes (the authors), or on the training codes
    recon_top = None if m["recon_top_k_from"] == "test" else \
        train_top_features(ctx, sae, int(m["recon_top_k"]), int(m["batch_size"]))
    metrics = {"acc": adapt["test_acc"], "probe": probe, "csi": csi(dense, y),
               "u": uncertainty_coefficient(codes, y, faithful=True),
               "u_corrected": uncertainty_coefficient(codes, y, faithful=False),
               **clustering_metrics(codes, y, device=ctx.device),
               "l0": l0(codes, float(m["l0_threshold"])),
               **reconstruction_csi(sae, codes, y, int(m["recon_top_k"]), top=recon_top)}
    # SAE quality on the test activations; acc_spliced runs the rest of the model on the reconstructions
    model, _ = load_cycle_model(ctx)
    quality = sae_quality(sae, dense, head=ctx.exp.head_after_hook(model.to(ctx.device).eval()), labels=y,
                          batch_size=int(m["batch_size"]), return_density=True)
    write_feature_density(paths.dir, quality.pop("feature_density"), len(y))
    metrics.update(quality)
    sae_meta = read_json(paths.dir / "sae_train.json")
    extra = {"val_acc": adapt["val_acc"], "aux_lambda": adapt["aux_lambda"], "sae_l1_coeff": sae.cfg.l1_coeff,
             "sae_best_epoch": sae_meta["best_epoch"], "dead_features": int((codes > 0).sum(0).eq(0).sum()),
             "sparsity_pct": float(100.0 * (codes == 0).double().mean()), "n_test": int(len(y)),
             "preset": ctx.cfg.get("preset", "")}
    write_metrics(paths.metrics, experiment=ctx.exp.name, seed=ctx.seed, cycle=ctx.cycle, metrics=metrics, **extra)
    stage.finish(["metrics.json", FEATURE_DENSITY_FILE])
    ctx.log("metrics: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if v is not None))


# ----------------------------------------------------------------------------- a whole cycle
STAGE_FUNCTIONS: dict[str, Callable[[StageContext], None]] = {
    "adapt": adapt_stage, "extract": extract_stage, "sae": sae_stage, "sharpen": sharpen_stage,
    "metrics": metrics_stage}


DISTRIBUTED_STAGES = ("adapt", "extract")


def add_stages_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", default=",".join(STAGES),
                        help=f"comma list of stages to run in order (default: all of {','.join(STAGES)}; "
                             f"sharpen is skipped after the last cycle, whose targets nothing uses)")


def cycle_stage(ctx: StageContext) -> None:
    """Every stage of one cycle in one process (``--stages`` picks a subset): no interpreter start-up
    per stage. Finished stages are skipped as always."""
    names = [n.strip() for n in (getattr(ctx.args, "stages", None) or ",".join(STAGES)).split(",") if n.strip()]
    unknown = [n for n in names if n not in STAGE_FUNCTIONS]
    require(not unknown, f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    single = [n for n in names if n not in DISTRIBUTED_STAGES]
    require(ctx.dist.world_size == 1 or not single,
            f"under torchrun only {' and '.join(DISTRIBUTED_STAGES)} can run; start {', '.join(single)} with python")
    for name in STAGES:  # always in pipeline order
        if name not in names or (name == "sharpen" and ctx.cycle == int(ctx.cfg["cycles"])):
            continue
        started = time.perf_counter()
        STAGE_FUNCTIONS[name](ctx)
        ctx.log(f"{name} done ({time.perf_counter() - started:.1f}s)")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- CLI helpers
def _status(argv: list[str] | None = None) -> None:
    """``python -m common.decoupled status RUN_DIR``: which stages of which cycle are finished."""
    parser = argparse.ArgumentParser(description="Finished stages of a decoupled run.")
    parser.add_argument("command", choices=["status"])
    parser.add_argument("run_dir")
    args = parser.parse_args(argv)
    run = Path(args.run_dir)
    require(run.is_dir(), f"run directory {run} not found")
    for seed_dir in sorted(run.glob("seed_*")):
        for cdir in sorted(seed_dir.glob("cycle_*"), key=lambda p: int(p.name.split("_")[1])):
            cycle = int(cdir.name.split("_")[1])
            done = [s for s in STAGES if stage_at(lambda c: seed_dir / f"cycle_{c}", s, cycle).done()]
            print(f"{seed_dir.name}/{cdir.name}: {', '.join(done) or 'nothing finished'}")


if __name__ == "__main__":
    cli_main(_status, sys.argv[1:])
