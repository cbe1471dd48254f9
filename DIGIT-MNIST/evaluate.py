"""Stage: metrics of a cycle (or of the random-target ablation) on the 10k test set — every
column of docs/conventions.md: accuracy, sklearn probe on the 50k training codes, CSI of dense h1, U of the
SAE codes, clustering, L0 and the Table 5 reconstruction CSIs (per-class top-k chosen on the test
codes as the authors did, or on the 50k training codes: metrics.recon_top_k_from)."""
import sys

import torch

from common import metrics
from common.concurrent_training import accuracy
from common.config import Config
from common.errors import cli_main, require
from common.probes import sklearn_probe
from common.results import write_metrics
from common.runs import cycle_dir, parse_stage_args, stage_parser
from common.sae_quality import sae_quality, write_feature_density
from common.sharpening import class_means, top_features
from mnist import ablation_dir, load_checkpoint, load_splits, stage


def main(argv=None):
    parser = stage_parser(__doc__)
    parser.add_argument("--ablation", action="store_true", help="evaluate the random-target ablation run")
    parser.add_argument("--probe-workers", type=int, default=1,
                        help="threads of the fast probe (the same numbers; run.sh gives 2 to a stage that runs alone)")
    args, cfg = parse_stage_args(parser, argv)
    require(args.probe_workers >= 1, f"--probe-workers must be a positive integer, got {args.probe_workers}")
    out = ablation_dir(args.run_dir, args.seed) if args.ablation else cycle_dir(args.run_dir, args.seed, args.cycle)
    metrics_stage = stage(out, "metrics")
    if metrics_stage.done():
        print(f"{out}: metrics already done, skipping")
        return
    probe = probe_with(cfg.metrics, args.probe_workers)
    model, saes = load_checkpoint(out, cfg, args.seed)
    splits = load_splits(args.data_root, cfg)
    (x_tr, y_tr), (x_te, y_te) = splits["train"], splits["test"]
    layer = cfg.aux.layer
    with torch.no_grad():
        hidden_tr, hidden_te = model(x_tr)[1:], model(x_te)[1:]
        codes_tr = {k: s.encode(hidden_tr[k - 1]) for k, s in saes.items()}
        codes_te = {k: s.encode(hidden_te[k - 1]) for k, s in saes.items()}
    codes = codes_te[layer]
    recon_top = table5_top_features(cfg.metrics, codes_tr[layer], y_tr)
    results = {
        "acc": accuracy(model, x_te, y_te),
        "probe": probe(codes_tr[layer], y_tr, codes, y_te),
        "csi": metrics.csi(hidden_te[layer - 1], y_te),
        "u": metrics.uncertainty_coefficient(codes, y_te, faithful=True),
        "u_corrected": metrics.uncertainty_coefficient(codes, y_te, faithful=False),
        **metrics.clustering_metrics(codes, y_te),
        "l0": metrics.l0(codes, cfg.metrics.l0_threshold),
        **metrics.reconstruction_csi(saes[layer], codes, y_te, cfg.metrics.recon_top_k, top=recon_top),
    }
    for k in cfg.metrics.extra_probe_layers:  # e.g. [2]: the authors' "S2" probe on h2's SAE
        results[f"probe_h{k}"] = probe(codes_tr[k], y_tr, codes_te[k], y_te)
    # SAE quality of the hooked layer's SAE; the rest of the MLP after h1 is fc2 -> relu -> fc3
    rest_of_model = {1: lambda h: model.fc3(torch.relu(model.fc2(h))), 2: model.fc3}[layer]
    quality = sae_quality(saes[layer], hidden_te[layer - 1], head=rest_of_model, labels=y_te, return_density=True)
    write_feature_density(out, quality.pop("feature_density"), len(y_te))
    results.update(quality)
    experiment = "DIGIT-MNIST-random-targets" if args.ablation else cfg.experiment
    cycle = 1 if args.ablation else args.cycle
    write_metrics(out / "metrics.json", experiment=experiment, seed=args.seed, cycle=cycle, metrics=results,
                  preset=cfg.preset)
    metrics_stage.finish([out / "metrics.json", out / "feature_density.json"])
    print(f"{experiment} seed {args.seed} cycle {cycle}: " + ", ".join(f"{k}={v:.4g}" for k, v in results.items()))


def table5_top_features(metrics_cfg: Config, train_codes: torch.Tensor, train_labels: torch.Tensor) -> torch.Tensor | None:
    """Table 5's per-class top-k: from the training codes (``recon_top_k_from: train``, a (10, k)
    table), or None for ``test``, where reconstruction_csi picks them on the test codes it scores,
    as the authors did."""
    if metrics_cfg.recon_top_k_from == "test":
        return None
    return top_features(class_means(train_codes, train_labels, 10), metrics_cfg.recon_top_k)


def probe_with(metrics_cfg: Config, workers: int = 1):
    """The faithful probe, ``sklearn_probe(train_x, train_y, test_x, test_y)``, with the configured
    iterations and backend (``metrics.probe_backend``)."""
    return lambda *data: sklearn_probe(*data, max_iter=metrics_cfg.probe_max_iter,
                                       backend=metrics_cfg.probe_backend, workers=workers)


if __name__ == "__main__":
    cli_main(main, sys.argv[1:])
