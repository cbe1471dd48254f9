"""Stage: train cycle k of DIGIT-MNIST — the MLP 784-16-16-10 from its seeded initialisation, with
SAEs on its hidden layers trained alongside (authors-code §1); cycles k >= 1 add λ·aux toward the
targets that cycle k-1's sharpen stage wrote. ablation.py trains the same way toward random targets."""
import sys
import time
from pathlib import Path

import torch

from common.checkpoint import save_module
from common.concurrent_training import sweep_aux_lambda, train_concurrent
from common.config import Config
from common.errors import cli_main, require
from common.io import write_json
from common.runs import cycle_dir, parse_stage_args, stage_parser
from common.targets import TargetTable
from mnist import build, checkpoint_paths, load_splits, stage


def main(argv=None):
    args, cfg = parse_stage_args(stage_parser(__doc__), argv)
    require(args.cycle <= cfg.cycles, f"cycle {args.cycle} is beyond the configured {cfg.cycles} cycles")
    out = cycle_dir(args.run_dir, args.seed, args.cycle)
    if stage(out, "train").done():
        print(f"cycle {args.cycle}: train already done, skipping")
        return
    if args.cycle > 0:
        previous = cycle_dir(args.run_dir, args.seed, args.cycle - 1)
        stage(previous, "sharpen").require_done(f"run cycle {args.cycle - 1} (train, then sharpen) before cycle {args.cycle}")
    # Data: MNIST's official 60k split 50k train / 10k validation (stratified, seeded), raw 0-255 pixels;
    # the 10k test set is only read by evaluate.py.
    splits = load_splits(args.data_root, cfg)
    # Targets: cycle 0 has none (CE only); cycle k >= 1 reads the table of cycle k-1, row i = train example i,
    # checked against this split's labels and pixels. λ: aux.lambdas[k-1], or swept on validation.
    targets, aux_lambda = None, None
    if args.cycle > 0:
        targets = TargetTable(previous / "targets.npy", splits["train"][1], content=splits["train"][0]).all()
        if cfg.aux.select == "fixed":
            aux_lambda = cfg.aux.lambdas[args.cycle - 1]
    run_training(cfg, splits, out, args.seed, aux_lambda=aux_lambda, kind=cfg.aux.kind, targets=targets,
                 select_on=cfg.aux.get("select_on", "val"),
                 desc=f"seed {args.seed} cycle {args.cycle}")


def run_training(cfg: Config, splits: dict, out_dir: Path, seed: int, *, aux_lambda: float | None, kind: str,
                 targets: torch.Tensor | None, desc: str, select_on: str = "val") -> None:
    """Train the MLP + SAEs once and save the checkpoint of the best validation epoch.

    ``aux_lambda`` None with targets: λ is the sweep value with the best ``select_on`` accuracy."""
    set_threads(cfg.train.threads)
    train_stage = stage(out_dir, "train")
    started = train_stage.started
    sweep = None
    if targets is not None and aux_lambda is None:
        aux_lambda, sweep = select_aux_lambda(cfg, splits, seed, targets, kind, desc, select_on)
    # Model and hook: the MLP and one SAE per hidden layer in sae.layers (d_sae features, L1 sparsity), each
    # initialised right after set_seed(seed); the auxiliary term acts on hidden layer aux.layer (h1).
    model, saes = build(cfg, seed)
    # What trains, and how: every MLP weight (Adam, train.lr) and every SAE weight (Adam, sae.lr) at once,
    # train.epochs epochs of batches in a seeded DataLoader's order. The MLP's loss is
    # CE(logits, y) + λ · aux(h1, target), aux = 1 - cosine (aux.kind: cosine, or the authors' broadcast
    # form); each SAE's loss (reconstruction + L1) sees its layer detached, so it cannot move the MLP.
    # The weights of the epoch with the best validation accuracy are kept.
    result = train_concurrent(model, saes, splits["train"], splits["val"], epochs=cfg.train.epochs,
                              batch_size=cfg.train.batch_size, lr=cfg.train.lr, sae_lr=cfg.sae.lr,
                              seed=seed, aux_lambda=aux_lambda or 0.0, aux_kind=kind, aux_layer=cfg.aux.layer,
                              targets=targets, adam=cfg.train.adam, step=cfg.train.step, desc=desc)
    # Saved: mlp.safetensors, sae_h<layer>.safetensors, train.json (λ, the per-epoch history, the sweep).
    paths = checkpoint_paths(out_dir, cfg)
    save_module(paths["mlp"], model, {"kind": "mlp", "seed": seed, "aux_lambda": aux_lambda})
    for layer, sae in saes.items():
        sae.save(paths[f"sae_h{layer}"], layer=layer, seed=seed)
    info = {"aux_lambda": aux_lambda, "aux_kind": kind, "best_epoch": result["best_epoch"],
            "best_val_acc": result["best_val_acc"], "history": result["history"], "sweep": sweep,
            "adam": cfg.train.adam, "step": cfg.train.step, "threads": torch.get_num_threads(),
            "seconds": time.time() - started}
    write_json(out_dir / "train.json", info)
    train_stage.finish([*paths.values(), out_dir / "train.json"], aux_lambda=aux_lambda)
    print(f"{desc}: λ={aux_lambda} best epoch {result['best_epoch'] + 1}, val acc {result['best_val_acc']:.2f}% "
          f"({time.time() - started:.0f}s)")


def select_aux_lambda(cfg: Config, splits: dict, seed: int, targets: torch.Tensor, kind: str, desc: str,
                      select_on: str = "val") -> tuple[float, list]:
    """λ with the best validation accuracy over aux.sweep: one MLP per value (same initialisation, same
    batches, no SAEs: they cannot change the MLP), all trained at once. Test data is never looked at,
    unless ``select_on`` is ``test``: then λ is the one whose best-validation epoch scores best on the
    test set, as the authors chose (the experiment of DIGIT-MNIST/results/README.md)."""
    results = sweep_aux_lambda(lambda: build(cfg, seed)[0], cfg.aux.sweep, splits["train"], splits["val"],
                               epochs=cfg.train.epochs, batch_size=cfg.train.batch_size,
                               lr=cfg.train.lr, seed=seed, targets=targets, aux_kind=kind,
                               aux_layer=cfg.aux.layer, step=cfg.train.step, desc=f"{desc} λ sweep",
                               test=splits["test"] if select_on == "test" else None)
    key = "best_val_acc" if select_on == "val" else "best_test_acc"
    best = max(results, key=lambda r: r[key])  # first of equals: the smallest λ
    return best["aux_lambda"], results


def set_threads(threads: int) -> None:
    """``train.threads``: torch's intra-op threads for this process; 0 leaves torch's default (the
    number of cores, or OMP_NUM_THREADS where set), as the authors ran."""
    if threads > 0:
        torch.set_num_threads(threads)


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
