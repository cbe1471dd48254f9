"""Metrics: every column of docs/conventions.md of cycle k on the 50k test set (probe: 1 epoch on a 30% train subset).

Usage: python ImageNet1K/evaluate.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
"""
from imagenet import ImageNetExperiment

from common.decoupled import metrics_stage, stage_main

if __name__ == "__main__":
    stage_main(metrics_stage, ImageNetExperiment(), description=__doc__.splitlines()[0])
