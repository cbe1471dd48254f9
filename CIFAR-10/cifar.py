"""CIFAR-10 / ViT-H/14: the data and the model the stage scripts (adapt.py, train_sae.py, sharpen.py,
evaluate.py) share; what is specific to CIFAR-10 (authors-code §2):

* data: torchvision ``CIFAR10`` from ``--data-root``; the official 50k train set split 45k/5k by
  ``randperm`` from ``torch.Generator().manual_seed(42)``; the official 10k test set.
  Resize to 384x384 -> (TrivialAugmentWide, training only) -> ToTensor -> ImageNet normalisation.
  Every split yields ``(image, label, index)`` with ``index`` the example's position in its split.
* model: torchvision ``vit_h_14`` with the SWAG E2E weights, run at 384 px: the 37x37 patch
  position embedding is resized bilinearly to 27x27 (align_corners=False) and the class-token
  embedding re-attached; a new ``Linear(1280, 10)`` head. ``--model.weights none`` gives random
  weights; ``--model.arch custom`` builds a small ``VisionTransformer`` (same class, same hook).
* hook: a forward hook on ``model.encoder`` (its output is the final LayerNorm's), token 0.
"""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.checkpoint import load_module
from common.config import Config
from common.decoupled import validate_config
from common.datasets import IndexedSubset
from common import schema as S
from common.errors import UserError, require

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_FILES = ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
               "batches.meta")
EXPERIMENT = "CIFAR-10"
N_CLASSES = 10
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


# ----------------------------------------------------------------------------- data
def _torchvision_cifar10(root: str, train: bool, verify_md5: bool):
    """torchvision's CIFAR10; with ``verify_md5`` false the files are read without the md5 check
    (generated test data in the real format cannot match the official checksums)."""
    from torchvision.datasets import CIFAR10

    folder = Path(root) / CIFAR10.base_folder
    if not verify_md5:
        class CIFAR10Unverified(CIFAR10):
            train_list = [[name, None] for name, _ in CIFAR10.train_list]
            test_list = [[name, None] for name, _ in CIFAR10.test_list]
            meta = {**CIFAR10.meta, "md5": None}

        missing = [f for f in CIFAR_FILES if not (folder / f).is_file()]
        require(not missing, f"CIFAR-10 files {', '.join(missing)} not found in {folder}; download {CIFAR_URL} "
                             f"and extract it into {root} (or run with --data.verify_md5 true to download)")
        try:
            return CIFAR10Unverified(root, train=train, download=False)
        except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
            raise UserError(f"CIFAR-10 files in {folder} are not valid python pickles ({type(err).__name__})") from None
    try:
        return CIFAR10(root, train=train, download=True)
    except Exception as err:  # offline: URLError/OSError/RuntimeError, depending on where it stops
        raise UserError(f"CIFAR-10 not found in {folder} and it could not be downloaded ({type(err).__name__}); "
                        f"download {CIFAR_URL} and extract it into {root} (for data that is not the official "
                        f"archive, pass --data.verify_md5 false)") from None


def split_rows(n: int, val_fraction: float, split_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of the official train set that form our train and validation splits.

    ``randperm(n)`` from ``Generator().manual_seed(split_seed)``, the first ``n - round(n * f)``
    rows for training: 45,000 / 5,000 for CIFAR-10 with the authors' seed 42 (what
    ``random_split(ds, [45000, 5000], generator)`` draws as well).
    """
    require(0 < val_fraction < 1, f"data.val_fraction must be in (0, 1), got {val_fraction}")
    n_val = int(round(n * val_fraction))
    require(0 < n_val < n, f"a validation fraction of {val_fraction} leaves no train or validation data of {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(split_seed))
    return perm[: n - n_val], perm[n - n_val:]


def transform(image_size: int, augment: bool):
    from torchvision import transforms as T

    steps = [T.Resize((image_size, image_size))]
    if augment:
        steps.append(T.TrivialAugmentWide())
    steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return T.Compose(steps)


class CIFAR10Data:
    """The three splits of one data root, loaded once per process."""

    def __init__(self, root: str, cfg: Config):
        self.root, self.cfg = root, cfg
        self._train = self._test = None

    def base(self, train: bool):
        verify = bool(self.cfg.data.verify_md5)
        if train:
            self._train = self._train or _torchvision_cifar10(self.root, True, verify)
            return self._train
        self._test = self._test or _torchvision_cifar10(self.root, False, verify)
        return self._test

    def rows(self, split: str) -> torch.Tensor:
        require(split in ("train", "val", "test"), f"unknown split '{split}'")
        if split == "test":
            return torch.arange(len(self.base(False)))
        train, val = split_rows(len(self.base(True)), self.cfg.data.val_fraction, self.cfg.data.split_seed)
        return train if split == "train" else val

    def dataset(self, split: str, augment: bool) -> IndexedSubset:
        base = self.base(split != "test")
        return IndexedSubset(base, self.rows(split), transform(self.cfg.model.image_size, augment))

    def labels(self, split: str) -> torch.Tensor:
        base = self.base(split != "test")
        return torch.as_tensor(base.targets, dtype=torch.long)[self.rows(split)]


def write_cifar10_archive(root: str | os.PathLike, n_train: int = 300, n_test: int = 100, seed: int = 0) -> Path:
    """Write a small CIFAR-10 in the real on-disk format (``cifar-10-batches-py``: python pickles
    ``data_batch_1..5``, ``test_batch``, ``batches.meta``) that torchvision's CIFAR10 reads.

    Images are 32x32 RGB: a class-specific colour and stripe pattern plus noise, so a small model
    can learn them and the pipeline's numbers mean something. Returns the folder.
    """
    require(n_train >= 5 and n_test >= 1, "need at least 5 training and 1 test image")
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    palette = rng.integers(40, 216, size=(10, 3))
    yy, xx = np.mgrid[0:32, 0:32]

    def images(n: int) -> tuple[np.ndarray, list[int]]:
        labels = rng.integers(0, 10, size=n)
        out = np.empty((n, 32, 32, 3), dtype=np.float64)
        for i, c in enumerate(labels):
            stripes = np.sin((xx * np.cos(c * 0.6) + yy * np.sin(c * 0.6)) * (0.3 + 0.05 * c))
            out[i] = palette[c] + 40 * stripes[..., None] + rng.normal(0, 90, size=(32, 32, 3))
        data = np.clip(out, 0, 255).astype(np.uint8).transpose(0, 3, 1, 2).reshape(n, 3072)
        return data, [int(c) for c in labels]

    sizes = [n_train // 5 + (1 if i < n_train % 5 else 0) for i in range(5)]
    for i, size in enumerate(sizes, start=1):
        data, labels = images(size)
        _pickle(folder / f"data_batch_{i}", {"batch_label": f"training batch {i} of 5", "labels": labels,
                                               "data": data, "filenames": [f"img_{i}_{j}.png" for j in range(size)]})
    data, labels = images(n_test)
    _pickle(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": labels, "data": data,
                                    "filenames": [f"test_{j}.png" for j in range(n_test)]})
    _pickle(folder / "batches.meta", {"num_cases_per_batch": max(sizes), "label_names": list(CLASSES),
                                      "num_vis": 3072})
    return folder


def _pickle(path: Path, obj: dict) -> None:
    from common.io import atomic_path

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


# ----------------------------------------------------------------------------- model
def resize_pos_embedding(pos: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + g*g, d) -> (1, 1 + grid*grid, d): bilinear (align_corners=False) on the patch part,
    the class-token embedding re-attached in front (authors-code §2.2)."""
    require(pos.ndim == 3 and pos.shape[0] == 1, f"position embedding must be (1, tokens, width), got {tuple(pos.shape)}")
    old = int(round((pos.shape[1] - 1) ** 0.5))
    require(old * old == pos.shape[1] - 1, f"position embedding of {pos.shape[1]} tokens is not 1 + a square grid")
    cls, patches = pos[:, :1], pos[:, 1:]
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bilinear", align_corners=False)
    return torch.cat([cls, patches.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def _swag_weights(source: str = "swag_e2e") -> dict[str, torch.Tensor]:
    """The pretrained state dict ``model.weights`` names: ``swag_e2e`` from torch's hub cache
    (``$TORCH_HOME/hub/checkpoints/``, downloaded there once), or a path to a state-dict file
    (``torch.save`` or ``.safetensors``; offline clusters). The official file name
    (``vit_h_14_swag-80465313.pth``) carries the start of its SHA-256, which is checked, as torch.hub
    checks a download."""
    from torchvision.models import ViT_H_14_Weights

    weights = ViT_H_14_Weights.IMAGENET1K_SWAG_E2E_V1
    if source != "swag_e2e":
        return _state_dict_file(Path(source), official=Path(weights.url).name, url=weights.url)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as err:  # offline or a damaged download
        hub = Path(torch.hub.get_dir()) / "checkpoints"
        raise UserError(f"ViT-H/14 SWAG E2E weights not found in {hub} and they could not be downloaded "
                        f"({type(err).__name__}); download {weights.url} into {hub}, or pass the file with "
                        f"--model.weights PATH, or use --model.weights none for random weights") from None


def _sha256(path: Path) -> str:
    import hashlib

    from tqdm import tqdm

    digest = hashlib.sha256()
    with open(path, "rb") as handle, tqdm(total=path.stat().st_size, unit="B", unit_scale=True,
                                          desc=f"sha256 {path.name}", leave=False) as bar:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def _state_dict_file(path: Path, official: str, url: str) -> dict[str, torch.Tensor]:
    from common.weights_file import read_state_dict

    require(path.is_file(), f"model.weights file {path} not found")
    if path.name == official:  # torch.hub's convention: name-<first hex digits of the SHA-256>.ext
        prefix = torch.hub.HASH_REGEX.search(official).group(1)
        digest = _sha256(path)
        require(digest.startswith(prefix), f"model.weights {path} has SHA-256 {digest[:len(prefix)]}..., not the "
                                           f"{prefix}... its official name promises: a damaged or different file; "
                                           f"download {url} again")
    return read_state_dict(path)


def _load_pretrained(make, state: dict[str, torch.Tensor], source: str, arch: str, grid: int,
                     n_classes: int) -> nn.Module:
    """``make(grid, classes)`` at the weights' own grid and head, the weights loaded strictly; then
    the position embedding resized to ``grid`` and a new ``n_classes`` head (the SWAG recipe, for
    any weights of the architecture)."""
    pos, head = state.get("encoder.pos_embedding"), state.get("heads.head.weight")
    own_grid = int(round((pos.shape[1] - 1) ** 0.5)) if pos is not None and pos.ndim == 3 else grid
    model = make(own_grid, head.shape[0] if head is not None and head.ndim == 2 else n_classes)
    from common.weights_file import mismatch

    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise UserError(f"model.weights {source} is not a state dict of this {arch} ({mismatch(err)})") from None
    model.encoder.pos_embedding = nn.Parameter(resize_pos_embedding(model.encoder.pos_embedding.data, grid))
    model.seq_length = grid * grid + 1
    model.heads.head = nn.Linear(model.hidden_dim, n_classes)
    return model


def build_vit(cfg: Config, n_classes: int = N_CLASSES, pretrained: bool = True) -> nn.Module:
    """The ViT of this run; ``pretrained=False`` builds the bare architecture (weights are loaded
    from a checkpoint next, so no download is needed after cycle 0). ``model.weights``: ``swag_e2e``,
    ``none`` (random) or a state-dict file of the architecture (``vit_h_14``: e.g. the SWAG file)."""
    from torchvision.models import vit_h_14
    from torchvision.models.vision_transformer import VisionTransformer

    m = cfg.model
    size = int(m.image_size)
    if m.arch == "custom":
        c = m.custom
        patch = int(c.patch_size)
        require(size >= patch, f"model.image_size {size} is smaller than the patch size {patch}")

        def make(grid: int, classes: int) -> nn.Module:
            return VisionTransformer(image_size=grid * patch, patch_size=patch, num_layers=c.num_layers,
                                     num_heads=c.num_heads, hidden_dim=c.hidden_dim, mlp_dim=c.mlp_dim,
                                     num_classes=classes)
    else:
        require(m.arch == "vit_h_14", f"unknown model.arch '{m.arch}'; choose vit_h_14 or custom")
        patch = 14
        require(size >= patch, f"model.image_size {size} is smaller than ViT-H/14's patch size 14")

        def make(grid: int, classes: int) -> nn.Module:
            return vit_h_14(weights=None, image_size=grid * patch, num_classes=classes)
    grid = size // patch  # 384 px -> 27 x 27 patches of 14 (the convolution drops the last 6 pixels)
    if pretrained and m.weights != "none":
        # SWAG E2E is trained at 518 px (37 x 37 patches) with a 1000-class head
        model = _load_pretrained(make, _swag_weights(str(m.weights)), str(m.weights), m.arch, grid, n_classes)
    else:
        model = make(grid, n_classes)
    # torchvision insists on image_size % patch == 0 only in its constructor; its forward takes
    # size // patch patches, as the authors' model.image_size = 384 did
    model.image_size = size
    return model


# ----------------------------------------------------------------------------- the run's model and data
def load_vit(cfg: Config, path: Path) -> nn.Module:
    """A cycle's saved ViT, on the CPU (the bare architecture, then every weight from the file)."""
    model = build_vit(cfg, N_CLASSES, pretrained=False)
    load_module(path, model)
    return model


_DATA: dict[str, CIFAR10Data] = {}


def data_of(run) -> CIFAR10Data:
    """The run's CIFAR-10 splits, read once per process (cycle.py runs every stage in one)."""
    if run.data_root not in _DATA:
        _DATA[run.data_root] = CIFAR10Data(run.data_root, run.cfg)
    return _DATA[run.data_root]


def check_config(cfg: Config) -> None:
    """The CIFAR-10 keys (:data:`SCHEMA`) over the shared ones of :func:`common.decoupled.validate_config`."""
    validate_config(cfg, SCHEMA)
    m = cfg.model
    require(m.arch != "custom" or m.weights != "swag_e2e",
            "model.arch custom has no pretrained weights (SWAG); use --model.weights none or a weights file")


#: the CIFAR-10 keys of config.yaml with their types and ranges (the shared ones: common.decoupled.SCHEMA)
SCHEMA = {
    "data": {"val_fraction": S.real(gt=0, lt=1), "split_seed": S.integer(ge=0), "verify_md5": S.boolean()},
    "model": {"arch": S.choice("vit_h_14", "custom"),
              "weights": S.text(),   # swag_e2e, none, or a weights file (checked where it is loaded)
              "image_size": S.integer(ge=1),
              "custom": {key: S.integer(ge=1) for key in ("patch_size", "num_layers", "num_heads", "hidden_dim",
                                                          "mlp_dim")}},
}
