"""Stage: train cycle k — the MLP from its seeded initialisation with SAEs on h1/h2 trained alongside;
cycles k >= 1 add λ·aux toward the targets that cycle k-1's sharpen stage wrote."""
import sys

from common.errors import cli_main, require
from common.runs import cycle_dir, parse_stage_args, stage_parser
from common.targets import TargetTable
from mnist import load_splits, run_training, stage


def main(argv=None):
    args, cfg = parse_stage_args(stage_parser(__doc__), argv)
    require(args.cycle <= cfg["cycles"], f"cycle {args.cycle} is beyond the configured {cfg['cycles']} cycles")
    out = cycle_dir(args.run_dir, args.seed, args.cycle)
    if stage(out, "train").done():
        print(f"cycle {args.cycle}: train already done, skipping")
        return
    targets, aux_lambda, kind = None, None, cfg["aux"]["kind"]
    if args.cycle > 0:
        previous = cycle_dir(args.run_dir, args.seed, args.cycle - 1)
        stage(previous, "sharpen").require_done(f"run cycle {args.cycle - 1} (train, then sharpen) before cycle {args.cycle}")
    splits = load_splits(args.data_root, cfg)
    if args.cycle > 0:
        targets = TargetTable(previous / "targets.npy", splits["train"][1], content=splits["train"][0]).all()
        if cfg["aux"]["select"] == "fixed":
            aux_lambda = cfg["aux"]["lambdas"][args.cycle - 1]
    run_training(cfg, splits, out, args.seed, aux_lambda=aux_lambda, kind=kind, targets=targets, desc=f"seed {args.seed} cycle {args.cycle}")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
