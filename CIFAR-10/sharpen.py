"""Feature sharpening: per-class top-25 SAE features over the train split -> targets for the next cycle.

Usage: python CIFAR-10/sharpen.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
"""
from cifar import CIFAR10Experiment

from common.decoupled import sharpen_stage, stage_main

if __name__ == "__main__":
    stage_main(sharpen_stage, CIFAR10Experiment(), description=__doc__.splitlines()[0])
