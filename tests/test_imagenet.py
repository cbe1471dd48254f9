"""ImageNet1K: data, model, the backbone-feature cache, and the whole pipeline on a generated ImageFolder tree
with timm convnextv2_atto (random weights) on the CPU."""
from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "ImageNet1K"
sys.path.insert(0, str(EXP))

from imagenet import (BACKBONE_HOOK, HeadOnly, ImageNetData, ImageNetExperiment, build_convnext,  # noqa: E402
                      split_rows, write_imagefolder)

from common.activation_cache import CacheDataset  # noqa: E402
from common.aux_loss import aux_loss  # noqa: E402
from common.config import load_config  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.extraction import extract  # noqa: E402
from common.finetune import FinetuneConfig, build_loader, finetune  # noqa: E402
from common.hooks import ActivationCapture  # noqa: E402
from common.targets import TargetTable, save_targets  # noqa: E402

SMALL = {"model.name": "convnextv2_atto", "model.weights": "none", "data.image_size": 32, "data.val_size": 6,
         "data.num_workers": 0}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inet")
    write_imagefolder(root / "imagenet", n_classes=4, n_train=8, n_val=3, size=36, seed=1)
    return root


def small_cfg(preset: str = "faithful", **overrides) -> dict:
    return load_config(EXP / "config.yaml", preset, {**SMALL, **overrides})


def test_split_is_a_seeded_permutation():
    train, val = split_rows(100, 25, 42)
    assert len(train) == 75 and len(val) == 25
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    again = split_rows(100, 25, 42)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, split_rows(100, 25, 43)[1])
    with pytest.raises(UserError, match="val_size"):
        split_rows(10, 10, 42)


def test_splits_yield_their_index_and_labels(data_root):
    data = ImageNetData(str(data_root), small_cfg())
    train, val, test = (data.dataset(s) for s in ("train", "val", "test"))
    assert (len(train), len(val), len(test)) == (26, 6, 12)
    image, label, index = train[3]
    assert image.shape == (3, 32, 32) and index == 3 and label == int(data.labels("train")[3])
    folder = data.folder(True)
    assert set(folder.targets[r] for r in data.rows("val").tolist()) <= set(range(4))
    assert data.labels("test").tolist() == sorted(data.labels("test").tolist())  # ImageFolder order, no shuffle
    assert set(data.rows("train").tolist()).isdisjoint(data.rows("val").tolist())


def test_missing_data_is_one_line(tmp_path):
    data = ImageNetData(str(tmp_path), small_cfg())
    with pytest.raises(UserError, match=r"ImageNet training folder .*imagenet/train not found; arrange ImageNet"):
        data.labels("train")
    (tmp_path / "imagenet" / "train").mkdir(parents=True)
    with pytest.raises(UserError, match="holds no images"):
        data.labels("train")


def test_pretrained_weights_need_all_classes(data_root):
    data = ImageNetData(str(data_root), small_cfg(**{"model.weights": "pretrained"}))
    with pytest.raises(UserError, match="has 4 class folders; the pretrained classifier needs the 1000"):
        data.labels("train")


def test_missing_weights_offline_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub.constants as hf

    monkeypatch.setattr(hf, "HF_HUB_OFFLINE", True)  # no network here anyway; offline mode skips the retries
    monkeypatch.setattr(hf, "HF_HUB_CACHE", str(tmp_path / "hf"))
    with pytest.raises(UserError, match=r"pretrained weights of convnextv2_atto .* --model.weights"):
        build_convnext(small_cfg(**{"model.weights": "pretrained"}), pretrained=True)
    with pytest.raises(UserError, match="model.weights file .* not found"):
        build_convnext(small_cfg(**{"model.weights": str(tmp_path / "w.safetensors")}), pretrained=True)


def test_local_weights_file_is_loaded(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(3)
    reference = build_convnext(small_cfg(), pretrained=False)
    save_file(reference.state_dict(), str(tmp_path / "w.safetensors"))
    loaded = build_convnext(small_cfg(**{"model.weights": str(tmp_path / "w.safetensors")}), pretrained=True)
    assert torch.equal(loaded.head.fc.weight, reference.head.fc.weight)


def test_validation_rejects_a_backbone_cache_with_a_trainable_backbone():
    from common.decoupled import validate_config

    with pytest.raises(UserError, match="backbone.cache is only valid when only the head trains"):
        validate_config(small_cfg(**{"adapt.trainable": ["stages.3", "head"]}), ImageNetExperiment())
    validate_config(small_cfg(**{"adapt.trainable": ["stages.3", "head"], "backbone.cache": False}),
                    ImageNetExperiment())
    with pytest.raises(UserError, match="no augmentation"):
        validate_config(small_cfg(**{"adapt.augment": True}), ImageNetExperiment())


def test_cached_backbone_path_equals_the_full_model(data_root, tmp_path):
    """Logits, head.flatten activations, CE + λ·aux losses and one epoch of head-only SGD are the same
    whether the model runs on images or model.head runs on the cached pooled backbone features."""
    torch.manual_seed(0)
    model = build_convnext(small_cfg(), pretrained=False).eval()
    train = ImageNetData(str(data_root), small_cfg()).dataset("train")
    cache = extract(model, train, *BACKBONE_HOOK, tmp_path / "backbone", batch_size=8, chunk_rows=8,
                    dtype="float32")
    assert cache.dim == model.head.norm.normalized_shape[0]
    images = torch.stack([train[i][0] for i in range(len(train))])
    targets = torch.randn(len(train), cache.dim, generator=torch.Generator().manual_seed(1))
    labels = train.labels

    with torch.no_grad(), ActivationCapture(model, "head.flatten", "flatten") as cap:
        logits_full = model(images)
        acts_full = cap.pop()
    head = HeadOnly(model)
    with torch.no_grad(), ActivationCapture(head, "head.flatten", "flatten") as cap:
        logits_cached = head(cache.read_all())
        acts_cached = cap.pop()
    torch.testing.assert_close(logits_cached, logits_full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(acts_cached, acts_full, rtol=1e-5, atol=1e-5)
    loss_full = F.cross_entropy(logits_full, labels) + 0.5 * aux_loss(acts_full, targets, "cosine")
    loss_cached = F.cross_entropy(logits_cached, labels) + 0.5 * aux_loss(acts_cached, targets, "cosine")
    torch.testing.assert_close(loss_cached, loss_full, rtol=1e-5, atol=1e-6)

    # one epoch of the real fine-tuning engine both ways: same batches, same losses, same trained head
    save_targets(tmp_path / "targets.npy", targets, labels)
    table = TargetTable(tmp_path / "targets.npy", labels)
    ft = FinetuneConfig(epochs=1, lr=0.05, momentum=0.9, weight_decay=0.05, clip_grad=1.0, aux_lambda=0.5)
    results = []
    for module, dataset in ((copy.deepcopy(model), train), (None, CacheDataset(cache))):
        if module is None:
            module = HeadOnly(copy.deepcopy(model))
        loader = build_loader(dataset, 8, train=True, seed=0)
        evaluation = build_loader(dataset, 64, train=False)
        res = finetune(module, loader, evaluation, None, ft, device=torch.device("cpu"),
                       trainable=["head.norm", "head.fc"], hook=("head.flatten", "flatten"), targets=table)
        results.append((res.history[0], {k: v.detach().clone() for k, v in module.head.state_dict().items()}))
    (hist_full, head_full), (hist_cached, head_cached) = results
    assert hist_full["train_ce"] == pytest.approx(hist_cached["train_ce"], rel=1e-5)
    assert hist_full["train_aux"] == pytest.approx(hist_cached["train_aux"], rel=1e-5)
    assert hist_full["val_acc"] == hist_cached["val_acc"]
    for name in head_full:
        torch.testing.assert_close(head_cached[name], head_full[name], rtol=1e-4, atol=1e-6)
    assert not torch.equal(head_full["fc.weight"], model.head.fc.weight)  # it did train
