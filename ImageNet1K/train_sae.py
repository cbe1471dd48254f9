"""ImageNet-1k / ConvNeXt-V2-L, stages extract and sae: the frozen model's head.flatten activations, then the SAE.

Usage: python ImageNet1K/train_sae.py --run-dir DIR --seed 42 --cycle K [--stages extract,sae] [--device auto]
                                      [--data-root DIR]
       (torchrun --nproc-per-node N ImageNet1K/train_sae.py ... --stages extract: the extraction under DDP)

The recipe (authors-code §3.4-3.5):
* extract: this cycle's adapted model, frozen, over the train, validation and test splits (clean
  images; with ``backbone.cache`` its head on the cached pooled features); the ``head.flatten``
  output (global pool -> LayerNorm2d -> flatten, 1536-d) of every image, stored by dataset index
  under ``activations/<split>/`` (fp16 under ``activations.amp``).
* sae: a ReLU SAE of ``sae.d_sae`` = 6144 features (L1 ``sae.l1_coeff`` per cycle, Adam ``sae.lr``)
  streamed from the 1.26M-row train cache; the epoch with the lowest validation loss is kept
  -> ``sae.safetensors``, ``sae_train.json``.
"""
from imagenet import EXPERIMENT, data_of, load_convnext, model_inputs

from common.adaptation import load_cycle_model
from common.cycle_stages import extract_caches, train_cycle_sae
from common.decoupled import CycleRun, stage_cli


def extract(run: CycleRun) -> None:
    stage = run.begin("extract")
    if stage is None:
        return
    model = load_cycle_model(run, lambda path: load_convnext(run.cfg, path))
    extract_caches(run, stage, lambda split, augmented: model_inputs(run, model, split), data_of(run).labels)


def train_sae(run: CycleRun) -> None:
    stage = run.begin("sae")
    if stage is None:
        return
    labels = data_of(run).labels
    train_cycle_sae(run, stage, run.open_cache("train", labels("train")), run.open_cache("val", labels("val")))


if __name__ == "__main__":
    stage_cli({"extract": extract, "sae": train_sae}, EXPERIMENT, __doc__.splitlines()[0])
