"""Feature sharpening: per-class top-25 SAE features (streamed class means) and the targets of the next cycle,
written row by row by train-split index.

Usage: python ImageNet1K/sharpen.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
"""
from imagenet import ImageNetExperiment

from common.decoupled import sharpen_stage, stage_main

if __name__ == "__main__":
    stage_main(sharpen_stage, ImageNetExperiment(), description=__doc__.splitlines()[0])
