"""CIFAR-10 / ViT-H/14, stage adapt: the cycle's model, fine-tuned with CE + λ·aux (authors-code §2.3-2.4).

Usage: python CIFAR-10/adapt.py --run-dir DIR --seed 42 --cycle K [--device auto] [--data-root DIR]
       (or: torchrun --nproc-per-node N CIFAR-10/adapt.py ...)

The recipe (values from CIFAR-10/config.yaml; the presets differ only where docs/presets.md says):
* model: cycle 0 starts from torchvision's ViT-H/14 with the SWAG E2E weights, run at 384 px (the
  position embedding resized 37x37 -> 27x27) and a new 10-class head drawn from the seed; cycle k
  starts from cycle k-1's model.
* data: the 45k train split, TrivialAugmentWide when ``<section>.augment``; the 5k validation split
  picks the best epoch; the 10k test split is scored once, with that epoch's weights.
* what trains: ``baseline.trainable`` (cycle 0: every parameter) or ``adapt.trainable`` (cycles
  k >= 1: the encoder; patch embedding, class token and head stay frozen).
* optimiser and schedule: ``<section>.finetune`` (cycle 0: SGD 0.01, 8-step accumulation, cosine
  over 10,000 steps, mixup, label smoothing, fp16 autocast; cycles: 3 epochs of SGD 1e-4).
* loss: CE + λ·(1 - cos(CLS token, target)) with the targets cycle k-1's sharpen stage wrote,
  looked up by dataset index. ``aux.detach: true`` (faithful, the authors' code) detaches the CLS
  token first: the term is computed and logged but moves no weight.
* λ: ``aux.lambdas`` per cycle, or one fine-tune per value of ``aux.sweep`` and the best by
  ``aux.select_on`` accuracy (common.adaptation.adapt_cycle).
* saved: ``model.safetensors`` (every weight) and ``adapt.json`` (accuracies, history, settings).
"""
from cifar import EXPERIMENT, N_CLASSES, build_vit, data_of, load_vit

from common.adaptation import adapt_cycle, fine_tune_and_save, section_of, start_model
from common.checkpoint import save_module
from common.cycle_stages import hook_of
from common.decoupled import CycleRun, stage_cli


def adapt(run: CycleRun) -> None:
    cfg, data = run.cfg, data_of(run)

    def fine_tune(aux_lambda: float, out_dir) -> dict:
        model = start_model(run, pretrained=lambda: build_vit(cfg, N_CLASSES, pretrained=True),
                            saved=lambda path: load_vit(cfg, path))
        augment = bool(section_of(run).augment)
        splits = (data.dataset("train", augment), data.dataset("val", False), data.dataset("test", False))
        # the whole model trains on images; the auxiliary term acts on the encoder output's CLS token
        return fine_tune_and_save(run, out_dir, aux_lambda, model=model, module=model, splits=splits,
                                  hook=hook_of(cfg), n_classes=N_CLASSES, train_labels=data.labels("train"),
                                  save=save_module)

    adapt_cycle(run, fine_tune)


if __name__ == "__main__":
    stage_cli({"adapt": adapt}, EXPERIMENT, __doc__.splitlines()[0])
