"""Train this cycle's SAE (5120 features, L1 2e-4) and keep the epoch with the best validation loss.

Usage: python CIFAR-10/train_sae.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
"""
from cifar import CIFAR10Experiment

from common.decoupled import sae_stage, stage_main

if __name__ == "__main__":
    stage_main(sae_stage, CIFAR10Experiment(), description=__doc__.splitlines()[0])
