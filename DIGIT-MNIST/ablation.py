"""Stage: the random-target ablation of Table 10 — one cycle from scratch, trained as train.py trains
a cycle, toward seeded unit-norm Gaussian targets instead of sharpened SAE reconstructions (no SAE is
involved in the targets): the ``random`` strategy of common.targets.write_targets."""
import sys

import torch

from common.activations import ArraySource
from common.errors import cli_main
from common.runs import parse_stage_args, stage_parser
from common.targets import TargetTable, write_targets
from mnist import HIDDEN, ablation_dir, load_splits, stage
from train import run_training


def main(argv=None):
    args, cfg = parse_stage_args(stage_parser(__doc__), argv)
    out = ablation_dir(args.run_dir, args.seed)
    if stage(out, "train").done():
        print("random-target ablation: train already done, skipping")
        return
    splits = load_splits(args.data_root, cfg)
    x, y = splits["train"]
    # One unit Gaussian row per training example, drawn from a generator seeded with the replicate's seed
    # (seed 42: the authors' targets); the source only gives the table its shape: 50k rows of width 16.
    source = ArraySource(torch.zeros(len(x), HIDDEN), y)
    write_targets(out / "targets.npy", source.iter_batches(len(source)), y, HIDDEN, "random", random_seed=args.seed,
                  total=1, content=x, seed=args.seed)
    targets = TargetTable(out / "targets.npy", y, content=x).all()
    # λ: ablation.aux_lambda (Table 10), or swept on validation; the ablation's own aux.kind (ablation.kind)
    fixed = cfg.ablation.get("aux_lambda", cfg.ablation.get("lambda"))   # `lambda`: its name in older run folders
    aux_lambda = fixed if cfg.ablation.select == "fixed" else None
    run_training(cfg, splits, out, args.seed, aux_lambda=aux_lambda, kind=cfg.ablation.kind, targets=targets,
                 desc=f"seed {args.seed} random targets")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
