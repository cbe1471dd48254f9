"""Every stage of one cycle in one process: adapt, extract, train SAE, sharpen, evaluate (run.sh uses it).

Usage: python ImageNet1K/cycle.py --run-dir DIR --seed 42 --cycle K [--stages sae,sharpen,metrics] [--device auto]
                                  [--data-root DIR]
       torchrun --nproc-per-node N ImageNet1K/cycle.py ... --stages adapt,extract   (the DDP-capable stages)
The per-stage scripts (adapt.py, extract.py, train_sae.py, sharpen.py, evaluate.py) run the same code one
stage at a time.
"""
from imagenet import ImageNetExperiment

from common.decoupled import add_stages_argument, cycle_stage, stage_main

if __name__ == "__main__":
    stage_main(cycle_stage, ImageNetExperiment(), description=__doc__.splitlines()[0],
               add_arguments=add_stages_argument, distributed=True)
