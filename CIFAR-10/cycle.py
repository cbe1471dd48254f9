"""CIFAR-10 / ViT-H/14: every stage of one cycle in one process (run.sh uses it), in pipeline order.

Usage: python CIFAR-10/cycle.py --run-dir DIR --seed 42 --cycle K [--stages sae,sharpen,metrics] [--device auto]
                                [--data-root DIR]
       torchrun --nproc-per-node N CIFAR-10/cycle.py ... --stages adapt,extract   (the DDP-capable stages)
The recipes are adapt.py, train_sae.py (extract, sae), sharpen.py and evaluate.py; each runs alone too.
"""
from adapt import adapt
from cifar import EXPERIMENT
from evaluate import evaluate
from sharpen import sharpen
from train_sae import extract, train_sae

from common.decoupled import stage_cli

if __name__ == "__main__":
    stage_cli({"adapt": adapt, "extract": extract, "sae": train_sae, "sharpen": sharpen, "metrics": evaluate},
              EXPERIMENT, __doc__.splitlines()[0])
