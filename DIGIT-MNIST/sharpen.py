"""Stage: sharpen cycle k — cycle k's h1 SAE turns every training example into a target for cycle
k+1: per-class top-k features of the 50k training codes, then one decoded target per example,
stored by dataset index (common.targets.write_targets)."""
import sys

import torch

from common.activations import ArraySource
from common.concurrent_training import loader_permutations
from common.errors import cli_main, require
from common.io import write_json
from common.runs import cycle_dir, parse_stage_args, stage_parser
from common.sharpening import class_means, top_features
from common.targets import write_targets
from mnist import HIDDEN, load_checkpoint, load_splits, stage


def main(argv=None):
    args, cfg = parse_stage_args(stage_parser(__doc__), argv)
    require(args.cycle < cfg.cycles, f"cycle {args.cycle} is the last one; its targets would not be used")
    out = cycle_dir(args.run_dir, args.seed, args.cycle)
    sharpen = stage(out, "sharpen")
    if sharpen.done():
        print(f"cycle {args.cycle}: sharpen already done, skipping")
        return
    sh, layer = cfg.sharpen, cfg.aux.layer
    # The hooked layer's activations (h1) of the 50k training examples, and their SAE codes
    model, saes = load_checkpoint(out, cfg, args.seed)
    sae = saes[layer]
    x, y = load_splits(args.data_root, cfg)["train"]
    with torch.no_grad():
        hidden = model(x)[layer]
        codes = sae.encode(hidden)
    # Each class's k features with the highest mean code (used by sharpen.mode top and mask)
    top = top_features(class_means(codes, y, 10), sh.top_k)
    # Which activations row i's target is decoded from. aligned: example i's own. shuffled: the authors' bug
    # (authors-code §1.5.6): codes gathered in the 2nd pass of a seeded shuffled loader were paired with the
    # dataset-ordered labels, so row i decodes mask(y_i) * z[pi(i)] — a source whose row i holds example pi(i).
    if sh.pairing == "shuffled":
        hidden = hidden[loader_permutations(len(x), args.seed, 2)[1]]
    source = ArraySource(hidden, y)
    # target_i = decode(sharpen(encode(row i))), decoder bias included, row i written at dataset index i.
    # One batch of all 50k rows: the numbers are those of decoding the whole table at once.
    write_targets(out / "targets.npy", source.iter_batches(len(source)), y, HIDDEN, sh.mode, sae=sae, top_idx=top,
                  k=sh.top_k, total=1, content=x, cycle=args.cycle, pairing=sh.pairing, mode=sh.mode,
                  top_k=sh.top_k)
    write_json(out / "top_features.json", {"top_k": sh.top_k, "per_class": top.tolist()})
    sharpen.finish([out / "targets.npy", out / "targets.json", out / "top_features.json"])
    print(f"cycle {args.cycle}: {len(source)} targets written ({sh['pairing']} pairing, {sh['mode']})")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
