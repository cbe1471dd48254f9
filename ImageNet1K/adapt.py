"""ImageNet-1k / ConvNeXt-V2-L, stage adapt: the cycle's model, its head fine-tuned with CE + λ·aux (authors-code §3.3).

Usage: python ImageNet1K/adapt.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N ImageNet1K/adapt.py ...)

The recipe (values from ImageNet1K/config.yaml; the presets differ only where docs/presets.md says):
* model: cycle 0 is timm's ``convnextv2_large.fcmae_ft_in22k_in1k_384`` as published, only scored
  (``baseline.train: false``); cycle k starts from cycle k-1's model.
* data: the official training set less the 25k validation images of a seeded permutation; the
  validation split picks the best epoch; the official 50k validation set is the test set. No
  augmentation: Resize 384 -> CenterCrop 384.
* what trains: ``adapt.trainable`` = ``head.norm`` and ``head.fc`` (the LayerNorm affine and the
  classifier); the backbone is frozen, so with ``backbone.cache`` its pooled features are extracted
  once per run and the head runs on them (the same numbers as the whole model).
* optimiser and schedule: ``adapt.finetune`` (1 epoch of SGD 1e-4, momentum 0.9, weight decay
  0.05, clip 1.0, fp16 autocast; test accuracy in fp32).
* loss: CE + λ·(1 - cos(head.flatten activation, target)) with the targets of cycle k-1's sharpen
  stage, looked up by dataset index; the term has its gradient (``aux.detach: false``).
* λ: ``aux.lambdas`` per cycle, or one fine-tune per value of ``aux.sweep`` and the best by
  ``aux.select_on`` accuracy (common.adaptation.adapt_cycle).
* saved: with pretrained weights only the head (6 MB) plus a fingerprint of the backbone it belongs
  to; with random weights the whole model. ``adapt.json`` holds accuracies, history and settings.
"""
from functools import partial

from imagenet import EXPERIMENT, N_CLASSES, build_convnext, data_of, load_convnext, model_inputs, save_convnext

from common.adaptation import adapt_cycle, fine_tune_and_save, start_model
from common.cycle_stages import hook_of
from common.decoupled import CycleRun, stage_cli


def adapt(run: CycleRun) -> None:
    cfg = run.cfg

    def fine_tune(aux_lambda: float, out_dir) -> dict:
        model = start_model(run, pretrained=lambda: build_convnext(cfg, pretrained=True),
                            saved=lambda path: load_convnext(cfg, path))
        (head, train), (_, val), (_, test) = (model_inputs(run, model, split) for split in ("train", "val", "test"))
        return fine_tune_and_save(run, out_dir, aux_lambda, model=model, module=head, splits=(train, val, test),
                                  hook=hook_of(cfg), n_classes=N_CLASSES, train_labels=data_of(run).labels("train"),
                                  save=partial(save_convnext, cfg))

    adapt_cycle(run, fine_tune)


if __name__ == "__main__":
    stage_cli({"adapt": adapt}, EXPERIMENT, __doc__.splitlines()[0])
