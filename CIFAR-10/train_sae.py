"""CIFAR-10 / ViT-H/14, stages extract and sae: the frozen model's CLS activations, then the cycle's SAE.

Usage: python CIFAR-10/train_sae.py --run-dir DIR --seed 42 --cycle K [--stages extract,sae] [--device auto]
                                    [--data-root DIR]
       (torchrun --nproc-per-node N CIFAR-10/train_sae.py ... --stages extract: the extraction under DDP)

The recipe (authors-code §2.5):
* extract: this cycle's adapted ViT, frozen, runs over the train split (the augmented view, as the
  authors, or the clean one: ``activations.train_view``), the validation and the test split; a
  forward hook on ``model.encoder`` keeps token 0 (1280-d) of every image, stored by dataset index
  under ``activations/<split>/`` (fp16 under ``activations.amp``; the validation split and the
  probe's splits at the precision the authors ran them: ``activations.sae_amp``, ``metrics.probe.*_amp``).
* sae: a ReLU SAE of ``sae.d_sae`` = 5120 features (L1 ``sae.l1_coeff`` per cycle, Adam
  ``sae.lr``) on the train activations (the cache, or, with ``activations.sae_on_the_fly`` as the
  authors, activations recomputed from freshly augmented images every epoch); the epoch with the
  lowest validation loss is kept -> ``sae.safetensors``, ``sae_train.json``.
"""
from cifar import EXPERIMENT, data_of, load_vit

from common.activations import ModelActivationSource
from common.adaptation import load_cycle_model
from common.cycle_stages import extract_caches, hook_of, sae_data_amp, train_cycle_sae
from common.decoupled import CycleRun, stage_cli
from common.finetune import amp_dtype


def extract(run: CycleRun) -> None:
    stage = run.begin("extract")
    if stage is None:
        return
    data = data_of(run)
    model = load_cycle_model(run, lambda path: load_vit(run.cfg, path))
    extract_caches(run, stage, lambda split, augmented: (model, data.dataset(split, augmented)), data.labels)


def train_sae(run: CycleRun) -> None:
    stage = run.begin("sae")
    if stage is None:
        return
    cfg, data = run.cfg, data_of(run)
    val = run.open_cache("val", data.labels("val"))
    if cfg.activations.sae_on_the_fly:
        model = load_cycle_model(run, lambda path: load_vit(cfg, path))
        train = ModelActivationSource(model, data.dataset("train", augment=True), hook_of(cfg), dim=val.dim,
                                      labels=data.labels("train"), device=run.device,
                                      autocast=amp_dtype(run.device, sae_data_amp(cfg)),
                                      num_workers=int(cfg.data.num_workers))
    else:
        train = run.open_cache("train", data.labels("train"))
    train_cycle_sae(run, stage, train, val)


if __name__ == "__main__":
    stage_cli({"extract": extract, "sae": train_sae}, EXPERIMENT, __doc__.splitlines()[0])
