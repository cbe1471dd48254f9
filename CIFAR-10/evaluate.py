"""CIFAR-10 / ViT-H/14, stage metrics: the cycle's numbers on the 10k test images -> metrics.json.

Usage: python CIFAR-10/evaluate.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]

The recipe (authors-code §2.7; the columns: docs/conventions.md): task accuracy (adapt's test
accuracy), a linear probe on the SAE codes (Adam, ``metrics.probe``), CSI of the CLS activations,
U, ARI / silhouettes / DBI / CHI and L0 of the SAE codes, Table 5's reconstruction CSI, and the SAE's
quality on the test activations (explained variance, MSE, dead features, and the accuracy of the
model's head run on the SAE's reconstructions of the CLS token).
"""
from cifar import EXPERIMENT, N_CLASSES, data_of, load_vit

from common.adaptation import load_cycle_model
from common.cycle_stages import write_cycle_metrics
from common.decoupled import CycleRun, stage_cli


def evaluate(run: CycleRun) -> None:
    stage = run.begin("metrics")
    if stage is None:
        return
    model = load_cycle_model(run, lambda path: load_vit(run.cfg, path)).to(run.device).eval()
    # the classifier reads the encoder's CLS token, the hooked activation
    write_cycle_metrics(run, stage, data_of(run).labels, N_CLASSES, head=model.heads)


if __name__ == "__main__":
    stage_cli({"metrics": evaluate}, EXPERIMENT, __doc__.splitlines()[0])
