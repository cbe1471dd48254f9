"""Extraction: head.flatten activations of the train / val / test splits of cycle k's model into on-disk caches.

Usage: python ImageNet1K/extract.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N ImageNet1K/extract.py ...)
"""
from imagenet import ImageNetExperiment

from common.decoupled import extract_stage, stage_main

if __name__ == "__main__":
    stage_main(extract_stage, ImageNetExperiment(), description=__doc__.splitlines()[0], distributed=True)
