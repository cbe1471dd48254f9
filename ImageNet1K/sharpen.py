"""ImageNet-1k / ConvNeXt-V2-L, stage sharpen: one target per training example for the next cycle (authors-code §3.5).

Usage: python ImageNet1K/sharpen.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]

The recipe: class means of the SAE codes streamed over the 1.26M training activations; each of the
1000 classes keeps its ``sharpen.top_k`` = 25 features of highest mean code; example i's target is
the SAE's decoding of its own code with only its class's features kept (``sharpen.mode``), written
row by row at its dataset index through a memory map -> ``targets.npy``, ``sharpen.json``.
"""
from imagenet import EXPERIMENT, N_CLASSES, data_of

from common.cycle_stages import write_cycle_targets
from common.decoupled import CycleRun, stage_cli


def sharpen(run: CycleRun) -> None:
    write_cycle_targets(run, data_of(run).labels("train"), N_CLASSES)


if __name__ == "__main__":
    stage_cli({"sharpen": sharpen}, EXPERIMENT, __doc__.splitlines()[0])
