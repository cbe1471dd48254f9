"""Metrics of this cycle on the test set: accuracy, probe, CSI, U, clustering, L0, Table 5 -> metrics.json.

Usage: python CIFAR-10/evaluate.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
"""
from cifar import CIFAR10Experiment

from common.decoupled import metrics_stage, stage_main

if __name__ == "__main__":
    stage_main(metrics_stage, CIFAR10Experiment(), description=__doc__.splitlines()[0])
