"""SAE training: the cycle's 1536 -> 6144 SAE, streamed from the train activation cache, best validation loss.

Usage: python ImageNet1K/train_sae.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
"""
from imagenet import ImageNetExperiment

from common.decoupled import sae_stage, stage_main

if __name__ == "__main__":
    stage_main(sae_stage, ImageNetExperiment(), description=__doc__.splitlines()[0])
