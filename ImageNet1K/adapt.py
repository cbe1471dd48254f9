"""Model adaptation: cycle 0 scores the pretrained model, cycle k trains head.norm + head.fc of cycle k-1's model
with CE + λ·aux (on the cached backbone features, extracted here on first use).

Usage: python ImageNet1K/adapt.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N ImageNet1K/adapt.py ...)
"""
from imagenet import ImageNetExperiment

from common.decoupled import adapt_stage, stage_main

if __name__ == "__main__":
    stage_main(adapt_stage, ImageNetExperiment(), description=__doc__.splitlines()[0], distributed=True)
