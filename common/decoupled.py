"""The plumbing of a decoupled SAE-ception cycle (CIFAR-10 ViT-H, ImageNet ConvNeXt-V2): where a
cycle's files live, which stage needs which, and the command line of a stage script.

The recipes are the experiments' own scripts (``adapt.py``, ``train_sae.py``, ``sharpen.py``,
``evaluate.py``); they build their model and data and call the blocks of :mod:`common`. A cycle k
has five stages, each leaving files in ``<run>/seed_<s>/cycle_<k>/`` and a ``<stage>.done`` marker:

=========  =====================================================================================
adapt      ``model.safetensors``, ``adapt.json``: the baseline (k = 0) or the fine-tune with
           CE + λ·aux towards cycle k-1's targets (:mod:`common.adaptation`)
extract    ``activations/<split>/``: hooked activations of train / val / test (:mod:`common.extraction`)
sae        ``sae.safetensors``, ``sae_train.json``: the cycle's SAE (:mod:`common.sae_training`)
sharpen    ``targets.npy``, ``sharpen.json``: one target per training example for cycle k+1
           (:func:`common.targets.write_targets`)
metrics    ``metrics.json``: every column of docs/conventions.md (:mod:`common.evaluation`)
=========  =====================================================================================

:data:`GRAPH` (a :class:`common.runs.StageGraph`, the mechanism DIGIT-MNIST uses too) says which
stage is built from which; :func:`stage_cli` skips finished stages and refuses a stage whose inputs
have not finished. ``python -m common.decoupled status RUN_DIR`` lists what has finished.

Config keys shared by the decoupled experiments (types and ranges: :data:`SCHEMA`; an experiment adds
its own ``data``/``model`` keys)::

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
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from . import distributed as D
from . import schema as S
from .activation_cache import ActivationCache
from .aux_loss import AUX_LOSSES
from .errors import UserError, cli_main, require
from .config import Config
from .finetune import FinetuneConfig
from .hooks import SELECTORS
from .runs import Stage, StageGraph, cycle_dir, cycle_of, parse_stage_args, stage_parser
from .sae import DECODER_NORMS, L1_FORMS, SAEConfig
from .sharpening import STRATEGIES

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
#: the stages that may run under torchrun (several processes); the others run as one process
DISTRIBUTED_STAGES = ("adapt", "extract")


class CyclePaths:
    """The files of one cycle."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        self.model = self.dir / "model.safetensors"     # adapt
        self.adapt = self.dir / "adapt.json"
        self.sae = self.dir / "sae.safetensors"         # sae
        self.targets = self.dir / "targets.npy"         # sharpen
        self.metrics = self.dir / "metrics.json"        # metrics

    def acts(self, split: str) -> Path:
        return self.dir / "activations" / split


@dataclass
class CycleRun:
    """One seed's cycle k of a run directory, as a stage script sees it."""
    experiment: str
    cfg: Config
    run_dir: Path
    seed: int
    cycle: int
    data_root: str
    dist: D.DistInfo
    args: argparse.Namespace | None = None  # the parsed command line (extra options of a script)

    def __post_init__(self):
        if not isinstance(self.cfg, Config):  # read by attribute everywhere: run.cfg.sae.d_sae
            self.cfg = Config(self.cfg)

    @property
    def device(self) -> torch.device:
        return self.dist.device

    @property
    def is_last_cycle(self) -> bool:
        return self.cycle == int(self.cfg.cycles)

    def paths(self, cycle: int | None = None) -> CyclePaths:
        return CyclePaths(cycle_dir(self.run_dir, self.seed, self.cycle if cycle is None else cycle))

    def stage(self, name: str, cycle: int | None = None) -> Stage:
        """Stage ``name`` of a cycle (default this one), with the stages it is built from."""
        return GRAPH.stage(self.paths(cycle).dir, name)

    def begin(self, name: str) -> Stage | None:
        """The stage to run now, or None (logged) when it has finished; stops with one line when a
        stage it is built from has not."""
        stage = self.stage(name)
        if stage.done():
            self.log(f"{name}: already finished, skipped")
            return None
        needed = GRAPH.missing(stage)
        if needed is not None:
            cycle = cycle_of(needed.directory)
            where = "this cycle" if cycle == self.cycle else f"cycle {cycle}"
            raise UserError(f"cycle {self.cycle} '{name}' needs the '{needed.name}' stage of {where}, which has not "
                            f"finished in {needed.directory} (or was built from stages that have run again since); "
                            f"run the stages in order (run.sh does)")
        return stage

    def log(self, message: str) -> None:
        if self.dist.is_main:
            tqdm.write(f"[{self.experiment} seed {self.seed} cycle {self.cycle}] {message}")

    def open_cache(self, split: str, labels: torch.Tensor, name: str | None = None) -> ActivationCache:
        """This cycle's activation cache ``name`` (default: the split's own), checked against the split's labels."""
        cache = ActivationCache(self.paths().acts(name or split))
        cache.require_dataset(labels, f"the {split} split of {self.data_root}")
        return cache


def per_cycle(value: Any, cycle: int, key: str, first_cycle: int = 0) -> Any:
    """A scalar applies to every cycle; a list holds one value per cycle from ``first_cycle`` on."""
    if isinstance(value, (list, tuple)):
        i = cycle - first_cycle
        require(0 <= i < len(value), f"{key} lists values for cycles {first_cycle}..{first_cycle + len(value) - 1}, "
                                     f"none for cycle {cycle}")
        return value[i]
    return value


# ----------------------------------------------------------------------------- the command line
def stage_cli(stages: dict[str, Callable[[CycleRun], None]], experiment: str, description: str, *,
              argv: list[str] | None = None) -> None:
    """The command line of a stage script: ``--run-dir --seed --cycle --device --data-root``, and
    ``--stages a,b`` when the script holds several (cycle.py: every stage of a cycle in one process).
    Runs the chosen ``stages`` in pipeline order; sharpen is skipped after the last cycle, whose
    targets nothing uses."""
    def main(args_list: list[str] | None) -> None:
        parser = stage_parser(description)
        if len(stages) > 1:
            parser.add_argument("--stages", default=",".join(stages),
                                help=f"comma list of stages to run in order (default: {','.join(stages)})")
        args, cfg = parse_stage_args(parser, args_list)
        chosen = [n.strip() for n in getattr(args, "stages", ",".join(stages)).split(",") if n.strip()]
        unknown = [n for n in chosen if n not in stages]
        require(not unknown, f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(stages)}")
        require(cfg.get("experiment") == experiment, f"{args.run_dir} holds a {cfg.get('experiment')} run, not {experiment}")
        require(args.cycle <= int(cfg.cycles),
                f"cycle {args.cycle} is beyond this run's last cycle {cfg['cycles']} (config key 'cycles')")
        threads = int(cfg.get("runtime", {}).get("threads", 0))
        if threads > 0:
            torch.set_num_threads(threads)
        info = D.init_distributed(args.device)
        succeeded = False
        try:
            single = [n for n in chosen if n not in DISTRIBUTED_STAGES]
            require(info.world_size == 1 or not single,
                    f"under torchrun only {' and '.join(DISTRIBUTED_STAGES)} can run; start {', '.join(single)} with python")
            run = CycleRun(experiment, cfg, Path(args.run_dir), args.seed, args.cycle, str(args.data_root), info, args)
            for name in STAGES:  # always in pipeline order
                if name not in chosen or (name == "sharpen" and run.is_last_cycle and len(stages) > 1):
                    continue
                started = time.perf_counter()
                stages[name](run)
                run.log(f"{name} done ({time.perf_counter() - started:.1f}s)")
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
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


# ----------------------------------------------------------------------------- the shared config
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


def validate_config(cfg: Config, experiment_schema: dict | None = None) -> None:
    """Every shared setting checked up front (types and ranges first, then the values that depend on
    each other), so an impossible value fails with one line before hours of compute. An experiment's
    ``validate.py`` passes its own keys' schema and adds its own cross-checks after this."""
    S.check(cfg, SCHEMA)
    if experiment_schema is not None:
        S.check(cfg, experiment_schema)
    cycles = cfg.cycles
    for section in ("baseline", "adapt"):
        FinetuneConfig.from_dict(cfg[section]["finetune"], where=f"{section}.finetune")
        require(cfg[section]["trainable"], f"{section}.trainable must be a non-empty list of parameter-name prefixes")
    aux = cfg.aux
    for k in range(1, cycles + 1):
        lambdas = [per_cycle(aux.lambdas, k, "aux.lambdas", first_cycle=1)] if aux.select == "fixed" \
            else aux.sweep
        for aux_lambda in lambdas:
            FinetuneConfig.from_dict(cfg.adapt.finetune, where="adapt.finetune", aux_lambda=float(aux_lambda),
                                     aux_kind=aux.kind, aux_detach=aux.detach)
    acts = cfg.activations
    require(not acts.sae_on_the_fly or acts.train_view == "augmented",
            "activations.sae_on_the_fly recomputes augmented activations; it needs train_view augmented")
    s = cfg.sae
    for k in range(cycles + 1):
        SAEConfig(d_in=1, d_sae=s.d_sae, l1_coeff=float(per_cycle(s.l1_coeff, k, "sae.l1_coeff")),
                  l1_form=s.l1_form, decoder_norm=s.decoder_norm)
        per_cycle(s.epochs, k, "sae.epochs")
    for key, value in (("sharpen.top_k", cfg.sharpen.top_k), ("metrics.recon_top_k", cfg.metrics.recon_top_k)):
        require(value <= s.d_sae, f"{key} must be in 1..sae.d_sae ({s.d_sae}), got {value}")


# ----------------------------------------------------------------------------- status
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
            done = [s for s in STAGES if GRAPH.stage(cdir, s).done()]
            print(f"{seed_dir.name}/{cdir.name}: {', '.join(done) or 'nothing finished'}")


if __name__ == "__main__":
    cli_main(_status, sys.argv[1:])
