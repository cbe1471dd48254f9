"""ImageNet-1k / ConvNeXt-V2-L, stage metrics: the cycle's numbers on the 50k test images -> metrics.json.

Usage: python ImageNet1K/evaluate.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]

The recipe (authors-code §3.6; the columns: docs/conventions.md): task accuracy (adapt's test
accuracy), a linear probe on the SAE codes (1 epoch on a 30% subset of the training codes,
``metrics.probe``), CSI of the head.flatten activations, U, ARI / silhouettes / DBI / CHI over the
1000 classes and L0 of the SAE codes, Table 5's reconstruction CSI, and the SAE's quality (explained
variance, MSE, dead features, and the accuracy of the head after head.flatten run on the reconstructions).
"""
from imagenet import EXPERIMENT, N_CLASSES, data_of, head_after_hook, load_convnext

from common.adaptation import load_cycle_model
from common.cycle_stages import write_cycle_metrics
from common.decoupled import CycleRun, stage_cli


def evaluate(run: CycleRun) -> None:
    stage = run.begin("metrics")
    if stage is None:
        return
    model = load_cycle_model(run, lambda path: load_convnext(run.cfg, path)).to(run.device).eval()
    write_cycle_metrics(run, stage, data_of(run).labels, N_CLASSES, head=head_after_hook(model))


if __name__ == "__main__":
    stage_cli({"metrics": evaluate}, EXPERIMENT, __doc__.splitlines()[0])
