"""Hooked CLS activations of the train / val / test splits into this cycle's on-disk caches.

Usage: python CIFAR-10/extract.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N CIFAR-10/extract.py ...)
"""
from cifar import CIFAR10Experiment

from common.decoupled import extract_stage, stage_main

if __name__ == "__main__":
    stage_main(extract_stage, CIFAR10Experiment(), description=__doc__.splitlines()[0], distributed=True)
