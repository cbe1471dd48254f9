"""CIFAR-10 / ViT-H/14, stage sharpen: one target per training example for the next cycle (authors-code §2.6).

Usage: python CIFAR-10/sharpen.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]

The recipe: this cycle's SAE encodes the train activations; each class keeps the ``sharpen.top_k``
= 25 features of highest mean code over its training examples; example i's target is the SAE's
decoding of its own code with only its class's features kept (``sharpen.mode: top``; ``mask``
removes them instead, ``per_example`` keeps each example's own top-k, ``random`` draws unit
vectors) -> ``targets.npy`` (row i = train example i), ``sharpen.json``.
"""
from cifar import EXPERIMENT, N_CLASSES, data_of

from common.cycle_stages import write_cycle_targets
from common.decoupled import CycleRun, stage_cli


def sharpen(run: CycleRun) -> None:
    write_cycle_targets(run, data_of(run).labels("train"), N_CLASSES)


if __name__ == "__main__":
    stage_cli({"sharpen": sharpen}, EXPERIMENT, __doc__.splitlines()[0])
