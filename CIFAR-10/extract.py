"""CIFAR-10 / ViT-H/14, stage extract alone (train_sae.py holds the recipe): hooked CLS activations.

Usage: python CIFAR-10/extract.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N CIFAR-10/extract.py ...)
"""
from cifar import EXPERIMENT
from train_sae import extract

from common.decoupled import stage_cli

if __name__ == "__main__":
    stage_cli({"extract": extract}, EXPERIMENT, __doc__.splitlines()[0])
