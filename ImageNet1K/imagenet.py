"""ImageNet-1k / ConvNeXt-V2-L: the data and the model the stage scripts (adapt.py, train_sae.py,
sharpen.py, evaluate.py) share; what is specific to ImageNet (authors-code §3):

* data: the usual ImageFolder layout ``<data-root>/imagenet/{train,val}/<wnid>/*.JPEG``. The
  official training set is permuted with ``torch.Generator().manual_seed(42)``; the first 25,000
  images of the permutation are the validation split and the other 1,256,167, in permuted order,
  the train split (the authors' ``Dataset.shuffle(seed=42)``, first 25k = val). The official 50k
  validation set is the test set. Resize 384 (short side, bilinear) -> CenterCrop 384 -> the
  model's mean/std; no augmentation anywhere. Items are ``(image, label, index in the split)``.
* model: timm ``convnextv2_large.fcmae_ft_in22k_in1k_384``, pretrained, unchanged for cycle 0.
  ``--model.weights none`` gives random weights (tests), a file path loads local weights.
* hook: ``head.flatten``: global average pool -> LayerNorm2d (``head.norm``) -> flatten, 1536-d.
* backbone cache: when only the head trains (``head.norm``, ``head.fc``), the pooled backbone
  feature that enters ``head.norm`` is the same in every cycle. It is extracted once per run
  (``<run>/backbone/<split>``, one pass of the backbone over the images; per seed with random
  weights) and every adaptation,
  evaluation and extraction then runs ``model.head`` on it (:class:`HeadOnly`), which computes
  exactly what the full model computes from the same pooled features.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from common.activation_cache import ActivationCache, CacheDataset
from common.checkpoint import load_module, load_state, save_module, save_state
from common.config import Config
from common.decoupled import validate_config
from common.datasets import IndexedSubset
from common import schema as S
from common.errors import UserError, require

README = "ImageNet1K/README.md"
EXPERIMENT = "ImageNet1K"
N_CLASSES = 1000
BACKBONE_HOOK = ("head.global_pool", "flatten")  # the pooled feature that enters head.norm


# ----------------------------------------------------------------------------- data
def _image_folder(path: Path, what: str):
    from torchvision.datasets import ImageFolder

    require(path.is_dir(), f"ImageNet {what} folder {path} not found; arrange ImageNet as "
                           f"{path.parent}/{{train,val}}/<wnid>/*.JPEG (see {README}) or pass --data-root")
    try:
        return ImageFolder(str(path))
    except (FileNotFoundError, RuntimeError) as err:  # no class folders / no images in them
        raise UserError(f"ImageNet {what} folder {path} holds no images in <wnid>/ class folders ({err}); "
                        f"see {README}") from None


def split_rows(n: int, val_size: int, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train rows, val rows) of the official training set: the first ``val_size`` of a seeded permutation
    are the validation split, the rest (in permuted order) the train split."""
    require(0 < val_size < n, f"data.val_size must be in 1..{n - 1} for {n} training images, got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[val_size:], perm[:val_size]


def transform(image_size: int, mean, std, interpolation: str = "bilinear"):
    from torchvision import transforms as T

    modes = {"bilinear": T.InterpolationMode.BILINEAR, "bicubic": T.InterpolationMode.BICUBIC}
    require(interpolation in modes, f"data.interpolation must be one of {', '.join(modes)}, got '{interpolation}'")
    return T.Compose([T.Resize(image_size, interpolation=modes[interpolation]), T.CenterCrop(image_size),
                      T.ToTensor(), T.Normalize(mean, std)])


class ImageNetData:
    """The three splits of one data root (folders scanned once per process)."""

    def __init__(self, data_root: str, cfg: Config):
        self.root = Path(data_root) / cfg.data.folder
        self.cfg = cfg
        self._train = self._test = None

    def folder(self, train: bool):
        if train and self._train is None:
            self._train = _image_folder(self.root / "train", "training")
        if not train and self._test is None:
            self._test = _image_folder(self.root / "val", "validation (our test set)")
            require(self._test.classes == self.folder(True).classes,
                    f"{self.root}/val and {self.root}/train have different class folders; see {README}")
        folder = self._train if train else self._test
        n_classes = len(folder.classes)
        if self.cfg.model.weights != "none":
            require(n_classes == N_CLASSES, f"{folder.root} has {n_classes} class folders; the pretrained classifier "
                                            f"needs the {N_CLASSES} ImageNet-1k classes (see {README})")
        require(n_classes <= N_CLASSES, f"{folder.root} has {n_classes} class folders, more than {N_CLASSES}")
        return folder

    def rows(self, split: str) -> torch.Tensor:
        require(split in ("train", "val", "test"), f"unknown split '{split}'")
        if split == "test":
            return torch.arange(len(self.folder(False)))
        d = self.cfg.data
        train, val = split_rows(len(self.folder(True)), int(d.val_size), int(d.split_seed))
        return train if split == "train" else val

    def labels(self, split: str) -> torch.Tensor:
        return torch.as_tensor(self.folder(split != "test").targets, dtype=torch.long)[self.rows(split)]

    def dataset(self, split: str) -> IndexedSubset:
        d, m = self.cfg.data, self.cfg.model
        cfg = pretrained_cfg(m.name)
        tf = transform(int(d.image_size), cfg.mean, cfg.std, d.interpolation)
        return IndexedSubset(self.folder(split != "test"), self.rows(split), tf)


def write_imagefolder(root: str | os.PathLike, n_classes: int = 4, n_train: int = 12, n_val: int = 4,
                      size: int = 40, seed: int = 0) -> Path:
    """A small ImageNet in the real on-disk layout: ``root/{train,val}/<wnid>/*.JPEG`` (RGB JPEGs,
    a class-specific colour and stripe pattern plus noise, so a small model can learn the classes)."""
    import shutil

    from PIL import Image

    require(n_classes >= 2 and n_train >= 1 and n_val >= 1, "need >= 2 classes and >= 1 image per class and split")
    root = Path(root)
    tmp_root = root.with_name(f".{root.name}.tmp")
    shutil.rmtree(tmp_root, ignore_errors=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(n_classes, 3))
    yy, xx = np.mgrid[0:size, 0:size]
    for split, count in (("train", n_train), ("val", n_val)):
        for c in range(n_classes):
            folder = tmp_root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            stripes = np.sin((xx * np.cos(c * 0.9) + yy * np.sin(c * 0.9)) * (0.25 + 0.08 * c))
            for j in range(count):
                image = palette[c] + 50 * stripes[..., None] + rng.normal(0, 45, size=(size, size, 3))
                Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(
                    folder / f"{split}_{c}_{j}.JPEG", format="JPEG", quality=90)
    require(not root.exists(), f"{root} already exists; remove it or write elsewhere")
    os.replace(tmp_root, root)  # the tree appears whole or not at all
    return root


# ----------------------------------------------------------------------------- model
def pretrained_cfg(name: str):
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    require(cfg is not None, f"timm has no model '{name}' (model.name)")
    return cfg


def build_convnext(cfg: Config, pretrained: bool) -> nn.Module:
    """The ConvNeXt-V2 of this run; ``pretrained`` loads ``model.weights`` (``pretrained``: timm's hub
    weights, a path: a local file), otherwise the bare architecture (a checkpoint is loaded next)."""
    import timm

    m = cfg.model
    name, weights = m.name, m.weights
    pretrained_cfg(name)
    if not pretrained or weights == "none":
        return timm.create_model(name, pretrained=False, num_classes=N_CLASSES)
    if weights != "pretrained":
        return _convnext_from_file(name, Path(weights))
    try:
        return timm.create_model(name, pretrained=True, num_classes=N_CLASSES)
    except Exception as err:  # offline: huggingface_hub raises LocalEntryNotFoundError / OSError subclasses
        hub = os.environ.get("HF_HOME", "~/.cache/huggingface")
        raise UserError(f"pretrained weights of {name} are not in the Hugging Face cache ({hub}) and could not be "
                        f"downloaded ({type(err).__name__}); on a machine with internet run `python -c \"import timm; "
                        f"timm.create_model('{name}', pretrained=True)\"` and copy {hub} here, or download "
                        f"model.safetensors from https://huggingface.co/{pretrained_cfg(name).hf_hub_id} "
                        f"and pass --model.weights /path/to/model.safetensors") from None


def _convnext_from_file(name: str, path: Path) -> nn.Module:
    """timm's model with the weights of a local file, read once (``common.weights_file``: one error line
    for anything that is not a state dict), unwrapped and cleaned as timm does its own files (EMA
    weights first, then ``state_dict`` / ``model``; ``module.`` prefixes dropped), then passed to timm,
    which adapts and loads them strictly: a mismatch names the keys."""
    import timm
    from timm.models import clean_state_dict

    from common.weights_file import mismatch, read_state_dict

    state = clean_state_dict(read_state_dict(path, unwrap=("state_dict_ema", "model_ema", "state_dict", "model")))
    try:
        return timm.create_model(name, pretrained=True, num_classes=N_CLASSES,
                                 pretrained_cfg_overlay={"state_dict": state})
    except (RuntimeError, ValueError, KeyError) as err:
        raise UserError(f"model.weights {path} are not {name} weights ({mismatch(err)})") from None


class HeadOnly(nn.Module):
    """``model.head`` applied to pooled backbone features (B, C): what the full model computes after
    its backbone. Shares the head's parameters with ``model``, so training it trains the model."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.head = model.head

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.head(pooled[:, :, None, None])  # a 1x1 map: the head's average pool is the identity


def trainable_is_head_only(prefixes) -> bool:
    return all(p == "head" or p.startswith("head.") for p in prefixes)


def backbone_fingerprint(model: nn.Module) -> str:
    """A cheap identity of the backbone weights (shapes + the first values of every non-head tensor)."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        if name.startswith("head."):
            continue
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:256].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------- the run's config, data and model
#: the ImageNet keys of config.yaml with their types and ranges (the shared ones: common.decoupled.SCHEMA)
SCHEMA = {
    "data": {"folder": S.text(), "val_size": S.integer(ge=1), "split_seed": S.integer(ge=0),
             "image_size": S.integer(ge=1), "interpolation": S.choice("bilinear", "bicubic")},
    "model": {"name": S.text(), "weights": S.text()},   # pretrained, none, or a weights file (checked on load)
    "backbone": {"cache": S.boolean(), "dtype": S.choice("float16", "float32"), "amp": S.choice("none", "bf16", "fp16"),
                 "batch_size": S.integer(ge=1)},
}


def check_config(cfg: Config) -> None:
    """The ImageNet keys (:data:`SCHEMA`) over the shared ones of :func:`common.decoupled.validate_config`."""
    validate_config(cfg, SCHEMA)
    m, b = cfg.model, cfg.backbone
    pretrained_cfg(m.name)
    for section in ("baseline", "adapt"):
        require(not cfg[section]["augment"], f"{section}.augment must be false: ImageNet uses no augmentation")
    require(cfg.activations.train_view == "clean",
            "activations.train_view must be clean: ImageNet uses no augmentation (authors-code §3.1)")
    require(not cfg.activations.sae_on_the_fly,
            "activations.sae_on_the_fly recomputes augmented activations; ImageNet uses no augmentation (set it false)")
    require(cfg.hook.module.startswith("head.") or not b.cache,
            "backbone.cache needs a hook inside the head (e.g. head.flatten)")
    if b.cache:
        for section in ("baseline", "adapt"):
            require(trainable_is_head_only(cfg[section]["trainable"]),
                    f"backbone.cache is only valid when only the head trains, but {section}.trainable is "
                    f"{cfg[section]['trainable']}; set --backbone.cache false to run the backbone every time")


_DATA: dict[str, ImageNetData] = {}


def data_of(run) -> ImageNetData:
    """The run's ImageNet splits, folders scanned once per process (cycle.py runs every stage in one)."""
    if run.data_root not in _DATA:
        _DATA[run.data_root] = ImageNetData(run.data_root, run.cfg)
    return _DATA[run.data_root]


def head_after_hook(model: nn.Module):
    """hooked ``head.flatten`` -> logits: timm's NormMlpClassifierHead after flatten (pre_logits -> drop -> fc)."""
    head = model.head
    return lambda h: head.fc(head.drop(head.pre_logits(h)))


# ----------------------------------------------------------------------------- checkpoints: only what adaptation changes
def _trainable_prefixes(cfg: Config) -> list[str]:
    return sorted(set(cfg.baseline.trainable) | set(cfg.adapt.trainable))


def save_convnext(cfg: Config, path: Path, model: nn.Module, meta: dict) -> None:
    """With pretrained (or file) weights, keep only the parameters adaptation may change (head.norm
    and head.fc: 6 MB instead of 800 MB) plus a fingerprint of the rest; random weights are saved whole."""
    if cfg.model.weights == "none":
        save_module(path, model, meta)
        return
    prefixes = _trainable_prefixes(cfg)
    state = {k: v for k, v in model.state_dict().items()
             if any(p == "" or k == p or k.startswith(p + ".") for p in prefixes)}
    save_state(path, state, {**meta, "partial": True, "trainable": prefixes,
                             "base_weights": cfg.model.weights, "backbone": backbone_fingerprint(model)})


def load_convnext(cfg: Config, path: Path) -> nn.Module:
    """What :func:`save_convnext` wrote, as a whole model on the CPU."""
    state, meta = load_state(path)
    if not meta.get("partial"):
        model = build_convnext(cfg, pretrained=False)
        load_module(path, model)
        return model
    model = build_convnext(cfg, pretrained=True)  # the base the saved parameters belong to
    require(meta.get("backbone") == backbone_fingerprint(model),
            f"{path} holds the adapted head of a model with other base weights than model.weights "
            f"'{cfg['model']['weights']}'; use the weights the run started with")
    own = model.state_dict()
    wrong = sorted(k for k in state if k not in own or own[k].shape != state[k].shape)
    require(not wrong, f"checkpoint {path} does not match {cfg['model']['name']} ({', '.join(wrong[:3])})")
    model.load_state_dict(state, strict=False)
    return model


# ----------------------------------------------------------------------------- the backbone cache
def backbone_dir(run) -> Path:
    """Pretrained weights are the same for every seed: one backbone cache per run; random weights
    (``model.weights none``) differ per seed: one per seed."""
    if run.cfg.model.weights == "none":
        return run.run_dir / f"seed_{run.seed}" / "backbone"
    return run.run_dir / "backbone"


def backbone_cache(run, model: nn.Module, split: str) -> ActivationCache:
    """Pooled backbone features of a split, extracted on first use from ``model``'s (frozen) backbone."""
    from common.extraction import extract
    from common.finetune import amp_dtype

    cfg, b, data = run.cfg, run.cfg.backbone, data_of(run)
    directory = backbone_dir(run) / split
    fingerprint = backbone_fingerprint(model)
    if not (directory / "manifest.json").is_file():
        extract(model, data.dataset(split), *BACKBONE_HOOK, directory,
                device=run.device, autocast_dtype=amp_dtype(run.device, b.amp), batch_size=int(b.batch_size),
                num_workers=int(cfg.data.num_workers), chunk_rows=int(cfg.activations.chunk_rows),
                dtype=b.dtype, desc=f"backbone {split}", backbone=fingerprint)
    cache = ActivationCache(directory)
    cache.require_dataset(data.labels(split), f"the {split} split of {run.data_root}")
    require(cache.meta.get("backbone") == fingerprint,
            f"backbone cache {directory} was extracted from other backbone weights than this model's; "
            f"delete {directory.parent} to extract it again")
    return cache


def model_inputs(run, model: nn.Module, split: str) -> tuple[nn.Module, Dataset]:
    """What to run on which data for ``split``: with ``backbone.cache``, ``model.head`` on the cached
    pooled features (:class:`HeadOnly`, the same numbers as the whole model); else the model on images."""
    if run.cfg.backbone.cache:
        return HeadOnly(model), CacheDataset(backbone_cache(run, model, split))
    return model, data_of(run).dataset(split)
