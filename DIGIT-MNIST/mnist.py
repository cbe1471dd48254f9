"""DIGIT-MNIST's helpers under the recipes train.py, sharpen.py, ablation.py and evaluate.py: the
50k/10k/10k split of MNIST, the MLP and its SAEs, the stage graph and the checkpoint files."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from common.checkpoint import load_module
from common.errors import UserError
from common.runs import Stage
from common.sae import SAEConfig, SparseAutoencoder
from common.seed import set_seed

HIDDEN = 16              # width of both hidden layers, and so of the SAEs' inputs and of every target
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class MLP(nn.Module):
    """784-16-16-10; returns the logits and both post-ReLU hidden layers (authors-code §1.2)."""

    def __init__(self, hidden: int = HIDDEN, n_classes: int = 10):
        super().__init__()
        self.fc1 = nn.Linear(784, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h1 = torch.relu(self.fc1(x.flatten(1)))
        h2 = torch.relu(self.fc2(h1))
        return self.fc3(h2), h1, h2

    def linear_layers(self) -> list[nn.Linear]:
        """The layers in order, for the hand-derived training step (common.concurrent_training.ManualStep)."""
        return [self.fc1, self.fc2, self.fc3]


def load_splits(data_root: str, cfg: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """train / val / test as (float pixels 0-255, int64 labels) tensors, as the authors used them:
    no division by 255; 50k/10k stratified split of the official train set (random_state 42).

    The split is cached next to the raw files (``MNIST/sae-ception/``, keyed by their sizes and
    modification times and the split settings): every stage of a run loads it, and decoding the
    archives plus importing torchvision and scikit-learn took ~3 s a time. A read-only data root
    just goes without the cache."""
    raw = Path(data_root) / "MNIST" / "raw"
    cache = _split_cache(raw, cfg)
    if cache is not None and cache.is_file():
        try:
            return _from_uint8(torch.load(cache, weights_only=True))
        except Exception:  # a damaged cache is rebuilt below
            pass
    splits = _split_archives(data_root, raw, cfg)
    cache = _split_cache(raw, cfg)
    if cache is not None:
        try:
            from common.io import atomic_path
            cache.parent.mkdir(exist_ok=True)
            with atomic_path(cache) as tmp:
                torch.save(splits, tmp)
        except OSError:
            pass
    return _from_uint8(splits)


def _split_cache(raw: Path, cfg: dict) -> Path | None:
    """Where the split of these raw files with these settings is cached; None while a file is missing."""
    import hashlib

    try:
        stats = [(raw / name).stat() for name in MNIST_FILES]
    except OSError:
        return None
    key = repr(([(s.st_size, s.st_mtime_ns) for s in stats], cfg["data"]["val_size"], cfg["data"]["split_seed"], 1))
    return raw.parent / "sae-ception" / f"splits-{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _from_uint8(splits: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {name: (x.reshape(len(x), -1).float(), y.long()) for name, (x, y) in splits.items()}


def _split_archives(data_root: str, raw: Path, cfg: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The split from the archives (uint8 images, labels), read through torchvision."""
    from sklearn.model_selection import train_test_split
    from torchvision.datasets import MNIST

    unpack_archives(raw)
    download = os.environ.get("SAE_CEPTION_OFFLINE", "0") != "1"
    try:
        train = MNIST(data_root, train=True, download=download)
        test = MNIST(data_root, train=False, download=download)
    except PermissionError:
        raise UserError(f"cannot unpack the MNIST archives in {raw} (not writable); copy the MNIST folder to a "
                        f"writable place and pass --data-root") from None
    except Exception as err:  # torchvision raises several kinds when offline
        raise UserError(f"MNIST not found in {raw} and it could not be downloaded ({type(err).__name__}); put "
                        f"{', '.join(f + '.gz' for f in MNIST_FILES)} there") from None
    images, labels = train.data.numpy(), train.targets.numpy()
    tr_x, va_x, tr_y, va_y = train_test_split(images, labels, test_size=cfg["data"]["val_size"],
                                              stratify=labels, random_state=cfg["data"]["split_seed"])
    return {name: (torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.asarray(y)))
            for name, (x, y) in {"train": (tr_x, tr_y), "val": (va_x, va_y),
                                 "test": (test.data.numpy(), test.targets.numpy())}.items()}


def unpack_archives(raw: Path) -> None:
    """Unpack ``*.gz`` archives that sit in ``raw`` without their unpacked file (what torchvision reads).

    torchvision would do it too, but only for archives with the official checksums; doing it here also
    serves data prepared in the same format by hand or by the tests.
    """
    import gzip
    import shutil

    from common.io import atomic_path

    for name in MNIST_FILES:
        archive, unpacked = raw / f"{name}.gz", raw / name
        if archive.is_file() and not unpacked.is_file():
            try:
                with gzip.open(archive, "rb") as src, atomic_path(unpacked) as tmp, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst)
            except PermissionError:
                raise UserError(f"cannot unpack {archive} ({raw} is not writable); copy the MNIST folder to a "
                                f"writable place and pass --data-root") from None
            except (OSError, EOFError) as err:
                raise UserError(f"{archive} is not a valid gzip archive ({err}); download it again") from None


def build(cfg: dict, seed: int) -> tuple[MLP, dict[int, SparseAutoencoder]]:
    """The MLP and its SAEs, each initialised right after ``set_seed(seed)`` as the authors' main.py."""
    set_seed(seed)
    model = MLP()
    saes = {}
    for layer in cfg["sae"]["layers"]:
        set_seed(seed)
        saes[layer] = SparseAutoencoder(SAEConfig(d_in=HIDDEN, d_sae=cfg["sae"]["d_sae"], l1_coeff=cfg["sae"]["l1_coeff"],
                                                  l1_form=cfg["sae"]["l1_form"],
                                                  decoder_norm=cfg["sae"]["decoder_norm"]))
    return model, saes


def stage(directory: str | os.PathLike, name: str) -> Stage:
    """A stage of a cycle (or ablation) directory with the stages it is built from: train of cycle
    k >= 1 from cycle k-1's sharpen, sharpen and metrics from their directory's train."""
    from common.runs import StageGraph

    graph = StageGraph({"train": [(-1, "sharpen")], "sharpen": [(0, "train")], "metrics": [(0, "train")]})
    return graph.stage(directory, name)


def checkpoint_paths(directory: Path, cfg: dict) -> dict[str, Path]:
    return {"mlp": directory / "mlp.safetensors",
            **{f"sae_h{layer}": directory / f"sae_h{layer}.safetensors" for layer in cfg["sae"]["layers"]}}


def load_checkpoint(directory: Path, cfg: dict, seed: int) -> tuple[MLP, dict[int, SparseAutoencoder]]:
    stage(directory, "train").require_done("run its train stage first")
    model, saes = build(cfg, seed)
    paths = checkpoint_paths(directory, cfg)
    load_module(paths["mlp"], model)
    for layer, sae in saes.items():
        load_module(paths[f"sae_h{layer}"], sae)
    return model.eval(), saes


def ablation_dir(run_dir: str | os.PathLike, seed: int) -> Path:
    """The random-target ablation's folder beside the cycles of a seed (not a cycle: its train stage needs
    nothing before it)."""
    return Path(run_dir) / f"seed_{seed}" / "random_targets"
