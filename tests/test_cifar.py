"""CIFAR-10 data, model and error lines (CIFAR-10/cifar.py, common/decoupled.py checks)."""
from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

ROOT = Path(__file__).resolve().parents[1]
CIFAR_DIR = ROOT / "CIFAR-10"
sys.path.insert(0, str(CIFAR_DIR))

import cifar  # noqa: E402

from common.config import Config, load_config  # noqa: E402
from common.errors import UserError  # noqa: E402
from common.hooks import ActivationCapture  # noqa: E402

SMALL = {"model.arch": "custom", "model.weights": "none", "model.image_size": 32, "data.verify_md5": False,
         "data.num_workers": 0}


def small_cfg(**more) -> Config:
    return Config(load_config(CIFAR_DIR / "config.yaml", "faithful", {**SMALL, **more}))


def test_split_is_the_authors_randperm():
    train, val = cifar.split_rows(50000, 0.1, 42)
    assert len(train) == 45000 and len(val) == 5000
    ref_train, ref_val = torch.utils.data.random_split(range(50000), [45000, 5000],
                                                       generator=torch.Generator().manual_seed(42))
    assert train.tolist() == list(ref_train.indices) and val.tolist() == list(ref_val.indices)
    with pytest.raises(UserError, match="val_fraction"):
        cifar.split_rows(100, 1.5, 42)


def test_generated_archive_is_read_by_torchvision(tmp_path):
    from torchvision.datasets import CIFAR10

    folder = cifar.write_cifar10_archive(tmp_path, n_train=50, n_test=20)
    assert sorted(p.name for p in folder.iterdir()) == sorted(cifar.CIFAR_FILES)
    data = cifar.CIFAR10Data(str(tmp_path), small_cfg())
    assert isinstance(data.base(True), CIFAR10) and data.base(True).data.shape == (50, 32, 32, 3)
    assert data.base(True).classes == list(cifar.CLASSES)
    sizes = {s: len(data.dataset(s, augment=False)) for s in ("train", "val", "test")}
    assert sizes == {"train": 45, "val": 5, "test": 20}
    val = data.dataset("val", augment=False)
    labels = data.labels("val")
    rows = cifar.split_rows(50, 0.1, 42)[1]
    for i in range(len(val)):
        image, label, index = val[i]
        assert index == i and label == int(labels[i]) == data.base(True).targets[int(rows[i])]
    image = val[0][0]
    raw = torch.from_numpy(data.base(True).data[int(rows[0])]).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(cifar.IMAGENET_MEAN)[:, None, None], torch.tensor(cifar.IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(image, (raw - mean) / std)  # 32 -> 32 resize is the identity
    big = cifar.CIFAR10Data(str(tmp_path), small_cfg(**{"model.image_size": 48})).dataset("train", augment=True)
    assert big[0][0].shape == (3, 48, 48)


def test_missing_data_is_one_line(tmp_path, monkeypatch):
    with pytest.raises(UserError) as err:
        cifar._torchvision_cifar10(str(tmp_path), True, verify_md5=False)
    assert "cifar-10-python.tar.gz" in str(err.value) and str(tmp_path) in str(err.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", offline)
    with pytest.raises(UserError) as err:
        cifar._torchvision_cifar10(str(tmp_path), True, verify_md5=True)
    message = str(err.value)
    assert "could not be downloaded (URLError)" in message and cifar.CIFAR_URL in message and "\n" not in message


def test_missing_weights_is_one_line(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", offline)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    cfg = small_cfg(**{"model.arch": "vit_h_14", "model.weights": "swag_e2e", "model.image_size": 384})
    with torch.device("meta"), pytest.raises(UserError) as err:
        cifar.build_vit(cfg)
    message = str(err.value)
    assert "vit_h_14_swag" in message and str(tmp_path) in message and "--model.weights none" in message


def test_vit_h_14_runs_at_384_with_the_hook_on_the_class_token(monkeypatch):
    """The real architecture on the meta device (shapes only, no memory): SWAG weights at 518 px are
    loaded, the position embedding becomes 1 + 27 x 27 tokens, the head has 10 classes."""
    from torchvision.models import vit_h_14

    with torch.device("meta"):
        fake = vit_h_14(weights=None, image_size=518).state_dict()
    monkeypatch.setattr("torchvision.models._api.load_state_dict_from_url", lambda *a, **k: fake)
    cfg = small_cfg(**{"model.arch": "vit_h_14", "model.weights": "swag_e2e", "model.image_size": 384})
    for pretrained in (True, False):
        with torch.device("meta"):
            model = cifar.build_vit(cfg, pretrained=pretrained)
            assert model.encoder.pos_embedding.shape == (1, 730, 1280) and model.image_size == 384
            assert model.heads.head.out_features == 10 and len(model.encoder.layers) == 32
            with ActivationCapture(model, "encoder", "cls_token") as cap:
                logits = model(torch.empty(2, 3, 384, 384))
            assert logits.shape == (2, 10) and cap.pop().shape == (2, 1280)


def test_position_embedding_is_resized_bilinearly_with_the_class_token_kept():
    torch.manual_seed(0)
    pos = torch.randn(1, 1 + 37 * 37, 6)
    out = cifar.resize_pos_embedding(pos, 27)
    assert out.shape == (1, 1 + 27 * 27, 6)
    assert torch.equal(out[:, 0], pos[:, 0])
    grid = pos[:, 1:].reshape(1, 37, 37, 6).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, size=(27, 27), mode="bilinear", align_corners=False).permute(0, 2, 3, 1).reshape(1, -1, 6)
    torch.testing.assert_close(out[:, 1:], ref)
    torch.testing.assert_close(cifar.resize_pos_embedding(pos, 37), pos)
    with pytest.raises(UserError, match="square grid"):
        cifar.resize_pos_embedding(torch.randn(1, 11, 4), 3)


def test_impossible_settings_are_rejected_up_front():
    cifar.check_config(small_cfg())
    cases = {
        "needs train_view augmented": {"activations.train_view": "clean", "activations.sae_on_the_fly": True},
        "no pretrained weights": {"model.weights": "swag_e2e"},
        "none for cycle 3": {"aux.lambdas": [0.01, 0.01]},
        "top_k must be in": {"sharpen.top_k": 6000},
        "amp": {"adapt.finetune.amp": "fp8"},
        "unknown fine-tune settings": {"baseline.finetune": {"epochs": 1, "lr": 0.1, "momentun": 0.9}},
        "sae.l1_coeff lists values for cycles 0..1": {"sae.l1_coeff": [1e-4, 2e-4]},
    }
    for message, overrides in cases.items():
        with pytest.raises(UserError, match=message):
            cifar.check_config(small_cfg(**overrides))


def _init_run(run_dir: Path, **overrides) -> None:
    args = [sys.executable, "-m", "common.runs", "--config", str(CIFAR_DIR / "config.yaml"), "--out", str(run_dir)]
    for key, value in {**SMALL, **overrides}.items():
        args += [f"--{key}", yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()]
    subprocess.run(args, cwd=ROOT, check=True, capture_output=True)


def _stage(script: str, run_dir: Path, cycle: int, data_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CIFAR_DIR / script), "--run-dir", str(run_dir), "--cycle", str(cycle),
                           "--data-root", str(data_root), "--device", "cpu"], cwd=ROOT, capture_output=True, text=True)


def test_stage_errors_are_one_line(tmp_path):
    run = tmp_path / "run"
    _init_run(run)
    res = _stage("adapt.py", run, 1, tmp_path)
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert "cycle 1 'adapt' needs the 'adapt' stage of cycle 0" in res.stderr
    res = _stage("adapt.py", run, 0, tmp_path / "nowhere")
    assert res.returncode == 2 and res.stderr.count("\n") == 1
    assert res.stderr.startswith("error: CIFAR-10 files data_batch_1") and "cifar-10-python.tar.gz" in res.stderr
    res = _stage("evaluate.py", run, 4, tmp_path)
    assert res.returncode == 2 and "beyond this run's last cycle 3" in res.stderr
