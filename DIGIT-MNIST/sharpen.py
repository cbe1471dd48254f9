"""Stage: sharpen cycle k — per-class top-k features of cycle k's h1 SAE over the 50k training codes,
and one target per training example (stored by dataset index) for cycle k+1."""
import sys

import torch

from common.concurrent_training import loader_permutations
from common.errors import cli_main, require
from common.io import write_json
from common.runs import cycle_dir, parse_stage_args, stage_parser
from common.sharpening import class_means, sharpened_targets, top_features
from common.targets import save_targets
from mnist import load_checkpoint, load_splits, stage


def main(argv=None):
    args, cfg = parse_stage_args(stage_parser(__doc__), argv)
    require(args.cycle < cfg["cycles"], f"cycle {args.cycle} is the last one; its targets would not be used")
    out = cycle_dir(args.run_dir, args.seed, args.cycle)
    sharpen = stage(out, "sharpen")
    if sharpen.done():
        print(f"cycle {args.cycle}: sharpen already done, skipping")
        return
    model, saes = load_checkpoint(out, cfg, args.seed)
    sae = saes[cfg["aux"]["layer"]]
    x, y = load_splits(args.data_root, cfg)["train"]
    with torch.no_grad():
        codes = sae.encode(model(x)[cfg["aux"]["layer"]])
    top = top_features(class_means(codes, y, 10), cfg["sharpen"]["top_k"])
    if cfg["sharpen"]["pairing"] == "shuffled":
        # The authors' bug (authors-code §1.5.6): codes gathered in the 2nd pass of a seeded shuffled loader were
        # paired with the dataset-ordered labels, so row i decodes mask(y_i) * z[pi(i)].
        codes = codes[loader_permutations(len(x), args.seed, 2)[1]]
    targets = sharpened_targets(sae, codes, y, top, cfg["sharpen"]["mode"])
    save_targets(out / "targets.npy", targets, y, content=x, cycle=args.cycle, pairing=cfg["sharpen"]["pairing"],
                 mode=cfg["sharpen"]["mode"], top_k=cfg["sharpen"]["top_k"])
    write_json(out / "top_features.json", {"top_k": cfg["sharpen"]["top_k"], "per_class": top.tolist()})
    sharpen.finish([out / "targets.npy", out / "targets.json", out / "top_features.json"])
    print(f"cycle {args.cycle}: {len(targets)} targets written ({cfg['sharpen']['pairing']} pairing)")


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
