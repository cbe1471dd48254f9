"""Model adaptation: cycle 0 fine-tunes the baseline, cycle k the previous cycle's encoder with CE + λ·aux.

Usage: python CIFAR-10/adapt.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N CIFAR-10/adapt.py ...)
"""
from cifar import CIFAR10Experiment

from common.decoupled import adapt_stage, stage_main

if __name__ == "__main__":
    stage_main(adapt_stage, CIFAR10Experiment(), description=__doc__.splitlines()[0], distributed=True)
