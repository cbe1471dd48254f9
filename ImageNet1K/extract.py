"""ImageNet-1k / ConvNeXt-V2-L, stage extract alone (train_sae.py holds the recipe): head.flatten activations.

Usage: python ImageNet1K/extract.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N ImageNet1K/extract.py ...)
"""
from imagenet import EXPERIMENT
from train_sae import extract

from common.decoupled import stage_cli

if __name__ == "__main__":
    stage_cli({"extract": extract}, EXPERIMENT, __doc__.splitlines()[0])
