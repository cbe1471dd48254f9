"""Stage: the random-target ablation of Table 10 — one cycle from scratch with seeded unit-norm
Gaussian targets instead of sharpened SAE reconstructions (no SAE is involved in the targets)."""
import sys

from common.errors import cli_main
from common.runs import parse_stage_args, stage_parser
from common.sharpening import random_targets
from mnist import load_splits, run_training, stage


def main(argv=None):
    args, cfg = parse_stage_args(stage_parser(__doc__), argv)
    out = ablation_dir(args.run_dir, args.seed)
    if stage(out, "train").done():
        print("random-target ablation: train already done, skipping")
        return
    splits = load_splits(args.data_root, cfg)
    targets = random_targets(len(splits["train"][0]), 16, seed=args.seed)
    aux_lambda = cfg["ablation"]["aux_lambda"] if cfg["ablation"]["select"] == "fixed" else None
    run_training(cfg, splits, out, args.seed, aux_lambda=aux_lambda, kind=cfg["ablation"]["kind"], targets=targets,
                 desc=f"seed {args.seed} random targets")


def ablation_dir(run_dir, seed):
    from pathlib import Path

    return Path(run_dir) / f"seed_{seed}" / "random_targets"


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
